// This file picks the endpoint of each request a Service port carries at L7.

package proxy

import (
	"math"
	"math/rand/v2"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// LoadBalancer is a per-request load-balancing algorithm; the values are those of
// the TrafficPolicy API (api/v1alpha1.LoadBalancerType).
type LoadBalancer string

// The algorithms the proxy implements.
const (
	// P2CEWMA, the default (as Linkerd's): of two endpoints drawn at random, the
	// one with the lower peak-EWMA latency times its requests in flight.
	P2CEWMA LoadBalancer = "P2CEWMA"
	// RoundRobin takes the endpoints in turn.
	RoundRobin LoadBalancer = "RoundRobin"
	// Random draws one endpoint.
	Random LoadBalancer = "Random"
	// LeastRequest: of two endpoints drawn at random, the one with fewer requests in
	// flight.
	LeastRequest LoadBalancer = "LeastRequest"
)

// Known reports whether the proxy implements lb ("" is the default).
func (lb LoadBalancer) Known() bool {
	switch lb {
	case "", P2CEWMA, RoundRobin, Random, LeastRequest:
		return true
	}
	return false
}

const (
	// ewmaDecay is how long a latency estimate takes to fall to 1/e of its weight
	// (Linkerd's default decay).
	ewmaDecay = 10 * time.Second
	// unmeasuredRTT is what an endpoint with no response yet is thought to take, so
	// that a new endpoint gets traffic without drawing all of it.
	unmeasuredRTT = time.Millisecond
)

// endpoint is one pod port a Service reaches, with what the proxy knows of its load.
type endpoint struct {
	addr    netip.AddrPort
	pending atomic.Int64 // requests in flight

	mu    sync.Mutex
	ewma  float64 // peak-EWMA latency, nanoseconds; 0: nothing measured yet
	stamp time.Time
}

// begin counts a request sent to e; done must be called when it ends.
func (e *endpoint) begin() { e.pending.Add(1) }

// done ends a request; rtt, when positive, is how long the endpoint took to answer
// (response headers), which feeds the latency estimate.
func (e *endpoint) done(rtt time.Duration) {
	e.pending.Add(-1)
	if rtt <= 0 {
		return
	}
	now := time.Now()
	e.mu.Lock()
	defer e.mu.Unlock()
	x := float64(rtt)
	if e.ewma == 0 || x > e.ewma {
		e.ewma = x // peak: a slow answer counts at once
	} else {
		w := math.Exp(-float64(now.Sub(e.stamp)) / float64(ewmaDecay))
		e.ewma = e.ewma*w + x*(1-w)
	}
	e.stamp = now
}

// cost is the estimated latency of one more request to e. An estimate no response
// has renewed fades (as Finagle's peak EWMA does), so an endpoint once slow is
// tried again rather than never.
func (e *endpoint) cost() float64 {
	e.mu.Lock()
	rtt, stamp := e.ewma, e.stamp
	e.mu.Unlock()
	if rtt == 0 {
		rtt = float64(unmeasuredRTT)
	} else {
		rtt *= math.Exp(-float64(time.Since(stamp)) / float64(ewmaDecay))
	}
	return rtt * float64(e.pending.Load()+1)
}

// balancer picks the endpoint of one request.
type balancer interface {
	pick() (*endpoint, bool)
}

func newBalancer(lb LoadBalancer, eps []*endpoint) balancer {
	switch lb {
	case RoundRobin:
		return &roundRobin{eps: eps}
	case Random:
		return random(eps)
	case LeastRequest:
		return twoChoices{eps: eps, cost: func(e *endpoint) float64 { return float64(e.pending.Load()) }}
	default:
		return twoChoices{eps: eps, cost: (*endpoint).cost}
	}
}

// twoChoices draws two endpoints and takes the cheaper (power of two choices).
type twoChoices struct {
	eps  []*endpoint
	cost func(*endpoint) float64
}

func (b twoChoices) pick() (*endpoint, bool) {
	switch n := len(b.eps); n {
	case 0:
		return nil, false
	case 1:
		return b.eps[0], true
	default:
		i := rand.IntN(n)
		j := rand.IntN(n - 1)
		if j >= i {
			j++
		}
		a, c := b.eps[i], b.eps[j]
		if b.cost(c) < b.cost(a) {
			return c, true
		}
		return a, true
	}
}

type roundRobin struct {
	eps  []*endpoint
	next atomic.Uint64
}

func (b *roundRobin) pick() (*endpoint, bool) {
	if len(b.eps) == 0 {
		return nil, false
	}
	return b.eps[(b.next.Add(1)-1)%uint64(len(b.eps))], true
}

type random []*endpoint

func (b random) pick() (*endpoint, bool) {
	if len(b) == 0 {
		return nil, false
	}
	return b[rand.IntN(len(b))], true
}
