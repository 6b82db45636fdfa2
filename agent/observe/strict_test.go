package observe

import (
	"log/slog"
	"net/netip"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/agent/flows"
	"github.com/ferrymesh/ferry/api/ferryv1"
)

func TestStrictRefusedFlow(t *testing.T) {
	o := New(DefaultConfig(), "node1", Sources{}, slog.New(slog.DiscardHandler))
	o.SetState(&ferryv1.NodeState{Workloads: []*ferryv1.Workload{
		{Name: "c", Namespace: "default", Node: "node1", Identity: "spiffe://cluster.local/ns/default/sa/c", Ips: []string{"10.1.1.12"}},
	}})
	o.StrictRefused(netip.MustParseAddrPort("10.1.9.9:40000"), netip.MustParseAddrPort("10.1.1.12:8080"), time.Now())
	fs := o.ring.Flows(flows.Query{})
	if len(fs) != 1 {
		t.Fatalf("%d flows, want 1", len(fs))
	}
	f := fs[0]
	if f.GetVerdict() != ferryv1.Verdict_VERDICT_DROPPED || f.GetReason() != "strict_mtls" || f.GetDirection() != "inbound" || f.GetSecurity() != "plaintext" {
		t.Errorf("flow %v: want an inbound plaintext DROPPED flow, reason strict_mtls", f)
	}
	if d := f.GetDestination(); d.GetPod() != "c" || d.GetNamespace() != "default" || d.GetPort() != 8080 || d.GetIdentity() == "" {
		t.Errorf("destination %v, want default/c:8080 with its identity", d)
	}
	if s := f.GetSource(); s.GetIp() != "10.1.9.9" || s.GetPod() != "" || s.GetIdentity() != "" {
		t.Errorf("source %v, want 10.1.9.9 with no pod or identity", s)
	}
	if !flows.Match(f, &ferryv1.FlowFilter{Verdict: []string{"dropped"}}) {
		t.Error("the flow does not match --verdict dropped")
	}
}
