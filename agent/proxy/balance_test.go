package proxy

import (
	"fmt"
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

// Ring hash keeps a key on one endpoint; removing one of 4 endpoints moves only
// the keys it had, about a quarter of them, and a key passes an unusable endpoint
// to the one it would go to were that endpoint removed.
func TestRingHashStable(t *testing.T) {
	eps := endpoints(4)
	all := newBalancer(RingHash, eps)
	three := newBalancer(RingHash, eps[:3])
	const keys = 10000
	moved, onRemoved := 0, 0
	for k := range keys {
		key := hashKey(fmt.Sprintf("user-%d", k))
		e, _ := all.pick(key, nil)
		for range 3 {
			if again, _ := all.pick(key, nil); again != e {
				t.Fatalf("key %d went to %v then %v", k, e.addr, again.addr)
			}
		}
		after, _ := three.pick(key, nil)
		if after != e {
			moved++
			if e != eps[3] {
				t.Fatalf("key %d moved from %v, which stayed", k, e.addr)
			}
		}
		if e == eps[3] {
			onRemoved++
		}
		skipped, _ := all.pick(key, func(c *endpoint) bool { return c != eps[3] })
		if skipped != after {
			t.Fatalf("key %d: past the unusable endpoint %v, without it %v", k, skipped.addr, after.addr)
		}
	}
	if moved != onRemoved || moved < keys*15/100 || moved > keys*35/100 {
		t.Fatalf("%d of %d keys moved (%d were on the removed endpoint), want about 25%% ± 10", moved, keys, onRemoved)
	}
}

// Every balancer skips what usable refuses, and finds the one endpoint it accepts.
func TestBalancersSkipUnusable(t *testing.T) {
	eps := endpoints(5)
	for _, lb := range []LoadBalancer{"", RoundRobin, Random, LeastRequest, RingHash} {
		b := newBalancer(lb, eps)
		for i := range 50 {
			e, ok := b.pick(uint64(i)*0x9e3779b97f4a7c15, func(e *endpoint) bool { return e == eps[3] })
			if !ok || e != eps[3] {
				t.Fatalf("%q picked %v, want the only usable one", lb, e)
			}
		}
		if _, ok := b.pick(1, func(*endpoint) bool { return false }); ok {
			t.Fatalf("%q picked an unusable endpoint", lb)
		}
	}
}
