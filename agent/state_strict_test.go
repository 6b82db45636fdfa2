package agent

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/ferrymesh/ferry/api/ferryv1"
	"github.com/ferrymesh/ferry/bpf"
)

func TestStrictPortsFromState(t *testing.T) {
	st := &ferryv1.NodeState{Node: "n1", Workloads: []*ferryv1.Workload{
		{Name: "a", Namespace: "default", Node: "n1", Ips: []string{"10.1.1.10", "fd00::10"}, MtlsMode: "Strict",
			PortMtlsModes: map[uint32]string{8080: "Permissive", 9090: "Strict"}},
		{Name: "b", Namespace: "default", Node: "n1", Ips: []string{"10.1.1.11"}, PortMtlsModes: map[uint32]string{5432: "Strict"}},
		{Name: "c", Namespace: "default", Node: "n1", Ips: []string{"10.1.1.12"}, MtlsMode: "Permissive"},
		{Name: "d", Namespace: "default", Node: "n2", Ips: []string{"10.1.2.10"}, MtlsMode: "Strict"},
	}}
	got, err := strictPorts(st, "n1")
	if err != nil {
		t.Fatal(err)
	}
	a4, a6, b := netip.MustParseAddr("10.1.1.10"), netip.MustParseAddr("fd00::10"), netip.MustParseAddr("10.1.1.11")
	want := []bpf.StrictPort{
		{IP: a4, Mode: bpf.MTLSStrict}, {IP: a4, Port: 8080, Mode: bpf.MTLSPermissive},
		{IP: a6, Mode: bpf.MTLSStrict}, {IP: a6, Port: 8080, Mode: bpf.MTLSPermissive},
		{IP: b, Port: 5432, Mode: bpf.MTLSStrict},
	}
	if !slices.Equal(got, want) {
		t.Fatalf("strict ports\n%v\nwant (9090 repeats a's own mode; c needs none; d is on n2)\n%v", got, want)
	}
	for _, tc := range []struct {
		w    *ferryv1.Workload
		says string
	}{
		{&ferryv1.Workload{Name: "x", MtlsMode: "strict"}, `workloads[0] (/x): mtls mode "strict"`},
		{&ferryv1.Workload{Name: "x", PortMtlsModes: map[uint32]string{80: "Off"}}, `port_mtls_modes[80]: mtls mode "Off"`},
		{&ferryv1.Workload{Name: "x", PortMtlsModes: map[uint32]string{70000: "Strict"}}, "port 70000 out of range"},
	} {
		_, err := strictPorts(&ferryv1.NodeState{Workloads: []*ferryv1.Workload{tc.w}}, "n1")
		if err == nil || !strings.Contains(err.Error(), tc.says) {
			t.Errorf("%v: %v, want an error saying %q", tc.w, err, tc.says)
		}
	}
}

// TestStrictBeforeListeners checks that the agent writes a STRICT pod's modes to
// the kernel before the proxy opens the pod's listeners, and that a set the kernel
// cannot hold refuses the state, keeping the last good one.
func TestStrictBeforeListeners(t *testing.T) {
	ta := newTestAgent(t)
	ta.netns.add(podA.ip)
	st := ta.state(t, 1, podA)
	st.Workloads[0].MtlsMode = "Strict"
	ta.writeState(t, st)
	if err := ta.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	defer ta.Stop(context.Background())
	ev := ta.ev.all()
	si, ai := slices.Index(ev, "strict 1"), slices.Index(ev, "serve default/a")
	if si < 0 || ai < 0 || si > ai {
		t.Fatalf("events %v: want STRICT in the kernel before the pod is served", ev)
	}

	ta.capture.mu.Lock()
	ta.capture.strictErr = bpf.ErrStrictFull
	ta.capture.mu.Unlock()
	next := ta.state(t, 2, podA, podB)
	next.Workloads[1].MtlsMode = "Strict"
	err := ta.Apply(next)
	if !errors.Is(err, bpf.ErrStrictFull) {
		t.Fatalf("apply with a full map: %v, want ErrStrictFull", err)
	}
	if v := ta.stateVersion(); v != 1 {
		t.Fatalf("state version %d after a refused state, want 1", v)
	}
}
