package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// The upgrade lab: node1 has pod a, node2 pod c, both enrolled, fed from state
// files. Its pods are in 10.111.0.0/16, apart from the other labs.
const (
	huPrefix = "hu"
	huPodNet = 111
)

// TestUpgradeWithoutFailures: while a opens 200+ new connections a second to c and
// streams on 20 long-lived ones, node1's agent (the source side) is upgraded ten
// times and node2's (the destination side) ten times, each time a new agent
// started beside the running one and taking its listeners over: not one new
// connection fails, no long-lived one breaks, every byte comes back intact, and the
// old agents drain and exit once the long-lived connections end.
//
// Then ten kill -9 restarts (alternating nodes) under new connections only: the
// failed connections per crash and the gap from the kill to the new agent serving
// (p50/p99) are logged, and the pins and map entries are the same as before.
func TestUpgradeWithoutFailures(t *testing.T) {
	e := newUpgradeLab(t)
	caddr := e.addr("c", echoPort)

	// Warm up: the tunnel a→c exists before the count starts.
	e.mustRun(t, "a", "echo", caddr, "64")
	churn := e.churn(t, "a", caddr, 250, 20)
	churn.waitStarted(t)

	var drained []int
	var serving []time.Duration
	for i := range 20 {
		node := "node1"
		if i%2 == 1 {
			node = "node2"
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		u, err := e.lab.UpgradeAgent(ctx, node, 0, false)
		cancel()
		if err != nil {
			t.Fatalf("upgrade %d of %s: %v", i+1, node, err)
		}
		drained = append(drained, u.OldPID)
		serving = append(serving, u.Serving)
		time.Sleep(300 * time.Millisecond) // new connections on the new agent too
	}
	// A plain restart takes the same path: SIGTERM, and the new agent at once.
	for _, node := range []string{"node1", "node2"} {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		r, err := e.lab.RestartAgent(ctx, node, syscall.SIGTERM)
		cancel()
		if err != nil {
			t.Fatalf("restart (SIGTERM) of %s: %v", node, err)
		}
		if r.Stopped == 0 {
			t.Errorf("restart of %s: the old agent pid %d still runs", node, r.OldPID)
		}
		t.Logf("restart (SIGTERM) of %s: new agent ready after %s, old one drained and exited after %s", node, r.Ready, r.Stopped)
		time.Sleep(300 * time.Millisecond)
	}
	res := churn.stop(t)
	t.Logf("20 upgrades (10 per node) and 2 restarts under load: %v in %.1fs; new agent serving after p50 %s, max %s",
		res.Counts, res.Seconds, percentile(serving, 50), percentile(serving, 100))
	if res.Counts["new_ok"] < int64(200*res.Seconds*0.8) {
		t.Errorf("%d new connections in %.1fs: the load was below 200 a second", res.Counts["new_ok"], res.Seconds)
	}
	if res.Counts["new_failed"] != 0 || res.Counts["long_broken"] != 0 || res.Err != "" {
		t.Errorf("connections failed across the upgrades: %v: %s", res.Counts, res.Err)
	}
	if want := int64(20); res.Counts["long_ok"] != want {
		t.Errorf("%d of %d long-lived connections ended intact", res.Counts["long_ok"], want)
	}
	// The long-lived connections have ended, so every old agent drains and exits.
	for _, pid := range drained {
		deadline := time.Now().Add(carryWait)
		for pidRunning(pid) && time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
		}
		if pidRunning(pid) {
			t.Errorf("old agent pid %d still runs %s after its connections ended", pid, carryWait)
		}
	}

	// Crashes: the new agent starts once the old is gone and adopts the pins.
	before := map[string]owned{"node1": e.owned(t, "node1", false), "node2": e.owned(t, "node2", false)}
	crash := e.churn(t, "a", caddr, 200, 0)
	crash.waitStarted(t)
	gaps := map[string][]time.Duration{}
	var all []time.Duration
	for i := range 10 {
		node := "node1"
		if i%2 == 1 {
			node = "node2"
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		r, err := e.lab.RestartAgent(ctx, node, syscall.SIGKILL)
		cancel()
		if err != nil {
			t.Fatalf("kill -9 %d of %s: %v", i+1, node, err)
		}
		gaps[node] = append(gaps[node], r.Ready)
		all = append(all, r.Ready)
		time.Sleep(500 * time.Millisecond)
	}
	res = crash.stop(t)
	t.Logf("10 kill -9 restarts (5 per node): %v, %.1f failed connections per crash; kill→serving p50 %s p99 %s (node1 p50 %s, node2 p50 %s); first failures: %s",
		res.Counts, float64(res.Counts["new_failed"])/10, percentile(all, 50), percentile(all, 99),
		percentile(gaps["node1"], 50), percentile(gaps["node2"], 50), res.Err)
	if res.Counts["new_ok"] == 0 {
		t.Error("no connection succeeded across the crashes")
	}
	// The programs are loaded again by each new agent (new IDs, the same pinned
	// links) and the inbound listener is a new socket; what must not change is
	// which pods are enrolled, the pins, and how many links and listeners there are.
	for node, b := range before {
		if diff := leakView(b).diff(leakView(e.owned(t, node, false))); diff != "" {
			t.Errorf("%s: pins or map entries changed across the crashes:\n%s", node, diff)
		}
		// The crashed agents' programs, replaced in the links, are unloaded.
		after := e.owned(t, node, false)
		for i, p := range b.Programs {
			if i < len(after.Programs) && after.Programs[i].ID != p.ID {
				if out, err := exec.Command("bpftool", "prog", "show", "id", strconv.FormatUint(uint64(p.ID), 10)).CombinedOutput(); err == nil {
					t.Errorf("%s: program %d (%s) of a crashed agent is still loaded: %s", node, p.ID, p.Name, out)
				}
			}
		}
	}
	// And the mesh still carries a→c.
	e.mustRun(t, "a", "echo", caddr, "4096")
}

func newUpgradeLab(t *testing.T) *env {
	t.Helper()
	return newACLab(t, huPrefix, huPodNet)
}

// leakView is what a crash and restart must leave as it was.
func leakView(o owned) owned {
	v := owned{Enrolled: o.Enrolled, Excluded: o.Excluded, Pins: o.Pins}
	for _, in := range o.Inbound {
		in.SocketCookie = 0
		v.Inbound = append(v.Inbound, in)
	}
	for _, p := range o.Programs {
		v.Files = append(v.Files, p.Pin) // the pinned links, without their program IDs
	}
	return v
}

func pidRunning(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	_, rest, _ := cutAfterParen(string(b))
	return len(rest) > 1 && rest[1] != 'Z'
}

// cutAfterParen splits /proc/PID/stat after the command name's closing paren.
func cutAfterParen(s string) (string, string, bool) {
	for i := len(s) - 1; i >= 0; i-- {
		if s[i] == ')' {
			return s[:i+1], s[i+1:], true
		}
	}
	return s, "", false
}

func percentile(ds []time.Duration, p int) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	i := (len(s)*p + 99) / 100
	i = max(1, min(i, len(s)))
	return s[i-1].Round(time.Millisecond)
}

// churnRun is a churn scenario running in a pod until stop.
type churnRun struct {
	stdin   io.WriteCloser
	wait    func() (scenarioResult, error)
	started chan struct{}
}

// churn runs the churn scenario in pod: rate new connections a second to addr,
// each echoing 256 bytes, and long connections streaming, until stop.
func (e *env) churn(t *testing.T, pod, addr string, rate, long int) *churnRun {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	args := []string{"churn", addr, strconv.Itoa(rate), strconv.Itoa(long)}
	cmd := e.scenarioCommand(ctx, pod, args...)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("scenario %v in %s: %v", args, pod, err)
	}
	r := &churnRun{stdin: stdin, started: make(chan struct{})}
	out := make(chan []byte, 1)
	go func() {
		// The scenario writes "started" once its long-lived connections are up.
		b := make([]byte, 8)
		n, _ := io.ReadFull(stdout, b)
		if n == 8 && string(b) == "started\n" {
			close(r.started)
		}
		rest, _ := io.ReadAll(stdout)
		out <- rest
	}()
	var once sync.Once
	var res scenarioResult
	var rerr error
	r.wait = func() (scenarioResult, error) {
		once.Do(func() {
			stdin.Close()
			b := <-out
			werr := cmd.Wait()
			cancel()
			res, rerr = scenarioOutcome(pod, args, b, stderr.String(), werr)
		})
		return res, rerr
	}
	t.Cleanup(func() { r.wait() })
	return r
}

func (r *churnRun) waitStarted(t *testing.T) {
	t.Helper()
	select {
	case <-r.started:
	case <-time.After(carryWait):
		res, err := r.wait()
		t.Fatalf("churn did not start: %v %v", res, err)
	}
}

// stop ends the scenario and returns its tallies; a failure is in res.Err.
func (r *churnRun) stop(t *testing.T) scenarioResult {
	t.Helper()
	res, err := r.wait()
	if res.Counts == nil {
		t.Fatalf("churn: %v", err)
	}
	return res
}

// churnScenario is "churn ADDR RATE LONG": LONG connections stream 4 KiB echoes
// back to back, checking every byte, while RATE new connections a second each echo
// 256 bytes; it runs until stdin ends, then closes the long connections cleanly and
// reports new_ok, new_failed, long_ok, long_broken and long_bytes (the first
// failures in the error).
func churnScenario(name, addr string, args []string) (scenarioResult, bool, error) {
	if name != "churn" {
		return scenarioResult{}, false, nil
	}
	if len(args) < 2 {
		return scenarioResult{}, true, errors.New("usage: churn ADDR RATE LONG")
	}
	rate, _ := strconv.Atoi(args[0])
	long, _ := strconv.Atoi(args[1])
	var (
		newOK, newFailed, longOK, longBroken, longBytes atomic.Int64
		mu                                              sync.Mutex
		failures                                        []string
		stop                                            = make(chan struct{})
		wg                                              sync.WaitGroup
	)
	fail := func(s string) {
		mu.Lock()
		if len(failures) < 10 {
			failures = append(failures, s)
		}
		mu.Unlock()
	}
	start := time.Now()
	var conns []*net.TCPConn
	for i := range long {
		c, err := dial(addr)
		if err != nil {
			return scenarioResult{}, true, fmt.Errorf("long-lived connection %d: %w", i, err)
		}
		conns = append(conns, c)
	}
	for i, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			for {
				select {
				case <-stop:
					// A clean end: our FIN goes through, the server's comes back.
					c.CloseWrite()
					c.SetReadDeadline(time.Now().Add(30 * time.Second))
					if n, err := io.Copy(io.Discard, c); err != nil || n != 0 {
						longBroken.Add(1)
						fail(fmt.Sprintf("long-lived %d at its end: %d stray bytes, %v", i, n, err))
						return
					}
					longOK.Add(1)
					return
				default:
				}
				if err := echo(c, 4096); err != nil {
					longBroken.Add(1)
					fail(fmt.Sprintf("long-lived %d after %s: %v", i, time.Since(start).Round(time.Millisecond), err))
					return
				}
				longBytes.Add(4096)
				time.Sleep(5 * time.Millisecond)
			}
		}()
	}
	os.Stdout.WriteString("started\n")
	go func() {
		io.Copy(io.Discard, os.Stdin)
		close(stop)
	}()
	// New connections at rate, at most 256 in flight.
	sem := make(chan struct{}, 256)
	tick := time.NewTicker(time.Second / time.Duration(rate))
	defer tick.Stop()
loop:
	for {
		select {
		case <-stop:
			break loop
		case <-tick.C:
		}
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			at := time.Since(start).Round(time.Millisecond)
			c, err := dial(addr)
			if err == nil {
				err = echo(c, 256)
				c.Close()
			}
			if err != nil {
				newFailed.Add(1)
				fail(fmt.Sprintf("new at %s: %v", at, err))
				return
			}
			newOK.Add(1)
		}()
	}
	wg.Wait()
	res := scenarioResult{Seconds: time.Since(start).Seconds(), Bytes: longBytes.Load(), Counts: map[string]int64{
		"new_ok": newOK.Load(), "new_failed": newFailed.Load(),
		"long_ok": longOK.Load(), "long_broken": longBroken.Load(), "long_bytes": longBytes.Load(),
	}}
	if len(failures) > 0 {
		return res, true, fmt.Errorf("%v", failures)
	}
	return res, true, nil
}
