package proxy

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"
)

// A new state keeps what an unchanged Service's policy has counted: its state,
// its endpoints' ejections and its pods' buckets; a changed rate limit starts a
// new bucket.
func TestStateSwapKeepsPolicyState(t *testing.T) {
	pol := Policy{Outlier: &OutlierDetection{Consecutive5xx: 1, BaseEjection: time.Minute, MaxEjectionPercent: 100}, RateLimit: &RateLimit{PerSecond: 10, Burst: 2}}
	svc := Service{Name: "default/web", VIPs: []netip.Addr{vip}, Ports: []ServicePort{{Port: 80}}, Policy: pol,
		Backends: []Backend{{IPs: wb.IPs, Ready: true, Ports: []uint16{8080}}, {IPs: wc.IPs, Ready: true, Ports: []uint16{8080}}}}
	t1 := buildServices([]Service{svc}, nil)
	st := t1.states["default/web"]
	ep := t1.endpoints[netip.AddrPortFrom(wb.IPs[0], 8080)]
	st.observe(slog.New(slog.DiscardHandler), ep, pol.Outlier, 500)
	bucket := t1.buckets[wb.IPs[0]]
	bucket.take(time.Now())
	st.retries.Add(7)

	t2 := buildServices([]Service{svc}, &t1)
	if t2.states["default/web"] != st || t2.endpoints[ep.addr] != ep || t2.buckets[wb.IPs[0]] != bucket {
		t.Fatal("a new state replaced the policy state of an unchanged Service")
	}
	if !ep.outlier.ejected(time.Now()) || st.retries.Load() != 7 || st.ejections.Load() != 1 {
		t.Fatal("a new state forgot an ejection or a counter")
	}
	v, _, _ := t2.lookup(netip.AddrPortFrom(vip, 80))
	for range 20 {
		if e, _ := v.balancer.pick(0, func(e *endpoint) bool { return !e.outlier.ejected(time.Now()) }); e == ep {
			t.Fatal("the ejected endpoint was picked after the swap")
		}
	}

	changed := svc
	changed.Policy.RateLimit = &RateLimit{PerSecond: 20}
	t3 := buildServices([]Service{changed}, &t2)
	if b := t3.buckets[wb.IPs[0]]; b == bucket || b.limit.PerSecond != 20 || b.limit.Burst != 20 {
		t.Fatalf("bucket %+v after the limit changed", b)
	}
	if t3.states["default/web"].policy.Load().RateLimit.PerSecond != 20 {
		t.Fatal("the new policy is not in force")
	}
}

// 100 req/s allowed, 300 req/s offered: about 200 req/s answered 429.
func TestTokenBucketShare(t *testing.T) {
	b := newTokenBucket(RateLimit{PerSecond: 100})
	now := b.last
	refused := 0
	const seconds = 10
	for i := range 300 * seconds {
		if !b.take(now.Add(time.Duration(i) * time.Second / 300)) {
			refused++
		}
	}
	// The first second also spends the burst (100).
	if per := refused / seconds; per < 185 || per > 200 {
		t.Fatalf("%d req/s refused, want about 200", per)
	}
}

// Retries are allowed up to the budget's share of the requests in its window plus
// its minimum, and requests older than the window stop counting.
func TestRetryBudgetWindow(t *testing.T) {
	var b retryBudget
	rb := RetryBudget{Percent: 20, MinPerSecond: 1, TTL: 10 * time.Second}
	now := time.Now()
	for range 100 {
		b.request(rb, now)
	}
	allowed := 0
	for b.withdraw(rb, now) {
		allowed++
	}
	if allowed != 30 { // 20% of 100, plus 1/s over 10 s
		t.Fatalf("%d retries allowed, want 30", allowed)
	}
	later := now.Add(11 * time.Second)
	b.request(rb, later)
	allowed = 0
	for b.withdraw(rb, later) {
		allowed++
	}
	if allowed != 10 { // 20% of 1 rounds down; the minimum stays
		t.Fatalf("%d retries allowed after the window, want 10", allowed)
	}
	if got := budgetOf(&Policy{}); got != defaultRetryBudget {
		t.Fatalf("default budget %+v", got)
	}
}

// A gate admits max holders, keeps maxPending waiting in order and refuses the
// rest; a waiter that gives up frees its place.
func TestGate(t *testing.T) {
	var g gate
	var pending atomic.Int64
	ctx := context.Background()
	for range 2 {
		if err := g.acquire(ctx, 2, 1, &pending); err != nil {
			t.Fatal(err)
		}
	}
	gave := make(chan error)
	cctx, cancel := context.WithCancel(ctx)
	go func() { gave <- g.acquire(cctx, 2, 1, &pending) }()
	for pending.Load() != 1 {
		time.Sleep(time.Millisecond)
	}
	if err := g.acquire(ctx, 2, 1, &pending); !errors.Is(err, errCircuitOpen) {
		t.Fatalf("past max pending: %v", err)
	}
	cancel()
	if err := <-gave; !errors.Is(err, context.Canceled) {
		t.Fatalf("waiter: %v", err)
	}
	got := make(chan error)
	go func() { got <- g.acquire(ctx, 2, 1, &pending) }()
	for pending.Load() != 1 {
		time.Sleep(time.Millisecond)
	}
	g.release()
	if err := <-got; err != nil {
		t.Fatal(err)
	}
	if g.active != 2 || pending.Load() != 0 {
		t.Fatalf("active %d pending %d", g.active, pending.Load())
	}
}

// chance lands within ±2 points of its percent over 10,000 draws.
func TestChance(t *testing.T) {
	hits := 0
	for range 10000 {
		if chance(10) {
			hits++
		}
	}
	if hits < 800 || hits > 1200 {
		t.Fatalf("%d of 10000, want 1000 ± 200", hits)
	}
	if chance(0) {
		t.Fatal("0% happened")
	}
}

// Backoff is jittered under an exponential bound from its base, capped.
func TestBackoff(t *testing.T) {
	for n := 1; n < 20; n++ {
		bound := min(defaultRetryBackoff<<(n-1), defaultRetryBackoff*maxBackoffFactor)
		if d := backoff(0, n); d <= 0 || d > bound {
			t.Fatalf("retry %d waits %v, bound %v", n, d, bound)
		}
	}
}
