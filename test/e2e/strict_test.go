package e2e

// STRICT mTLS end to end, on a lab of its own (prefix "st", pods in 10.112.0.0/16)
// with the operator in local mode. node1 runs a (enrolled) and d (not enrolled);
// node2 runs c (enrolled) with servers on two ports, and b (enrolled). With a PeerAuthentication
// STRICT on c, plaintext from d is refused in c's kernel (sk_lookup), which the
// proxy never sees: node2's plaintext accepts stay where they were, and the
// refusal is counted and is a DROPPED flow with reason strict_mtls. mTLS from a
// and b's same-node delivery (the agent's hop from 127.0.0.6) keep working; a per-port PERMISSIVE override opens that port only; a kill -9
// of node2's agent leaves plaintext refused; PERMISSIVE again lets d through.

import (
	"context"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/lab"
)

const (
	stPrefix = "st"
	stPodNet = 112
	// stOpenPort is c's second server, the one the per-port override opens.
	stOpenPort = 8081
)

var stLab = onceLab{what: "strict mTLS lab", bringUp: stBringUp}

func stBringUp() (*env, error) {
	cfg := lab.Config{
		Prefix: stPrefix,
		PodNet: stPodNet,
		Nodes: []lab.NodeConfig{
			{Name: "node1", Pods: []lab.PodConfig{
				{Name: "a", Namespace: "shop", ServiceAccount: "web", Enrolled: true},
				{Name: "d", Namespace: "shop", ServiceAccount: "outsider"},
			}},
			{Name: "node2", Pods: []lab.PodConfig{
				{Name: "c", Namespace: "shop", ServiceAccount: "db", Enrolled: true},
				{Name: "b", Namespace: "shop", ServiceAccount: "api", Enrolled: true},
			}},
		},
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	e, err := newEnv(ctx, cfg, "ferry", "ferry-agent", "ferry-operator")
	if err != nil {
		return nil, err
	}
	for _, port := range []int{echoPort, stOpenPort} {
		if err := e.startServer(ctx, "c", port); err != nil {
			return e.fail(err)
		}
	}
	return e, nil
}

func TestStrictMTLS(t *testing.T) {
	e := stLab.get(t)
	e.waitEnrolled(t, "node1", "shop/a")
	e.waitEnrolled(t, "node2", "shop/b", "shop/c")
	caddr, open := e.addr("c", echoPort), e.addr("c", stOpenPort)
	// node2's proxy accepting a plaintext connection (its 15006 listener): each
	// counts in istio_tcp_connections_opened_total at accept time.
	plaintextAccepts := func() float64 {
		return metricSum(e.scrape(t, "node2"), "istio_tcp_connections_opened_total", `reporter="destination"`, `connection_security_policy="none"`)
	}
	refusals := func() float64 {
		return metricSum(e.scrape(t, "node2"), "ferry_datapath_events_total", `event="strict_refused"`)
	}

	// PERMISSIVE (no PeerAuthentication): d's plaintext reaches c through the proxy.
	before := plaintextAccepts()
	e.mustRun(t, "d", "echo", caddr, "4096")
	if got := plaintextAccepts(); got <= before {
		t.Fatalf("a PERMISSIVE plaintext connection was not counted (%v, then %v): the counter this test relies on counts nothing", before, got)
	}

	since := time.Now()
	e.apply(t, "strict-c.yaml", `apiVersion: ferry.io/v1alpha1
kind: PeerAuthentication
metadata: {name: strict-c, namespace: shop, generation: {gen}}
spec:
  selector: {matchLabels: {app: c}}
  mtls: {mode: Strict}
  portLevelMtls: {`+strconv.Itoa(stOpenPort)+`: {mode: Permissive}}
`)
	if cs := e.configStatus(t, "node2", "PeerAuthentication shop/strict-c"); len(cs.GetConditions()) == 0 || !cs.GetConditions()[0].GetStatus() {
		t.Fatalf("status %v", cs)
	}
	accepts, refused := plaintextAccepts(), refusals()
	e.mustRun(t, "d", "refused", caddr)
	e.mustRun(t, "d", "refused", caddr)
	e.mustRun(t, "a", "echo", caddr, "65536") // mTLS from an enrolled pod
	e.mustRun(t, "b", "echo", caddr, "65536") // same node: the agent delivers from 127.0.0.6
	e.mustRun(t, "d", "echo", open, "4096")   // the PERMISSIVE port
	e.mustRun(t, "a", "echo", open, "4096")   // and mTLS to it
	if got := refusals() - refused; got != 2 {
		t.Errorf("strict_refused counted %v for 2 refused connections", got)
	}
	if got := plaintextAccepts() - accepts; got != 1 {
		t.Errorf("node2's proxy accepted %v plaintext connections, want 1 (the PERMISSIVE port's): the refused ones must never reach it", got)
	}
	flows := e.observeLab(t, stPrefix, "--verdict", "dropped", "--to-pod", "shop/c")
	var drops int
	for _, f := range flows {
		if f.GetReason() == "strict_mtls" && f.GetTime().AsTime().After(since) && f.GetSource().GetIp() == e.pod("d").IP.String() &&
			f.GetDestination().GetPort() == echoPort && f.GetNode() == "node2" {
			drops++
		}
	}
	if drops != 2 {
		for _, f := range flows {
			t.Log(flowText(f))
		}
		t.Fatalf("%d strict_mtls flows from d to c:%d, want 2", drops, echoPort)
	}

	// With node2's agent killed, the pinned map keeps refusing plaintext.
	if err := e.lab.StopAgent("node2", syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	e.mustRun(t, "d", "refused", caddr)
	if err := e.lab.StartAgent("node2"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := e.lab.WaitAgentReady(ctx, "node2"); err != nil {
		t.Fatal(err)
	}
	e.waitEnrolled(t, "node2", "shop/b", "shop/c")
	e.mustRun(t, "d", "refused", caddr)
	e.mustRun(t, "a", "echo", caddr, "4096")

	// Back to PERMISSIVE: plaintext goes through again, measured from the write.
	start := time.Now()
	applied := e.reapply(t, "strict-c.yaml", `apiVersion: ferry.io/v1alpha1
kind: PeerAuthentication
metadata: {name: strict-c, namespace: shop, generation: {gen}}
spec:
  selector: {matchLabels: {app: c}}
  mtls: {mode: Permissive}
`)
	e.mustRun(t, "d", "echo", caddr, "4096")
	took := time.Since(start)
	t.Logf("PERMISSIVE again: node2's agent applied it %v after the write; d's plaintext echo done %v after it", applied["node2"], took)
	if applied["node2"] > time.Second {
		t.Errorf("node2 applied PERMISSIVE %v after the manifest was written, want within 1 s", applied["node2"])
	}
}
