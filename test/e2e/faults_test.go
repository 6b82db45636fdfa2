package e2e

// Fabric faults between the outage lab's two nodes (ferry lab impair): random loss,
// delay and a partition. Long transfers must come through intact, new connections must
// be carried again soon after the partition heals, and the agents must be left
// with no more goroutines, file descriptors or map entries than before.

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/agent/datapath"
	"github.com/ferrymesh/ferry/lab"
)

// agentResources is what an agent holds: goroutines (its pprof profile), open file
// descriptors (/proc), entries of its per-connection maps, and tunnel streams.
type agentResources struct {
	Goroutines, FDs, MapEntries, Streams int
}

func (r agentResources) String() string {
	return fmt.Sprintf("%d goroutines, %d fds, %d map entries, %d tunnel streams", r.Goroutines, r.FDs, r.MapEntries, r.Streams)
}

// resources reads node's agent's resources.
func (e *env) resources(t *testing.T, node string) agentResources {
	t.Helper()
	var r agentResources
	prof := e.goroutines(node)
	first, _, _ := strings.Cut(prof, "\n")
	n, err := strconv.Atoi(strings.TrimPrefix(first, "goroutine profile: total "))
	if err != nil {
		t.Fatalf("goroutine profile of %s: %q", node, first)
	}
	r.Goroutines = n
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", e.lab.AgentPID(node)))
	if err != nil {
		t.Fatal(err)
	}
	r.FDs = len(fds)
	out, err := exec.Command(filepath.Join(e.bin, "ferry"), "bpf", "maps", "--pin-dir", filepath.Join(lab.BPFRoot, ouPrefix+"-"+node), "-o", "json").Output()
	if err != nil {
		t.Fatalf("ferry bpf maps on %s: %v", node, err)
	}
	var m datapath.MapsDump
	if err := json.Unmarshal(out, &m); err != nil {
		t.Fatal(err)
	}
	r.MapEntries = len(m.OrigDsts) + len(m.Pending) + len(m.LocalSockets)
	r.Streams = e.status(t, node).TunnelStreams
	return r
}

// backToBaseline waits until node's agent holds no more than base, and fails the
// test with what it still holds otherwise. The wait outlasts the tunnel pool's idle
// timeout (90 s): tunnels opened for a load stay pooled, streamless, until then.
func (e *env) backToBaseline(t *testing.T, node string, base agentResources) agentResources {
	t.Helper()
	deadline := time.Now().Add(150 * time.Second)
	for {
		r := e.resources(t, node)
		if r.Goroutines <= base.Goroutines && r.FDs <= base.FDs && r.MapEntries <= base.MapEntries && r.Streams <= base.Streams {
			return r
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent on %s holds %s 150 s later, baseline %s; goroutines:\n%s", node, r, base, e.goroutines(node))
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// impair sets the impairment of both nodes of the outage lab, healing them at the
// end of the test whatever happens.
func (e *env) impair(t *testing.T, imp lab.Impairment, nodes ...string) {
	t.Helper()
	for _, n := range nodes {
		if err := e.lab.Impair(n, imp); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { e.lab.Impair(n, lab.Impairment{}) })
	}
}

// echoClient runs `ferry lab echo-client` in pod: bytes of a pattern to addr,
// checked byte for byte on the way back.
func (e *env) echoClient(ctx context.Context, pod, addr, bytes string, timeout time.Duration) error {
	cmd := e.lab.Command(ctx, pod, filepath.Join(e.bin, "ferry"), "lab", "echo-client", "--to", addr, "--bytes", bytes, "--timeout", timeout.String())
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("echo-client %s to %s: %w: %s", bytes, addr, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// faultsBaseline waits for the outage lab's pods to be enrolled, warms the tunnel a→c
// (so that it is pooled before the baseline is read) and reads both agents' resources.
func faultsBaseline(t *testing.T) (e *env, addr string, base map[string]agentResources) {
	t.Helper()
	e = ouSetup(t)
	e.waitEnrolled(t, "node1", "ops/a", "ops/b")
	e.waitEnrolled(t, "node2", "ops/c")
	addr = e.addr("c", echoPort)
	if err := e.echoClient(t.Context(), "a", addr, "64KiB", 30*time.Second); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	return e, addr, map[string]agentResources{"node1": e.resources(t, "node1"), "node2": e.resources(t, "node2")}
}

// With 5% loss each way between the nodes, then a 10 s partition in the middle of
// long transfers: 64 MiB echoed intact each time, new connections carried again
// within 2 s of the partition healing, and both agents back to their baseline.
func TestFaultsLossAndPartition(t *testing.T) {
	e, addr, base := faultsBaseline(t)
	ctx := t.Context()
	t.Logf("baseline: node1 %s; node2 %s", base["node1"], base["node2"])

	// Loss: 5% of the packets each node sends to the fabric.
	e.impair(t, lab.Impairment{Loss: 0.05}, "node1", "node2")
	start := time.Now()
	if err := e.echoClient(ctx, "a", addr, "64MiB", 3*time.Minute); err != nil {
		t.Fatalf("64 MiB with 5%% loss: %v", err)
	}
	d1, _ := e.lab.Impaired("node1")
	d2, _ := e.lab.Impaired("node2")
	t.Logf("5%% loss: 64 MiB echoed intact across nodes in %s (%d + %d packets dropped)", time.Since(start).Round(time.Millisecond), d1, d2)
	if d1 == 0 || d2 == 0 {
		t.Fatalf("the loss dropped nothing (%d, %d): the impairment does not apply", d1, d2)
	}
	e.impair(t, lab.Impairment{}, "node1", "node2")

	// Partition: two 64 MiB transfers under 5% loss (so they run long), a partition
	// of 10 s in their middle, and a probe of new connections meanwhile.
	e.impair(t, lab.Impairment{Loss: 0.05}, "node1", "node2")
	var wg sync.WaitGroup
	errs := make([]error, 2)
	ended := make([]time.Time, 2)
	for i := range errs {
		wg.Go(func() {
			errs[i] = e.echoClient(ctx, "a", addr, "64MiB", 3*time.Minute)
			ended[i] = time.Now()
		})
	}
	time.Sleep(time.Second)
	e.impair(t, lab.Impairment{Partition: true}, "node2")
	parted := time.Now()
	time.Sleep(10 * time.Second)
	e.impair(t, lab.Impairment{}, "node1", "node2")
	healed := time.Now()
	// New connections, each given 1 s, until one is carried.
	var back time.Duration
	for {
		pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err := e.echoClient(pctx, "a", addr, "64", time.Second)
		cancel()
		if err == nil {
			back = time.Since(healed) // carried by then: an upper bound
			break
		}
		if time.Since(healed) > 30*time.Second {
			t.Fatalf("no new connection a→c carried 30 s after the partition healed: %v", err)
		}
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("transfer %d across the %s partition: %v", i, healed.Sub(parted).Round(time.Millisecond), err)
		}
		if ended[i].Before(healed) {
			t.Errorf("transfer %d ended before the partition healed: it did not span it", i)
		}
	}
	t.Logf("partition of %s: both 64 MiB transfers intact; a new connection was carried within %s of it healing; the transfers ended %s and %s after it healed", healed.Sub(parted).Round(time.Millisecond), back.Round(time.Millisecond), ended[0].Sub(healed).Round(time.Millisecond), ended[1].Sub(healed).Round(time.Millisecond))
	if back > 2*time.Second {
		t.Errorf("a new connection was carried only %s after the partition healed, want within 2 s", back.Round(time.Millisecond))
	}
	for _, node := range []string{"node1", "node2"} {
		r := e.backToBaseline(t, node, base[node])
		t.Logf("%s after the faults: %s (baseline %s)", node, r, base[node])
	}
}

// roundTrip is the median of n round trips of 64 bytes from pod to addr over one
// connection through the mesh (`ferry lab echo-client --round-trips`).
func (e *env) roundTrip(t *testing.T, pod, addr string, n int) time.Duration {
	t.Helper()
	cmd := e.lab.Command(t.Context(), pod, filepath.Join(e.bin, "ferry"), "lab", "echo-client", "--to", addr, "--round-trips", strconv.Itoa(n), "--bytes", "64", "--timeout", "1m")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("round trips %s to %s: %v: %s", pod, addr, err, out)
	}
	for _, f := range strings.Fields(string(out)) {
		if v, ok := strings.CutPrefix(f, "p50="); ok {
			d, err := time.ParseDuration(v)
			if err != nil {
				t.Fatalf("round trips: %q: %v", out, err)
			}
			return d
		}
	}
	t.Fatalf("round trips: no p50 in %q", out)
	return 0
}

// delayQueued says whether node's namespace still has the delay line's queue bound
// (a line left behind).
func (e *env) delayQueued(t *testing.T, node string) string {
	t.Helper()
	ns, err := e.lab.NetnsPath(node)
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("nsenter", "--net="+ns, "--", "cat", "/proc/net/netfilter/nfnetlink_queue").Output()
	if err != nil {
		t.Fatalf("nfnetlink_queue of %s: %v", node, err)
	}
	return strings.TrimSpace(string(out))
}

// With 50 ms of delay on each node's uplink, then 50 ms and 5% loss: the round trip
// through the mesh grows by the 2 × 50 ms, 64 MiB are echoed intact across nodes while
// new connections keep being carried, and once healed no delay queue, goroutine, fd
// or map entry is left behind.
func TestFaultsDelay(t *testing.T) {
	e, addr, base := faultsBaseline(t)
	ctx := t.Context()
	baseRTT := e.roundTrip(t, "a", addr, 20)
	t.Logf("baseline: round trip a→c %s; node1 %s; node2 %s", baseRTT, base["node1"], base["node2"])

	const delay = 50 * time.Millisecond
	for _, imp := range []lab.Impairment{{Delay: delay}, {Delay: delay, Loss: 0.05}} {
		name := fmt.Sprintf("%s delay", imp.Delay)
		if imp.Loss > 0 {
			name += fmt.Sprintf(" and %g%% loss", imp.Loss*100)
		}
		e.impair(t, imp, "node1", "node2")
		rtt := e.roundTrip(t, "a", addr, 10)
		if rtt < 2*delay {
			t.Fatalf("%s on both nodes: round trip a→c %s, want at least 2×%s: the delay does not apply", name, rtt, delay)
		}
		// 64 MiB across, and meanwhile new connections, one after another.
		start := time.Now()
		done := make(chan error, 1)
		go func() { done <- e.echoClient(ctx, "a", addr, "64MiB", 3*time.Minute) }()
		conns := 0
		var transfer error
	probe:
		for {
			if err := e.echoClient(ctx, "a", addr, "1KiB", 30*time.Second); err != nil {
				t.Errorf("%s: new connection %d a→c: %v", name, conns+1, err)
			} else {
				conns++
			}
			select {
			case transfer = <-done:
				break probe
			default:
			}
		}
		took := time.Since(start)
		if transfer != nil {
			t.Fatalf("64 MiB with %s: %v", name, transfer)
		}
		var stats []string
		for _, node := range []string{"node1", "node2"} {
			s, ok, err := e.lab.Delayed(node)
			if err != nil || !ok || s.Delayed == 0 {
				t.Fatalf("%s: delay line of %s: %+v, running %v, %v", name, node, s, ok, err)
			}
			dropped, _ := e.lab.Impaired(node)
			stats = append(stats, fmt.Sprintf("%s %d packets delayed, %d dropped by the loss, %d by the full delay queue, %d not handed to the line", node, s.Delayed, dropped, s.QueueDropped, s.UserDropped))
		}
		t.Logf("%s on both nodes: round trip a→c %s (baseline %s); 64 MiB echoed intact in %s, %d new connections carried meanwhile; %s", name, rtt, baseRTT, took.Round(time.Millisecond), conns, strings.Join(stats, "; "))
		e.impair(t, lab.Impairment{}, "node1", "node2")
	}

	for _, node := range []string{"node1", "node2"} {
		if _, ok, _ := e.lab.Delayed(node); ok {
			t.Errorf("%s: a delay line still runs after healing", node)
		}
		if q := e.delayQueued(t, node); q != "" {
			t.Errorf("%s: a queue is still bound after healing: %s", node, q)
		}
		r := e.backToBaseline(t, node, base[node])
		t.Logf("%s after the delay: %s (baseline %s)", node, r, base[node])
	}
	t.Logf("round trip a→c after healing: %s", e.roundTrip(t, "a", addr, 20))
}
