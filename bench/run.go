// The run: bring the lab up, start servers and the HAProxy pair, then for every
// repetition go through the scenarios (alternating agent modes), run every workload,
// and record the samples.

package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/ferrymesh/ferry/api/admin"
	"github.com/ferrymesh/ferry/lab"
)

// Config configures a run.
type Config struct {
	Plan Plan
	// Out is the results folder (created): report.md, samples.json, plots.
	Out string
	// FerryBinary is the ferry CLI, run in pods as the bulk sink and sender.
	FerryBinary string
	// AgentBinary is ferry-agent; FortioBinary is fortio (go build fortio.org/fortio).
	AgentBinary, FortioBinary string
	// Profile fetches a CPU profile from each agent during the first repetition of
	// every max-rate run of a Ferry scenario, into Out/profiles.
	Profile bool
	// Progress receives one line per step.
	Progress io.Writer
	Log      *slog.Logger
}

// Sample is one workload run in one scenario.
type Sample struct {
	Scenario string  `json:"scenario"`
	Workload string  `json:"workload"`
	Rep      int     `json:"rep"`
	QPS      float64 `json:"qps,omitempty"` // achieved requests (or connections) per second
	// Latency percentiles in milliseconds.
	P50  float64 `json:"p50_ms,omitempty"`
	P90  float64 `json:"p90_ms,omitempty"`
	P99  float64 `json:"p99_ms,omitempty"`
	P999 float64 `json:"p999_ms,omitempty"`
	// Requests is how many requests completed; Errors how many did not get a 200.
	Requests int64 `json:"requests,omitempty"`
	Errors   int64 `json:"errors,omitempty"`
	// Gbps is the bulk throughput in Gbit/s.
	Gbps float64 `json:"gbps,omitempty"`
	// ProxyCPU is CPU seconds the scenario's proxies used during the run; CPUPer1k
	// divides it by thousands of requests (per GiB for bulk).
	ProxyCPU float64 `json:"proxy_cpu_s"`
	CPUPer1k float64 `json:"cpu_per_1k,omitempty"`
	// PeakRSS is the sum of the proxies' peak resident set sizes, in bytes.
	PeakRSS int64 `json:"peak_rss_bytes,omitempty"`
	// Seconds is the wall time of the run, for CPU per second.
	Seconds float64 `json:"seconds,omitempty"`
	// Procs splits ProxyCPU and PeakRSS by process.
	Procs []ProcCost `json:"procs,omitempty"`
	// Carried is how Ferry carried an HTTP/2 or gRPC workload, from the client
	// node's connection records of the Service address: "L7 http2", "L7 grpc",
	// or "L4" (a byte stream through the tunnel); empty for other scenarios.
	Carried string `json:"carried,omitempty"`
	// Error says why the run failed; a failed sample has no figures.
	Error string `json:"error,omitempty"`
}

// ProcCost is one proxy process's share of a sample's cost.
type ProcCost struct {
	Name    string  `json:"name"`
	CPU     float64 `json:"cpu_s"`
	PeakRSS int64   `json:"peak_rss_bytes"`
	// IdleRSS is the process's resident set (VmRSS) right before the run, after the
	// scenario's warm-up and the runs before it, with no load; LoadRSS the largest
	// VmRSS sampled every 100 ms during the run.
	IdleRSS int64 `json:"idle_rss_bytes,omitempty"`
	LoadRSS int64 `json:"load_rss_bytes,omitempty"`
	// LoadFileRSS is the file-backed part of LoadRSS (RssFile): the binary's pages.
	LoadFileRSS int64 `json:"load_file_rss_bytes,omitempty"`
}

// Placement says which CPUs load, servers and proxies ran on, and what else the
// report needs to say about the machine.
type Placement struct {
	Pinned     bool   `json:"pinned"`    // false with one CPU: nothing pinned
	AppCPU     int    `json:"app_cpu"`   // load generators and servers
	ProxyCPU   int    `json:"proxy_cpu"` // agents and HAProxy
	CPUs       int    `json:"cpus"`
	Restarts   int    `json:"agent_restarts"` // to switch agent modes
	Kernel     string `json:"kernel"`
	GoVersion  string `json:"go_version"`
	HAProxyVer string `json:"haproxy_version"`
}

// Results is everything a run measured.
type Results struct {
	Plan      Plan      `json:"-"`
	Start     time.Time `json:"start"`
	Elapsed   string    `json:"elapsed"`
	Placement Placement `json:"placement"`
	Samples   []Sample  `json:"samples"`
}

type runner struct {
	cfg  Config
	log  *slog.Logger
	lab  *lab.Lab
	tmp  string
	mode agentMode
	pl   Placement
	hap  map[string]int // haproxy PIDs: "client", "nms1", "nms2"
	// goTLS is the client's certificate for the gotls scenarios.
	goTLS TLSFiles
	proc  []*exec.Cmd
	step  int
	all   int
}

// Run measures every scenario and workload of cfg.Plan and writes the results under
// cfg.Out. The lab it uses (prefix bn) is removed when it returns.
func Run(ctx context.Context, cfg Config) (*Results, error) {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.Progress == nil {
		cfg.Progress = io.Discard
	}
	for _, tool := range []string{"nsenter", "taskset", "haproxy", "iptables", "h2load"} {
		if _, err := exec.LookPath(tool); err != nil {
			return nil, fmt.Errorf("%s is not installed (make deps installs it): %w", tool, err)
		}
	}
	for _, b := range []string{cfg.FerryBinary, cfg.AgentBinary, cfg.FortioBinary} {
		if _, err := os.Stat(b); err != nil {
			return nil, fmt.Errorf("binary: %w", err)
		}
	}
	if err := os.MkdirAll(filepath.Join(cfg.Out, "logs"), 0o755); err != nil {
		return nil, fmt.Errorf("results folder: %w", err)
	}
	tmp, err := os.MkdirTemp("", "ferry-bench-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	r := &runner{cfg: cfg, log: cfg.Log, tmp: tmp, hap: map[string]int{}}
	r.pl = placement()
	res := &Results{Plan: cfg.Plan, Start: time.Now(), Placement: r.pl}

	r.progress("lab: bringing up prefix bn (pod network 10.%d.0.0/16, 2 nodes, 6 pods)", LabPodNet)
	upCtx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	l, err := lab.Up(upCtx, labConfig(cfg.AgentBinary), cfg.Log)
	cancel()
	if err != nil {
		return nil, fmt.Errorf("lab: %w", err)
	}
	r.lab = l
	// The lab starts the agents with their defaults, which are no mode of ours: the
	// first Ferry scenario restarts them with its flags.
	r.mode = modeAny
	defer func() {
		r.stopProcs()
		if err := l.Down(); err != nil {
			r.log.Warn("lab down", "error", err)
		}
		l.Close()
	}()
	if err := r.waitAgents(ctx); err != nil {
		return nil, err
	}
	if err := r.startServers(ctx); err != nil {
		return nil, err
	}

	p := cfg.Plan
	r.all = p.Runs()
	for rep := 1; rep <= p.Reps; rep++ {
		for _, sc := range r.order(rep) {
			if err := ctx.Err(); err != nil {
				return nil, err
			}
			if err := r.ensureMode(ctx, sc.mode); err != nil {
				return nil, err
			}
			if err := r.warmup(ctx, sc); err != nil {
				return nil, fmt.Errorf("%s warm-up: %w", sc.Key, err)
			}
			for _, w := range p.Workloads {
				if !w.runsIn(sc) {
					continue
				}
				s, err := r.measure(ctx, sc, w, rep)
				if err != nil {
					if ctx.Err() != nil {
						return nil, ctx.Err()
					}
					// A failure is a result too: record it, show it in the report, go on.
					r.progress("[%3d/%d] rep %d  %-10s %-13s FAILED: %v", r.step, r.all, rep, sc.Key, w.Key, err)
					s = Sample{Scenario: sc.Key, Workload: w.Key, Rep: rep, Error: err.Error()}
				}
				res.Samples = append(res.Samples, s)
			}
		}
	}
	res.Placement = r.pl
	res.Elapsed = time.Since(res.Start).Round(time.Second).String()
	return res, nil
}

func (r *runner) progress(format string, args ...any) {
	fmt.Fprintf(r.cfg.Progress, format+"\n", args...)
}

// placement pins load and servers to CPU 0 and proxies to CPU 1 when the machine
// has at least two; with one CPU everything shares it.
func placement() Placement {
	pl := Placement{CPUs: runtime.NumCPU(), GoVersion: runtime.Version()}
	if pl.CPUs >= 2 {
		pl.Pinned, pl.AppCPU, pl.ProxyCPU = true, 0, 1
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		pl.Kernel = strings.TrimSpace(string(b))
	}
	if out, err := exec.Command("haproxy", "-v").Output(); err == nil {
		pl.HAProxyVer = strings.TrimSpace(strings.SplitN(string(out), "\n", 2)[0])
	}
	return pl
}

// order is the scenarios of one repetition. The groups that share an agent mode
// start one later each repetition, so no scenario always runs first or right after
// an agent restart; the no-mesh and peer scenarios sit between the Ferry groups.
func (r *runner) order(rep int) []Scenario {
	var groups [][]Scenario
	byMode := map[agentMode][]Scenario{}
	var others []Scenario
	for _, s := range r.cfg.Plan.Scenarios {
		if s.mode == modeAny {
			others = append(others, s)
		} else {
			byMode[s.mode] = append(byMode[s.mode], s)
		}
	}
	for _, m := range []agentMode{modeEBPF, modeNoFast, modeIPTables} {
		if len(byMode[m]) > 0 {
			groups = append(groups, byMode[m])
		}
	}
	var out []Scenario
	k := (rep - 1) % max(1, len(groups))
	for i := range groups {
		out = append(out, groups[(k+i)%len(groups)]...)
		if i < len(others) { // one non-Ferry scenario after each Ferry group
			out = append(out, others[i])
		}
	}
	for i := len(groups); i < len(others); i++ {
		out = append(out, others[i])
	}
	return out
}

// waitAgents waits until both agents answer and have enrolled their pods, and pins
// them to the proxy CPU.
func (r *runner) waitAgents(ctx context.Context) error {
	want := map[string]int{"node1": 2, "node2": 1}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for _, n := range r.lab.Nodes() {
		if err := r.lab.WaitAgentReady(ctx, n); err != nil {
			return err
		}
		c := admin.NewClient(r.lab.AgentSocket(n))
		for {
			st, err := c.Status(ctx)
			if err == nil && len(st.Pods) >= want[n] {
				break
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("agent on %s did not enroll its pods: %v", n, err)
			case <-time.After(50 * time.Millisecond):
			}
		}
		if r.pl.Pinned {
			if err := pinProcess(r.lab.AgentPID(n), r.pl.ProxyCPU); err != nil {
				return err
			}
		}
	}
	return nil
}

// ensureMode restarts the agents in mode m unless they already run that way.
func (r *runner) ensureMode(ctx context.Context, m agentMode) error {
	if m == modeAny || m == r.mode {
		return nil
	}
	r.progress("agents: restarting with capture mode %q %v", m, m.agentArgs())
	for _, n := range r.lab.Nodes() {
		if err := r.lab.StopAgent(n, syscall.SIGTERM); err != nil {
			return err
		}
		if err := r.lab.StartAgent(n, m.agentArgs()...); err != nil {
			return err
		}
	}
	r.mode = m
	r.pl.Restarts++
	return r.waitAgents(ctx)
}

// onApp prefixes a command with taskset so it runs on the load and server CPU.
func (r *runner) onApp(bin string, args ...string) (string, []string) {
	if !r.pl.Pinned {
		return bin, args
	}
	return "taskset", append([]string{"-c", strconv.Itoa(r.pl.AppCPU), bin}, args...)
}

func (r *runner) onProxy(bin string, args ...string) (string, []string) {
	if !r.pl.Pinned {
		return bin, args
	}
	return "taskset", append([]string{"-c", strconv.Itoa(r.pl.ProxyCPU), bin}, args...)
}

// start starts a long-running process in a pod; it is killed when the run ends.
func (r *runner) start(ctx context.Context, pod, name string, bin string, args ...string) (*exec.Cmd, error) {
	logf, err := os.Create(filepath.Join(r.cfg.Out, "logs", name+".log"))
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := r.lab.Command(ctx, pod, bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s in %s: %w", name, pod, err)
	}
	r.proc = append(r.proc, cmd)
	return cmd, nil
}

func (r *runner) stopProcs() {
	for _, c := range r.proc {
		if c.Process != nil {
			c.Process.Kill()
			c.Wait()
		}
	}
	r.proc = nil
}

// startServers starts fortio and the bulk sink in every server pod and the HAProxy
// pair, and waits until each answers.
func (r *runner) startServers(ctx context.Context) error {
	r.progress("servers: fortio server (HTTP/1.1 and h2c on %d, gRPC on %d) and TCP sink in srv1, srv2, nms1, nms2; HAProxy pair for nmc → nms1, nms2", httpPort, grpcPort)
	for _, pod := range []string{"srv1", "srv2", "nms1", "nms2"} {
		bin, args := r.onApp(r.cfg.FortioBinary, "server", "-http-port", strconv.Itoa(httpPort),
			"-grpc-port", strconv.Itoa(grpcPort), "-redirect-port", "disabled", "-tcp-port", "disabled", "-udp-port", "disabled", "-loglevel", "Error")
		if _, err := r.start(ctx, pod, "fortio-"+pod, bin, args...); err != nil {
			return err
		}
		bin, args = r.onApp(r.cfg.FerryBinary, "bench", "tcp-sink", "--listen", fmt.Sprintf(":%d", sinkPort))
		if _, err := r.start(ctx, pod, "sink-"+pod, bin, args...); err != nil {
			return err
		}
		bin, args = r.onApp(r.cfg.FerryBinary, "bench", "rr-server", "--listen", fmt.Sprintf(":%d", rrPort))
		if _, err := r.start(ctx, pod, "rr-"+pod, bin, args...); err != nil {
			return err
		}
	}
	client, srv, err := writeGoTLSFiles(filepath.Join(r.tmp, "gotls"), hapServers[:])
	if err != nil {
		return err
	}
	r.goTLS = client
	for _, pod := range hapServers {
		f := srv[pod]
		bin, args := r.onApp(r.cfg.FerryBinary, "bench", "tcp-sink", "--listen", fmt.Sprintf(":%d", tlsSinkPort), "--cert", f.Cert, "--key", f.Key, "--ca", f.CA)
		if _, err := r.start(ctx, pod, "tls-sink-"+pod, bin, args...); err != nil {
			return err
		}
	}
	if err := r.startHAProxy(ctx); err != nil {
		return err
	}
	// Wait until each path answers: one HTTP request through every scenario.
	deadline := time.Now().Add(20 * time.Second)
	for _, sc := range r.cfg.Plan.Scenarios {
		if sc.mode != modeAny && sc.mode != r.mode {
			continue
		}
		for {
			_, err := r.fortio(ctx, sc, Workload{kind: kindHTTP, QPS: 10, Conns: 1, Payload: 16}, 100*time.Millisecond)
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("%s does not answer: %w", sc.Key, err)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	return nil
}

// warmup sends light traffic so that pooled tunnels, TLS sessions and the servers'
// goroutines exist before the measurements, as they would in a running mesh.
func (r *runner) warmup(ctx context.Context, sc Scenario) error {
	if r.cfg.Plan.Warmup <= 0 {
		return nil
	}
	_, err := r.fortio(ctx, sc, Workload{kind: kindHTTP, QPS: 200, Conns: 16, Payload: 1024}, r.cfg.Plan.Warmup)
	return err
}

// proxyProc is one process a scenario's cost is charged to.
type proxyProc struct {
	name string
	pid  int
}

// proxyProcs are the processes whose CPU and memory a scenario is charged.
func (r *runner) proxyProcs(sc Scenario) []proxyProc {
	switch sc.proxy {
	case proxyFerry:
		var ps []proxyProc
		for _, n := range r.lab.Nodes() {
			if pid := r.lab.AgentPID(n); pid != 0 {
				ps = append(ps, proxyProc{"ferry-agent " + n, pid})
			}
		}
		return ps
	case proxyHAProxy:
		return []proxyProc{{"haproxy client (nmc)", r.hap["client"]}, {"haproxy server (" + sc.server + ")", r.hap[sc.server]}}
	}
	return nil
}

// cpus reads each process's CPU seconds so far.
func (r *runner) cpus(ps []proxyProc) []float64 {
	out := make([]float64, len(ps))
	for i, p := range ps {
		s, err := cpuSeconds(p.pid)
		if err != nil {
			r.log.Warn("proxy cpu", "error", err)
			continue
		}
		out[i] = s
	}
	return out
}

func (r *runner) measure(ctx context.Context, sc Scenario, w Workload, rep int) (Sample, error) {
	r.step++
	procs := r.proxyProcs(sc)
	cpu0 := r.cpus(procs)
	idle := make([]int64, len(procs))
	for i, p := range procs {
		idle[i], _ = rss(p.pid)
	}
	sampler := startRSSSampler(procs)
	var prof *profiler
	if r.cfg.Profile && sc.proxy == proxyFerry && w.QPS == 0 && rep == 1 {
		socks := map[string]string{}
		for _, n := range r.lab.Nodes() {
			socks[n] = r.lab.AgentSocket(n)
		}
		dir := filepath.Join(r.cfg.Out, "profiles")
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return Sample{}, err
		}
		prof = startProfiles(ctx, dir, sc.Key+"-"+w.Key, socks, r.cfg.Plan.Duration)
	}
	var (
		s   Sample
		err error
	)
	start := time.Now()
	switch w.kind {
	case kindRR:
		s, err = r.rr(ctx, sc, w, r.cfg.Plan.Duration)
	case kindBulk:
		s, err = r.bulk(ctx, sc, r.cfg.Plan.Duration)
	case kindH2:
		s, err = r.h2load(ctx, sc, w, r.cfg.Plan.Duration)
	default:
		s, err = r.fortio(ctx, sc, w, r.cfg.Plan.Duration)
	}
	elapsed := time.Since(start)
	loadRSS := sampler.stop()
	if prof != nil {
		if perr := prof.wait(); perr != nil {
			r.progress("profile %s %s: %v", sc.Key, w.Key, perr)
		}
	}
	if sc.proxy == proxyFerry && w.kind.proto().l7() {
		// What the flows say, failed run or not: the report labels the row with it.
		s.Carried = r.carried(ctx, sc, w, start)
	}
	if err != nil {
		if s.Carried != "" {
			err = fmt.Errorf("%w (Ferry carried it at %s)", err, s.Carried)
		}
		return s, err
	}
	s.Scenario, s.Workload, s.Rep = sc.Key, w.Key, rep
	s.Seconds = elapsed.Seconds()
	for i, c := range r.cpus(procs) {
		pc := ProcCost{Name: procs[i].name, CPU: c - cpu0[i], IdleRSS: idle[i], LoadRSS: max(idle[i], loadRSS[i].rss), LoadFileRSS: loadRSS[i].file}
		pc.PeakRSS, _ = peakRSS(procs[i].pid)
		s.Procs = append(s.Procs, pc)
		s.ProxyCPU += pc.CPU
		s.PeakRSS += pc.PeakRSS
	}
	switch {
	case w.kind == kindBulk && s.Gbps > 0:
		gib := s.Gbps * 1e9 / 8 * r.cfg.Plan.Duration.Seconds() / (1 << 30)
		s.CPUPer1k = s.ProxyCPU / gib // CPU seconds per GiB
	case s.Requests > 0:
		s.CPUPer1k = s.ProxyCPU / (float64(s.Requests) / 1000)
	}
	if w.kind == kindBulk {
		r.progress("[%3d/%d] rep %d  %-10s %-13s %6.2f Gbit/s  proxy cpu %.2fs", r.step, r.all, rep, sc.Key, w.Key, s.Gbps, s.ProxyCPU)
	} else {
		carried := ""
		if s.Carried != "" {
			carried = "  carried at " + s.Carried
		}
		unit := "req/s"
		switch w.kind {
		case kindGRPC:
			unit = "calls/s"
		case kindRR:
			unit = "exch/s"
		}
		r.progress("[%3d/%d] rep %d  %-10s %-13s %7.0f %-7s  p50 %.3f  p99 %.3f ms  errors %d  proxy cpu %.2fs%s", r.step, r.all, rep, sc.Key, w.Key, s.QPS, unit, s.P50, s.P99, s.Errors, s.ProxyCPU, carried)
	}
	return s, nil
}

// fortioResult is the part of fortio's JSON output the harness reads.
type fortioResult struct {
	ActualQPS         float64
	DurationHistogram struct {
		Count       int64
		Percentiles []struct{ Percentile, Value float64 }
	}
	RetCodes map[string]int64
}

// fortio runs fortio load in the scenario's client pod against its server: HTTP/1.1,
// or gRPC pings for kindGRPC.
func (r *runner) fortio(ctx context.Context, sc Scenario, w Workload, d time.Duration) (Sample, error) {
	target := sc.target(w.kind.proto(), r.podIP(sc.server))
	out := filepath.Join(r.tmp, "fortio.json")
	os.Remove(out)
	args := []string{"load", "-qps", strconv.Itoa(w.QPS), "-c", strconv.Itoa(w.Conns), "-t", d.String(),
		"-r", "0.00001", "-p", "50,90,99,99.9", "-json", out, "-loglevel", "Error", "-timeout", "5s"}
	if w.QPS > 0 {
		args = append(args, "-uniform")
	}
	if w.Payload > 0 {
		args = append(args, "-payload-size", strconv.Itoa(w.Payload))
	}
	ok := "200"
	switch w.kind {
	case kindNewConn:
		args = append(args, "-keepalive=false")
	case kindGRPC:
		// -c connections, each with -s concurrent calls; a call that succeeds is "SERVING".
		args = append(args, "-grpc", "-ping", "-s", strconv.Itoa(max(1, w.Streams)))
		ok = "SERVING"
	}
	if w.kind == kindGRPC {
		args = append(args, target)
	} else {
		args = append(args, "http://"+target+"/echo")
	}
	bin, args := r.onApp(r.cfg.FortioBinary, args...)
	rctx, cancel := context.WithTimeout(ctx, d+30*time.Second)
	defer cancel()
	if b, err := r.lab.Command(rctx, sc.client, bin, args...).CombinedOutput(); err != nil {
		return Sample{}, fmt.Errorf("fortio load: %w: %s", err, lastLines(b, 5))
	}
	b, err := os.ReadFile(out)
	if err != nil {
		return Sample{}, fmt.Errorf("fortio result: %w", err)
	}
	var fr fortioResult
	if err := json.Unmarshal(b, &fr); err != nil {
		return Sample{}, fmt.Errorf("fortio result: %w", err)
	}
	s := Sample{QPS: fr.ActualQPS, Requests: fr.DurationHistogram.Count}
	s.Errors = s.Requests - fr.RetCodes[ok]
	for _, p := range fr.DurationHistogram.Percentiles {
		ms := p.Value * 1000
		switch p.Percentile {
		case 50:
			s.P50 = ms
		case 90:
			s.P90 = ms
		case 99:
			s.P99 = ms
		case 99.9:
			s.P999 = ms
		}
	}
	if s.Requests == 0 || s.Errors == s.Requests {
		return s, fmt.Errorf("no successful request (%d sent)", s.Requests)
	}
	return s, nil
}

// bulk sends bytes one way over one connection for d.
func (r *runner) bulk(ctx context.Context, sc Scenario, d time.Duration) (Sample, error) {
	target := sc.target(protoTCP, r.podIP(sc.server))
	send := []string{"bench", "tcp-send", "--to", target, "--duration", d.String()}
	if sc.goTLS {
		send = append(send, "--cert", r.goTLS.Cert, "--key", r.goTLS.Key, "--ca", r.goTLS.CA)
	}
	var res SendResult
	if err := r.runJSON(ctx, sc.client, d, &res, send...); err != nil {
		return Sample{}, err
	}
	if res.Bytes == 0 || res.Seconds == 0 {
		return Sample{}, errors.New("tcp-send moved no bytes")
	}
	return Sample{Gbps: float64(res.Bytes) * 8 / res.Seconds / 1e9}, nil
}

// runJSON runs `ferry <args>` (a load client of d) in pod on the load CPU and
// decodes the JSON it prints into v.
func (r *runner) runJSON(ctx context.Context, pod string, d time.Duration, v any, args ...string) error {
	name := strings.Join(args[:min(2, len(args))], " ")
	bin, args := r.onApp(r.cfg.FerryBinary, args...)
	rctx, cancel := context.WithTimeout(ctx, d+30*time.Second)
	defer cancel()
	cmd := r.lab.Command(rctx, pod, bin, args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return fmt.Errorf("%s: %w: %s", name, err, lastLines([]byte(stderr.String()), 5))
	}
	if err := json.Unmarshal(out, v); err != nil {
		return fmt.Errorf("%s output %q: %w", name, out, err)
	}
	return nil
}

// rr runs rr-client in the scenario's client pod against its rr-server.
func (r *runner) rr(ctx context.Context, sc Scenario, w Workload, d time.Duration) (Sample, error) {
	target := sc.target(protoRR, r.podIP(sc.server))
	var res RRResult
	if err := r.runJSON(ctx, sc.client, d, &res, "bench", "rr-client", "--to", target, "--conns", strconv.Itoa(w.Conns), "--duration", d.String()); err != nil {
		return Sample{}, err
	}
	if res.Exchanges == 0 {
		return Sample{}, errors.New("rr-client completed no exchange")
	}
	return Sample{QPS: res.Rate(), Requests: res.Exchanges, P50: res.P50, P99: res.P99}, nil
}

func (r *runner) podIP(name string) string {
	p, _ := r.lab.Pod(name)
	return p.IP.String()
}

func lastLines(b []byte, n int) string {
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}
