package proxy

import (
	"net/netip"
	"testing"
	"time"
)

func endpoints(n int) []*endpoint {
	eps := make([]*endpoint, n)
	for i := range eps {
		eps[i] = &endpoint{addr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, 0, byte(i)}), 80)}
	}
	return eps
}

// P2C over peak-EWMA sends less to a slow endpoint and to a busy one, and still
// sends some to each, so their estimates stay current.
func TestP2CEWMAPrefersFastAndIdle(t *testing.T) {
	eps := endpoints(3)
	for i, rtt := range []time.Duration{time.Millisecond, time.Millisecond, 20 * time.Millisecond} {
		eps[i].begin()
		eps[i].done(rtt) // 0 and 1 fast (1 busy below), 2 slow
	}
	for range 5 {
		eps[1].begin()
	}
	b := newBalancer("", eps)
	per := map[*endpoint]int{}
	for range 3000 {
		e, _ := b.pick(0, nil)
		per[e]++
	}
	// Of the three pairs the fast idle one wins two, and busy (6 ms) beats slow (20 ms).
	if per[eps[0]] < 1800 || per[eps[1]] < 800 || per[eps[2]] != 0 {
		t.Fatalf("picks fast %d, busy %d, slow %d", per[eps[0]], per[eps[1]], per[eps[2]])
	}
}

// A peak counts at once; afterwards the estimate decays back towards what the
// endpoint answers in now.
func TestPeakEWMA(t *testing.T) {
	e := endpoints(1)[0]
	e.begin()
	e.done(time.Millisecond)
	e.begin()
	e.done(50 * time.Millisecond)
	if e.ewma != float64(50*time.Millisecond) {
		t.Fatalf("after a peak: %v", time.Duration(e.ewma))
	}
	e.stamp = time.Now().Add(-20 * time.Second) // two decay times later
	e.begin()
	e.done(time.Millisecond)
	if got := time.Duration(e.ewma); got > 10*time.Millisecond || got < time.Millisecond {
		t.Fatalf("decayed to %v, want close to 1ms", got)
	}
	if e.pending.Load() != 0 {
		t.Fatalf("pending %d", e.pending.Load())
	}
}

func TestRoundRobinAndEmpty(t *testing.T) {
	eps := endpoints(3)
	b := newBalancer(RoundRobin, eps)
	for i := range 6 {
		if e, _ := b.pick(0, nil); e != eps[i%3] {
			t.Fatalf("pick %d: %v", i, e.addr)
		}
	}
	for _, lb := range []LoadBalancer{"", RoundRobin, Random, LeastRequest, RingHash} {
		if _, ok := newBalancer(lb, nil).pick(0, nil); ok {
			t.Errorf("%q picked from no endpoints", lb)
		}
	}
}
