package bpf

import (
	"testing"

	"github.com/ferrymesh/ferry/internal/privileged"
)

// TestCountersCountCapture checks that the event counters the agent's metrics read
// count a captured connection once: redirected by connect4, original destination
// recorded by sockops.
func TestCountersCountCapture(t *testing.T) {
	e := newEnv(t, false)
	enrolled := privileged.NewNetns(t)
	if err := e.objs.Enroll(cookie(t, enrolled), "default/client"); err != nil {
		t.Fatal(err)
	}
	addAddr(t, enrolled, "10.1.2.3/32")
	capture := listen(t, enrolled, "tcp4", "127.0.0.1:15001")
	before, err := SumCounters(e.objs.Counters)
	if err != nil {
		t.Fatal(err)
	}
	if len(before) != len(CounterNames()) {
		t.Fatalf("counters %v, want one per name in %v", before, CounterNames())
	}
	for range 2 {
		expectAccept(t, capture, dial(t, e, enrolled, "10.1.2.3:80", 0))
	}
	after, err := SumCounters(e.objs.Counters)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"connect_redirected", "orig_dst_recorded"} {
		if got := after[name] - before[name]; got != 2 {
			t.Errorf("%s counted %d for 2 captured connections", name, got)
		}
	}
	if got := after["inbound_steered"] - before["inbound_steered"]; got != 0 {
		t.Errorf("inbound_steered counted %d with no inbound listener", got)
	}
}
