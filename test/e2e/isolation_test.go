package e2e

// Isolation inside the shared node proxy, on a lab of its own (prefix "is", pods in
// 10.116.0.0/16) with the operator in local mode and small per-pod budgets: pod f
// floods node1's proxy with connections (and holds slow readers) while pod a's
// connection latency to c is measured beside it; and a stale pod claiming c's
// address does not stop a pod enrolled later from being served.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/api/admin"
	"github.com/ferrymesh/ferry/lab"
)

const (
	isPrefix = "is"
	isPodNet = 116
	// isBudget is node agents' --budget-outbound-connections here: small, so the
	// flood meets it at once.
	isBudget = 16
)

var isLab = onceLab{what: "isolation lab", bringUp: isBringUp}

func isBringUp() (*env, error) {
	cfg := lab.Config{
		Prefix:    isPrefix,
		PodNet:    isPodNet,
		AgentArgs: []string{fmt.Sprintf("--budget-outbound-connections=%d", isBudget)},
		Nodes: []lab.NodeConfig{
			{Name: "node1", Pods: []lab.PodConfig{
				{Name: "a", Namespace: "default", ServiceAccount: "a", Enrolled: true},
				{Name: "f", Namespace: "default", ServiceAccount: "f", Enrolled: true},
				{Name: "d", Namespace: "late", ServiceAccount: "d", Enrolled: true},
			}},
			{Name: "node2", Pods: []lab.PodConfig{
				{Name: "c", Namespace: "default", ServiceAccount: "c", Enrolled: true},
			}},
		},
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	e, err := newEnv(ctx, cfg, "ferry", "ferry-agent", "ferry-operator")
	if err != nil {
		return nil, err
	}
	if err := e.startServer(ctx, "c", echoPort); err != nil {
		return e.fail(err)
	}
	return e, nil
}

// latencyResult is what the latency and flood scenarios measured.
type latencyResult struct {
	OK, Failed int
	P50, P99   float64 // milliseconds, of the OK ones
	Refused    int     // flood: connections reset at once (the budget)
	Held       int     // flood: connections carried and held
}

// isolationScenario runs the scenarios of this file:
//   - latency ADDR N: N new connections one after another (every 20 ms), each
//     echoing 64 bytes; the time from dial to the echo is one sample.
//   - flood ADDR N: for N seconds, 64 workers open connections as fast as they can;
//     one carried is held 2 s, one reset waits 100 ms; plus 8 slow readers that
//     write without reading for the whole time. All end by themselves.
func isolationScenario(name, addr string, n int) (scenarioResult, bool, error) {
	switch name {
	case "latency":
		var samples []float64
		res := &latencyResult{}
		for range n {
			start := time.Now()
			err := func() error {
				c, err := dial(addr)
				if err != nil {
					return err
				}
				defer c.Close()
				c.SetDeadline(time.Now().Add(10 * time.Second))
				return echo(c, 64)
			}()
			if err != nil {
				res.Failed++
			} else {
				res.OK++
				samples = append(samples, float64(time.Since(start).Microseconds())/1000)
			}
			time.Sleep(20 * time.Millisecond)
		}
		sort.Float64s(samples)
		if len(samples) > 0 {
			res.P50, res.P99 = samples[len(samples)/2], samples[(len(samples)*99)/100]
		}
		var err error
		if res.Failed > 0 {
			err = fmt.Errorf("%d of %d connections failed", res.Failed, n)
		}
		return scenarioResult{Latency: res}, true, err
	case "flood":
		end := time.Now().Add(time.Duration(n) * time.Second)
		var refused, held atomic.Int64
		var wg sync.WaitGroup
		for range 64 {
			wg.Go(func() {
				for time.Now().Before(end) {
					c, err := net.DialTimeout("tcp", addr, 5*time.Second)
					if err != nil {
						time.Sleep(20 * time.Millisecond)
						continue
					}
					c.SetDeadline(time.Now().Add(5 * time.Second))
					if err := echo(c.(*net.TCPConn), 64); err != nil {
						refused.Add(1)
						c.Close()
						time.Sleep(100 * time.Millisecond)
						continue
					}
					held.Add(1)
					time.Sleep(min(2*time.Second, time.Until(end)))
					c.Close()
				}
			})
		}
		for range 8 { // slow readers: they write and never read the echo
			wg.Go(func() {
				c, err := net.DialTimeout("tcp", addr, 5*time.Second)
				if err != nil {
					return
				}
				defer c.Close()
				c.SetWriteDeadline(end)
				buf := make([]byte, 64<<10)
				for time.Now().Before(end) {
					if _, err := c.Write(buf); err != nil {
						var ne net.Error
						if errors.As(err, &ne) && ne.Timeout() {
							return
						}
						time.Sleep(20 * time.Millisecond)
						return
					}
				}
			})
		}
		wg.Wait()
		return scenarioResult{Latency: &latencyResult{Refused: int(refused.Load()), Held: int(held.Load())}}, true, nil
	}
	return scenarioResult{}, false, nil
}

// A pod flooding the proxy with connections and slow readers meets its budget and
// is refused at once (pod_budget, counted), while another pod of the same node
// keeps its latency: its p99 during the flood stays within 2× its baseline (or 2×
// 5 ms, whichever is larger: below that, the loaded machine's scheduling noise is
// all a p99 shows).
func TestIsolationFloodKeepsOthersLatency(t *testing.T) {
	e := isLab.get(t)
	e.waitEnrolled(t, "node2", "default/c")
	c := e.addr("c", echoPort)
	e.mustRun(t, "a", "echo", c, "4096")

	// The baseline is taken before and after the flood, the larger counting: the
	// machine's own load drifts while the test runs.
	const samples = "300"
	base := e.mustRun(t, "a", "latency", c, samples).Latency
	since := time.Now()
	flood := make(chan scenarioResult, 1)
	go func() {
		res, err := e.run(t, "f", "flood", c, "12")
		if err != nil {
			t.Errorf("flood: %v", err)
		}
		flood <- res
	}()
	time.Sleep(time.Second) // the flood is at its budget
	during := e.mustRun(t, "a", "latency", c, samples).Latency
	fr := (<-flood).Latency
	if fr == nil {
		t.Fatal("no flood result")
	}
	after := e.mustRun(t, "a", "latency", c, samples).Latency
	t.Logf("a's connection latency to c, %s connections each: baseline p50 %.2f ms p99 %.2f ms (after the flood: p50 %.2f ms p99 %.2f ms); during f's flood p50 %.2f ms p99 %.2f ms (flood: %d carried and held, %d refused at once)",
		samples, base.P50, base.P99, after.P50, after.P99, during.P50, during.P99, fr.Held, fr.Refused)
	if bound := 2 * max(base.P99, after.P99, 5); during.P99 > bound {
		t.Errorf("a's p99 %.2f ms during the flood, over 2× its baseline (bound %.2f ms)", during.P99, bound)
	}
	if fr.Refused == 0 {
		t.Fatalf("the flood never met its budget of %d connections", isBudget)
	}
	rec := e.findConn(t, "node1", func(r connRecord) bool {
		return r.Direction == admin.Outbound && r.Pod == "default/f" && r.End.After(since) && r.Reason == admin.ReasonPodBudget
	})
	if rec.Budget != "outbound_connections" || rec.Verdict != admin.VerdictDenied {
		t.Errorf("refusal record %+v", rec)
	}
	m := e.scrape(t, "node1")
	if !strings.Contains(m, `ferry_budget_refusals_total{budget="outbound_connections",pod="default/f"} `) {
		t.Errorf("no refusal counted:\n%s", grepLines(m, "ferry_budget"))
	}
	if strings.Contains(m, `ferry_budget_refusals_total{budget="outbound_connections",pod="default/a"}`) {
		t.Errorf("a was refused too:\n%s", grepLines(m, "ferry_budget"))
	}
	t.Logf("%s", grepLines(m, "ferry_budget_refusals_total{"))
}

// A stale pod claiming c's address (a second Running pod with c's IP, older) is
// withheld by the operator, which says so by name; c keeps its address and its
// mTLS, and a pod enrolled while the conflict stands is served within the usual
// time: the conflict freezes nothing.
func TestIsolationConflictFreezesNothing(t *testing.T) {
	e := isLab.get(t)
	e.waitEnrolled(t, "node2", "default/c")
	if err := e.lab.SetNamespaceEnrolled("late", false); err != nil {
		t.Fatal(err)
	}
	e.waitEnrolled(t, "node1", "default/a", "default/f")
	t.Cleanup(func() { e.lab.SetNamespaceEnrolled("late", true) })

	stale := filepath.Join(e.lab.ManifestDir(), "zz-old-c.yaml")
	manifest := fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata: {name: old-c, namespace: default, uid: 00000000-0000-4000-8000-0000000000cc, creationTimestamp: "2020-01-01T00:00:00Z"}
spec:
  nodeName: node2
  serviceAccountName: c
  containers: [{name: app, image: ferry-lab}]
status: {phase: Running, podIP: %s}
`, e.pod("c").IP)
	if err := os.WriteFile(stale+".tmp", []byte(manifest), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(stale+".tmp", stale); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(stale) })

	deadline := time.Now().Add(30 * time.Second)
	var reported string
	for reported == "" {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		cs, err := e.lab.ConfigStatus(ctx, "node2")
		cancel()
		if err == nil {
			for _, s := range cs {
				if s.GetKind() == "Pod" && s.GetName() == "default/old-c" && len(s.GetConditions()) > 0 && !s.GetConditions()[0].GetStatus() {
					reported = s.GetConditions()[0].GetMessage()
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no conflict status withholding default/old-c; node2 has %v", cs)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("reported to the agents: %s", reported)
	if !strings.Contains(reported, "default/c") || !strings.Contains(reported, "default/old-c") {
		t.Errorf("the status does not name both pods: %s", reported)
	}
	log, _ := os.ReadFile(e.lab.OperatorLog())
	if !slices.ContainsFunc(strings.Split(string(log), "\n"), func(l string) bool {
		return strings.Contains(l, "address conflict") && strings.Contains(l, "default/old-c")
	}) {
		t.Errorf("the operator's log does not name the conflict")
	}
	if st := e.status(t, "node2"); len(st.Dropped) != 0 {
		t.Errorf("node2 left entries out: %v (the operator should have resolved the conflict)", st.Dropped)
	}
	e.mustRun(t, "a", "echo", e.addr("c", echoPort), "4096") // c kept its address, through the tunnel
	cr := e.findConn(t, "node1", func(r connRecord) bool {
		return r.Direction == admin.Outbound && r.Pod == "default/a" && r.Dst.Addr() == e.pod("c").IP
	})
	if cr.Security != admin.MTLS {
		t.Errorf("a→c carried %s while the conflict stands, want mtls", cr.Security)
	}

	start := time.Now()
	if err := e.lab.SetNamespaceEnrolled("late", true); err != nil {
		t.Fatal(err)
	}
	e.waitEnrolled(t, "node1", "default/a", "default/f", "late/d")
	t.Logf("late/d enrolled %s after its namespace joined the mesh, with the conflict present", time.Since(start).Round(time.Millisecond))
	e.mustRun(t, "d", "echo", e.addr("c", echoPort), "4096")
}
