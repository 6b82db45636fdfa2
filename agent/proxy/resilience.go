// This file keeps what a Service's TrafficPolicy enforces across the node: its
// connection pool limits (circuit breaking), retry budget, outlier detection of its
// endpoints, and the rate limit of each local pod it reaches. The state lives as
// long as the Service does, so a new NodeState keeps counters and ejections.

package proxy

import (
	"context"
	"errors"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ferrymesh/ferry/api/admin"
)

// Defaults of a policy's fields left 0, Envoy's and Linkerd's.
const (
	defaultBaseEjection       = 30 * time.Second
	defaultEjectionInterval   = 10 * time.Second
	defaultMaxEjectionPercent = 10
	maxEjection               = 300 * time.Second
	defaultRetryBackoff       = 25 * time.Millisecond
	// maxBackoffFactor caps the exponential backoff at this many times its base.
	maxBackoffFactor = 10
	// replayLimit is the most of a request body kept to send it again on a retry.
	replayLimit = 64 << 10
)

// defaultRetryBudget is Linkerd's: retries may add 20% to the requests, plus 10 a
// second, over 10 s.
var defaultRetryBudget = RetryBudget{Percent: 20, MinPerSecond: 10, TTL: 10 * time.Second}

// errCircuitOpen is a request refused because the Service's limits are reached.
var errCircuitOpen = errors.New("circuit open")

// ServiceStats counts what a Service's policy did on this node.
type ServiceStats struct {
	CircuitOpen uint64 // requests refused past the connection pool limits
	Retries     uint64 // tries after the first
	RetriesOver uint64 // retries not made: the retry budget was spent
	Ejections   uint64 // endpoint ejections by outlier detection
	FaultAborts uint64
	FaultDelays uint64
	EjectedNow  int // endpoints out at the moment
	Endpoints   int // endpoints it balances over, for EjectedNow's share
}

// ServiceStats returns each Service's policy counters (namespace/name keys).
func (p *Proxy) ServiceStats() map[string]ServiceStats {
	p.mu.RLock()
	defer p.mu.RUnlock()
	now := time.Now()
	out := make(map[string]ServiceStats, len(p.services.states))
	for name, st := range p.services.states {
		s := ServiceStats{
			CircuitOpen: st.circuitOpen.Load(), Retries: st.retries.Load(), RetriesOver: st.retriesOver.Load(),
			Ejections: st.ejections.Load(), FaultAborts: st.faultAborts.Load(), FaultDelays: st.faultDelays.Load(),
		}
		for _, e := range st.all() {
			s.Endpoints++
			if e.outlier.ejected(now) {
				s.EjectedNow++
			}
		}
		out[name] = s
	}
	return out
}

// serviceState is one Service's policy and what enforcing it has counted.
type serviceState struct {
	name   string
	policy atomic.Pointer[Policy]
	// endpoints are every endpoint of the Service (all ports and families), for the
	// share of them ejected; replaced with each state.
	endpoints atomic.Pointer[[]*endpoint]

	ejectMu     sync.Mutex // one ejection decided at a time (observe)
	requests    gate       // MaxRequests
	connections gate       // MaxConnections
	pending     atomic.Int64
	budget      retryBudget

	circuitOpen, retries, retriesOver, ejections atomic.Uint64
	faultAborts, faultDelays                     atomic.Uint64
}

func newServiceState(name string) *serviceState {
	st := &serviceState{name: name}
	st.policy.Store(&Policy{})
	return st
}

// admit takes one of the Service's request slots, waiting as a pending request
// while MaxPendingRequests allows; st.requests.release gives it back.
func (st *serviceState) admit(ctx context.Context, pol *Policy) error {
	err := st.requests.acquire(ctx, pol.MaxRequests, pol.MaxPendingRequests, &st.pending)
	if errors.Is(err, errCircuitOpen) {
		st.circuitOpen.Add(1)
	}
	return err
}

// gate admits up to max holders at once; beyond, up to maxPending callers
// (counted in pending, shared by a Service's gates) wait in order for a holder to
// release, and the rest are refused at once.
type gate struct {
	mu      sync.Mutex
	active  int
	waiters []chan struct{}
}

func (g *gate) acquire(ctx context.Context, max, maxPending int, pending *atomic.Int64) error {
	g.mu.Lock()
	if max <= 0 || g.active < max {
		g.active++
		g.mu.Unlock()
		return nil
	}
	if pending.Add(1) > int64(maxPending) {
		pending.Add(-1)
		g.mu.Unlock()
		return errCircuitOpen
	}
	ch := make(chan struct{})
	g.waiters = append(g.waiters, ch)
	g.mu.Unlock()
	defer pending.Add(-1)
	select {
	case <-ch:
		return nil // the releaser handed its slot over
	case <-ctx.Done():
		g.mu.Lock()
		defer g.mu.Unlock()
		for i, w := range g.waiters {
			if w == ch {
				g.waiters = append(g.waiters[:i], g.waiters[i+1:]...)
				return ctx.Err()
			}
		}
		// Handed over just as ctx ended: pass the slot on.
		g.releaseLocked()
		return ctx.Err()
	}
}

func (g *gate) release() {
	g.mu.Lock()
	g.releaseLocked()
	g.mu.Unlock()
}

func (g *gate) releaseLocked() {
	if len(g.waiters) > 0 {
		close(g.waiters[0])
		g.waiters = g.waiters[1:]
		return
	}
	g.active--
}

// retryBudget counts requests and retries over a sliding window of ten slots.
type retryBudget struct {
	mu    sync.Mutex
	slots [10]budgetSlot
}

type budgetSlot struct {
	epoch             int64 // which slot of time it counts; stale ones are skipped
	requests, retries float64
}

// request counts one request towards the budget of its retries.
func (b *retryBudget) request(rb RetryBudget, now time.Time) {
	b.mu.Lock()
	b.slot(rb, now).requests++
	b.mu.Unlock()
}

// withdraw takes one retry from the budget; false when it is spent.
func (b *retryBudget) withdraw(rb RetryBudget, now time.Time) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	cur := b.slot(rb, now)
	var requests, retries float64
	for _, s := range b.slots {
		if s.epoch > cur.epoch-int64(len(b.slots)) {
			requests += s.requests
			retries += s.retries
		}
	}
	if retries+1 > requests*rb.Percent/100+float64(rb.MinPerSecond)*rb.TTL.Seconds() {
		return false
	}
	cur.retries++
	return true
}

func (b *retryBudget) slot(rb RetryBudget, now time.Time) *budgetSlot {
	width := max(rb.TTL/time.Duration(len(b.slots)), time.Millisecond)
	epoch := now.UnixNano() / int64(width)
	s := &b.slots[epoch%int64(len(b.slots))]
	if s.epoch != epoch {
		*s = budgetSlot{epoch: epoch}
	}
	return s
}

// budgetOf is the retry budget pol sets, or the default.
func budgetOf(pol *Policy) RetryBudget {
	if pol.RetryBudget == nil {
		return defaultRetryBudget
	}
	rb := *pol.RetryBudget
	if rb.TTL <= 0 {
		rb.TTL = defaultRetryBudget.TTL
	}
	return rb
}

// outlierState is an endpoint's run of errors and its ejections.
type outlierState struct {
	mu               sync.Mutex
	consecutive5xx   int
	consecutiveGW    int
	ejections        int          // ejections counted towards the next one's length
	ejectedUntil     atomic.Int64 // unix nanoseconds; 0 or past: in service
	lastEjectionEnds time.Time
}

func (o *outlierState) ejected(now time.Time) bool {
	return o.ejectedUntil.Load() > now.UnixNano()
}

// observe feeds the outcome of one try at e (status 0: no response, a connection
// failure or reset) to outlier detection, and ejects e when it has failed enough
// times in a row and the Service may lose one more endpoint.
func (st *serviceState) observe(log *slog.Logger, e *endpoint, od *OutlierDetection, status int) {
	if od == nil {
		return
	}
	gateway := status == 0 || status == http.StatusBadGateway || status == http.StatusServiceUnavailable || status == http.StatusGatewayTimeout
	o := &e.outlier
	o.mu.Lock()
	if status != 0 && status < 500 {
		o.consecutive5xx, o.consecutiveGW = 0, 0
		o.mu.Unlock()
		return
	}
	o.consecutive5xx++
	if gateway {
		o.consecutiveGW++
	} else {
		o.consecutiveGW = 0
	}
	now := time.Now()
	trip := (od.Consecutive5xx > 0 && o.consecutive5xx >= od.Consecutive5xx) ||
		(od.ConsecutiveGatewayErrors > 0 && o.consecutiveGW >= od.ConsecutiveGatewayErrors)
	if !trip || o.ejected(now) {
		o.mu.Unlock()
		return
	}
	// Counting the endpoints out and ejecting one more is one step, or two
	// endpoints failing at once could both take the last place.
	st.ejectMu.Lock()
	defer st.ejectMu.Unlock()
	if !st.mayEject(od, now) {
		o.mu.Unlock()
		return
	}
	// The ejection count fades by one for each interval spent back in service, as
	// Envoy's multiplier does, so an endpoint that failed once long ago starts over.
	interval := od.Interval
	if interval <= 0 {
		interval = defaultEjectionInterval
	}
	if !o.lastEjectionEnds.IsZero() {
		o.ejections = max(0, o.ejections-int(now.Sub(o.lastEjectionEnds)/interval))
	}
	o.ejections++
	base := od.BaseEjection
	if base <= 0 {
		base = defaultBaseEjection
	}
	d := min(base*time.Duration(o.ejections), maxEjection)
	o.lastEjectionEnds = now.Add(d)
	o.ejectedUntil.Store(now.Add(d).UnixNano())
	o.consecutive5xx, o.consecutiveGW = 0, 0
	n := o.ejections
	o.mu.Unlock()
	st.ejections.Add(1)
	log.Info("endpoint ejected", "service", st.name, "endpoint", e.addr, "status", status, "ejections", n, "ejected_for", d)
}

// mayEject says whether one more of the Service's endpoints may be ejected: at
// most MaxEjectionPercent of them, and, as Envoy, one even when the share rounds
// down to none.
func (st *serviceState) mayEject(od *OutlierDetection, now time.Time) bool {
	pct := od.MaxEjectionPercent
	if pct <= 0 {
		pct = defaultMaxEjectionPercent
	}
	out := 0
	all := st.all()
	for _, e := range all {
		if e.outlier.ejected(now) {
			out++
		}
	}
	return out+1 <= max(1, len(all)*pct/100)
}

func (st *serviceState) all() []*endpoint {
	if eps := st.endpoints.Load(); eps != nil {
		return *eps
	}
	return nil
}

// tokenBucket is the rate limit of one destination pod: PerSecond tokens a second,
// Burst at most; a request takes one.
type tokenBucket struct {
	limit  RateLimit
	mu     sync.Mutex
	tokens float64
	last   time.Time
}

func newTokenBucket(rl RateLimit) *tokenBucket {
	if rl.Burst <= 0 {
		rl.Burst = rl.PerSecond
	}
	return &tokenBucket{limit: rl, tokens: float64(rl.Burst), last: time.Now()}
}

func (b *tokenBucket) take(now time.Time) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.tokens = min(float64(b.limit.Burst), b.tokens+now.Sub(b.last).Seconds()*float64(b.limit.PerSecond))
	b.last = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// allowInto takes a token of the rate limit of local pod pd, if it has one; false:
// the request is answered 429.
func (p *Proxy) allowInto(pd *pod, now time.Time) bool {
	p.mu.RLock()
	b := p.services.buckets[pd.w.IPs[0]]
	p.mu.RUnlock()
	return b == nil || b.take(now)
}

// chance is true for percent of the calls.
func chance(percent float64) bool {
	return percent > 0 && rand.Float64()*100 < percent
}

// backoff is how long to wait before retry n (1 on): full jitter over an
// exponential bound from base, capped.
func backoff(base time.Duration, n int) time.Duration {
	if base <= 0 {
		base = defaultRetryBackoff
	}
	bound := min(base<<min(n-1, 16), base*maxBackoffFactor)
	return rand.N(bound) + 1
}

// meshError is a try the mesh answers itself rather than sending it on.
type meshError struct {
	status int
	reason admin.Reason
	why    string
	policy string // the AuthorizationPolicy that denied it (ReasonPolicy)
}

func (e *meshError) Error() string { return e.why }

// errConnectionOverflow is a try that would open a connection past the Service's
// MaxConnections, with MaxPendingRequests already waiting for one.
var errConnectionOverflow = &meshError{status: http.StatusServiceUnavailable, reason: admin.ReasonCircuitOpen, why: "upstream overflow"}

// errRateLimited is a request to a local pod over its rate limit.
var errRateLimited = &meshError{status: http.StatusTooManyRequests, reason: admin.ReasonRateLimited, why: "local rate limited"}
