// Package e2e runs Ferry end to end on the lab: real network namespaces, the real
// kernel and eBPF programs, real agent processes, real TLS. Every test asserts what
// a user would see: bytes arrive, identities match, what the agents and maps report.
package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/agent/datapath"
	"github.com/ferrymesh/ferry/api/admin"
	"github.com/ferrymesh/ferry/internal/privileged"
	"github.com/ferrymesh/ferry/lab"
)

// The shared lab: node1 has pods a, b (enrolled) and d (not enrolled); node2 has c.
// Its pods are in 10.106.0.0/16, apart from a default lab (10.100) a user may have up:
// agents find pods by IP.
const (
	prefix = "e2e"
	podNet = 106
)

// Ports of the workloads every test can use: an echo server, and one that speaks first.
const (
	echoPort   = 8080
	bannerPort = 8081
	closedPort = 9    // nothing listens here
	sinkPort   = 5201 // reads and discards
)

var (
	setupOnce sync.Once
	shared    *env
	setupErr  error
)

// env is the lab and the binaries the tests drive.
type env struct {
	lab     *lab.Lab
	bin     string // folder with the binaries newEnv built
	self    string // this test binary, re-executed in pods for client scenarios
	servers []*lab.PodProcess
	apps    map[string]*lab.PodProcess // by "pod/name", for the servers startApp started
}

func TestMain(m *testing.M) {
	if name := os.Getenv(scenarioEnv); name != "" {
		os.Exit(runScenario(strings.Fields(name)))
	}
	if addr := os.Getenv(collectorEnv); addr != "" {
		os.Exit(runCollector(addr))
	}
	if app := os.Getenv(appEnv); app != "" {
		os.Exit(runApp(strings.Fields(app)))
	}
	code := m.Run()
	if shared != nil {
		shared.teardown()
	}
	broughtUp.Lock()
	for _, o := range broughtUp.labs {
		o.teardown()
	}
	broughtUp.Unlock()
	os.Exit(code)
}

// setup returns the shared lab, bringing it up on first use.
func setup(t *testing.T) *env {
	t.Helper()
	privileged.Require(t)
	setupOnce.Do(func() { shared, setupErr = bringUp() })
	if setupErr != nil {
		t.Fatalf("lab: %v", setupErr)
	}
	return shared
}

// onceLab is a lab that tests share, brought up on first use and taken down by
// TestMain.
type onceLab struct {
	what    string
	bringUp func() (*env, error)
	once    sync.Once
	env     *env
	err     error
}

// get returns the lab, bringing it up on first use; a failing test logs the end of
// the agents' logs (and the operator's, when the lab runs one).
func (o *onceLab) get(t *testing.T) *env {
	t.Helper()
	privileged.Require(t)
	o.once.Do(func() {
		o.env, o.err = o.bringUp()
		broughtUp.Lock()
		broughtUp.labs = append(broughtUp.labs, o)
		broughtUp.Unlock()
	})
	if o.err != nil {
		t.Fatalf("%s: %v", o.what, o.err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, node := range o.env.lab.Nodes() {
				t.Logf("end of the agent log on %s:\n%s", node, tailFile(o.env.lab.AgentLog(node), 40))
			}
			if log := o.env.lab.OperatorLog(); log != "" {
				t.Logf("end of the operator log:\n%s", tailFile(log, 20))
			}
		}
	})
	return o.env
}

// broughtUp lists every onceLab brought up, for TestMain to take down: a lab left
// out of a hand-kept list outlived the test run (CI left "st" and "is" running).
var broughtUp struct {
	sync.Mutex
	labs []*onceLab
}

func (o *onceLab) teardown() {
	if o.env != nil {
		o.env.teardown()
	}
}

func bringUp() (*env, error) {
	cfg := lab.DefaultConfig()
	cfg.Prefix = prefix
	cfg.PodNet = podNet
	cfg.Services = []lab.ServiceConfig{
		{Name: "web", ClusterIP: webVIP, Port: servicePort, TargetPort: echoPort, Pods: []string{"b", "c", "d"}},
		{Name: "empty", ClusterIP: emptyVIP, Port: servicePort},
		{Name: "echo-c", ClusterIP: echoCVIP, Port: servicePort, TargetPort: echoPort, Pods: []string{"c"}},
		{Name: "banner-c", ClusterIP: bannerCVIP, Port: servicePort, TargetPort: bannerPort, Pods: []string{"c"}},
		{Name: "echo-http-c", ClusterIP: echoHTTPCVIP, Port: servicePort, TargetPort: echoHTTPPort, Pods: []string{"c"}},
	}
	cfg.Services = append(cfg.Services, l7Services...)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	e, err := newEnv(ctx, cfg, "ferry", "ferry-agent")
	if err != nil {
		return nil, err
	}
	for _, pod := range []string{"a", "b", "c", "d"} {
		if err := e.startServer(ctx, pod, echoPort); err != nil {
			return e.fail(err)
		}
		if err := e.startServer(ctx, pod, bannerPort, "--banner", banner); err != nil {
			return e.fail(err)
		}
		if err := e.startFerry(ctx, pod, sinkPort, "bench", "tcp-sink", "--listen", fmt.Sprintf(":%d", sinkPort)); err != nil {
			return e.fail(err)
		}
	}
	if err := e.startServer(ctx, "c", echoHTTPPort, "--http"); err != nil {
		return e.fail(err)
	}
	if err := e.startL7Servers(ctx, l7ServerPods...); err != nil {
		return e.fail(err)
	}
	if err := e.startBulkServer(ctx, "c"); err != nil {
		return e.fail(err)
	}
	return e, nil
}

// newEnv builds the commands of cmd/ (by name: "ferry", "ferry-agent",
// "ferry-operator") into a temporary folder, brings up the lab cfg describes with
// them (its AgentBinary and Operator.Binary are set when those are built) and waits
// until every agent is ready.
func newEnv(ctx context.Context, cfg lab.Config, cmds ...string) (*env, error) {
	bin, err := os.MkdirTemp("", "ferry-e2e-"+cfg.Prefix+"-bin-")
	if err != nil {
		return nil, err
	}
	args := []string{"build", "-o", bin + "/"}
	for _, c := range cmds {
		args = append(args, "github.com/ferrymesh/ferry/cmd/"+c)
	}
	if out, err := exec.CommandContext(ctx, "go", args...).CombinedOutput(); err != nil {
		os.RemoveAll(bin)
		return nil, fmt.Errorf("build binaries: %v\n%s", err, out)
	}
	self, err := os.Executable()
	if err != nil {
		os.RemoveAll(bin)
		return nil, err
	}
	if slices.Contains(cmds, "ferry-agent") {
		cfg.AgentBinary = filepath.Join(bin, "ferry-agent")
	}
	if slices.Contains(cmds, "ferry-operator") {
		cfg.Operator.Binary = filepath.Join(bin, "ferry-operator")
	}
	if slices.Contains(cmds, "ferry") {
		cfg.DNS.Binary = filepath.Join(bin, "ferry") // Service names resolve in the pods
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	l, err := lab.Up(ctx, cfg, log)
	if err != nil {
		os.RemoveAll(bin)
		return nil, err
	}
	e := &env{lab: l, bin: bin, self: self}
	if cfg.AgentBinary != "" {
		for _, node := range l.Nodes() {
			if err := l.WaitAgentReady(ctx, node); err != nil {
				return e.fail(err)
			}
		}
	}
	return e, nil
}

// teardown stops the servers, takes the lab down and removes the binaries.
func (e *env) teardown() {
	for _, s := range e.servers {
		s.Stop()
	}
	if err := e.lab.Down(); err != nil {
		fmt.Fprintln(os.Stderr, "lab down:", err)
	}
	os.RemoveAll(e.bin)
}

// fail tears the environment down and returns err, for a bring-up that failed.
func (e *env) fail(err error) (*env, error) {
	e.teardown()
	return nil, err
}

// startServer runs ferry's echo server in pod on port and waits until it accepts.
func (e *env) startServer(ctx context.Context, pod string, port int, args ...string) error {
	return e.startFerry(ctx, pod, port, append([]string{"lab", "echo-server", "--listen", fmt.Sprintf(":%d", port)}, args...)...)
}

// startFerry runs `ferry ARGS...` in pod as a server on port and waits until it accepts.
func (e *env) startFerry(ctx context.Context, pod string, port int, args ...string) error {
	cmd := e.lab.Command(context.Background(), pod, filepath.Join(e.bin, "ferry"), args...)
	p, err := e.lab.StartInPod(ctx, pod, port, cmd)
	if err != nil {
		return err
	}
	e.servers = append(e.servers, p)
	return nil
}

func (e *env) pod(name string) lab.PodInfo {
	p, ok := e.lab.Pod(name)
	if !ok {
		panic("no pod " + name)
	}
	return p
}

// addr is pod's address on port.
func (e *env) addr(pod string, port int) string {
	return netip.AddrPortFrom(e.pod(pod).IP, uint16(port)).String()
}

// run runs a client scenario as a process in pod (its netns and its node's cgroup,
// so Ferry captures it like any app) and returns its result.
func (e *env) run(t *testing.T, pod string, args ...string) (scenarioResult, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := e.scenarioCommand(ctx, pod, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	return scenarioOutcome(pod, args, out, stderr.String(), err)
}

func (e *env) scenarioCommand(ctx context.Context, pod string, args ...string) *exec.Cmd {
	cmd := e.lab.Command(ctx, pod, e.self, "-test.run=^$")
	cmd.Env = append(cmd.Env, scenarioEnv+"="+strings.Join(args, " "))
	return cmd
}

// scenarioOutcome reads a scenario's JSON line and exit status.
func scenarioOutcome(pod string, args []string, out []byte, stderr string, err error) (scenarioResult, error) {
	var res scenarioResult
	if jerr := json.Unmarshal(bytes.TrimSpace(lastLine(out)), &res); jerr != nil {
		return res, fmt.Errorf("scenario %v in %s: %v (output %q, stderr %q)", args, pod, err, out, stderr)
	}
	// A scenario that failed says why in its JSON line and exits non-zero; either
	// alone is a failure too.
	if res.Err != "" || err != nil {
		return res, fmt.Errorf("scenario %v in %s: %s (exit: %v, stderr %q)", args, pod, res.Err, err, stderr)
	}
	return res, nil
}

// hold opens a connection from pod to addr that stays open, echoing before and after,
// until release is called; release returns the scenario's outcome.
func (e *env) hold(t *testing.T, pod, addr string) (release func() error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	args := []string{"hold", addr}
	cmd := e.scenarioCommand(ctx, pod, args...)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("scenario %v in %s: %v", args, pod, err)
	}
	var once sync.Once
	var outcome error
	release = func() error {
		once.Do(func() {
			stdin.Close()
			werr := cmd.Wait()
			cancel()
			_, outcome = scenarioOutcome(pod, args, stdout.Bytes(), stderr.String(), werr)
		})
		return outcome
	}
	t.Cleanup(func() { release() })
	return release
}

// mustRun is run that fails the test on error.
func (e *env) mustRun(t *testing.T, pod string, args ...string) scenarioResult {
	t.Helper()
	res, err := e.run(t, pod, args...)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

func lastLine(b []byte) []byte {
	b = bytes.TrimSpace(b)
	if i := bytes.LastIndexByte(b, '\n'); i >= 0 {
		return b[i+1:]
	}
	return b
}

// admin returns a client for node's agent admin API.
func (e *env) admin(node string) *admin.Client {
	return admin.NewClient(e.lab.AgentSocket(node))
}

func (e *env) status(t *testing.T, node string) admin.Status {
	t.Helper()
	st, err := e.admin(node).Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// findConn waits for a connection recorded by node's agent that matches.
func (e *env) findConn(t *testing.T, node string, match func(c connRecord) bool) connRecord {
	t.Helper()
	deadline := time.Now().Add(carryWait)
	var seen []connRecord
	for time.Now().Before(deadline) {
		cs, err := e.admin(node).Connections(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		seen = append(cs.Live, cs.Ended...)
		for _, c := range seen {
			if match(c) {
				return c
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("agent on %s recorded no matching connection; it has %d:\n%s", node, len(seen), formatConns(seen))
	return connRecord{}
}

type connRecord = admin.Conn

func formatConns(cs []connRecord) string {
	var b strings.Builder
	for _, c := range cs {
		fmt.Fprintf(&b, "  %s %s %s -> %s %s (%s -> %s) %s\n", c.Direction, c.Security, c.Src, c.Dst, c.Pod, c.SrcIdentity, c.DstIdentity, c.Error)
	}
	return b.String()
}

// maps dumps node's pinned BPF maps through `ferry bpf maps -o json`.
func (e *env) maps(t *testing.T, node string) datapath.MapsDump {
	t.Helper()
	out, err := exec.Command(filepath.Join(e.bin, "ferry"), "bpf", "maps", "--pin-dir", e.pinDir(node), "-o", "json").Output()
	if err != nil {
		t.Fatalf("ferry bpf maps: %v", err)
	}
	var d datapath.MapsDump
	if err := json.Unmarshal(out, &d); err != nil {
		t.Fatalf("ferry bpf maps json: %v", err)
	}
	return d
}

func (e *env) pinDir(node string) string {
	return filepath.Join(lab.BPFRoot, prefix+"-"+node)
}
