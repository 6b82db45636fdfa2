// This file picks the endpoint of each request a Service port carries at L7.

package proxy

import (
	"fmt"
	"math"
	"math/rand/v2"
	"net/netip"
	"slices"
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
	// RingHash keeps a key (Policy.HashHeader, or the client's IP) on one endpoint
	// by consistent hashing: a change of endpoints moves only the keys of the
	// endpoints that came or went.
	RingHash LoadBalancer = "RingHash"
)

// Known reports whether the proxy implements lb ("" is the default).
func (lb LoadBalancer) Known() bool {
	switch lb {
	case "", P2CEWMA, RoundRobin, Random, LeastRequest, RingHash:
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

	outlier outlierState // consecutive errors and ejections (resilience.go)
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

// balancer picks the endpoint of one request: among those usable accepts (nil:
// all), which skips ejected endpoints and, on a retry, those already tried. key is
// the request's hash key, which only RingHash uses.
type balancer interface {
	pick(key uint64, usable func(*endpoint) bool) (*endpoint, bool)
}

func newBalancer(lb LoadBalancer, eps []*endpoint) balancer {
	switch lb {
	case RoundRobin:
		return &roundRobin{eps: eps}
	case Random:
		return random(eps)
	case LeastRequest:
		return twoChoices{eps: eps, cost: func(e *endpoint) float64 { return float64(e.pending.Load()) }}
	case RingHash:
		return newRing(eps)
	default:
		return twoChoices{eps: eps, cost: (*endpoint).cost}
	}
}

// firstUsable is the first endpoint usable accepts, from eps[start] on and round
// to the start again.
func firstUsable(eps []*endpoint, start int, usable func(*endpoint) bool) (*endpoint, bool) {
	for i := range eps {
		if e := eps[(start+i)%len(eps)]; usable == nil || usable(e) {
			return e, true
		}
	}
	return nil, false
}

// twoChoices draws two endpoints and takes the cheaper (power of two choices).
type twoChoices struct {
	eps  []*endpoint
	cost func(*endpoint) float64
}

func (b twoChoices) pick(_ uint64, usable func(*endpoint) bool) (*endpoint, bool) {
	n := len(b.eps)
	if n == 0 {
		return nil, false
	}
	a, ok := firstUsable(b.eps, rand.IntN(n), usable)
	if !ok || n == 1 {
		return a, ok
	}
	// The second draw skips a and what is not usable, so a single usable
	// endpoint is taken and two are compared whenever there are two.
	start := rand.IntN(n)
	for i := range n {
		if c := b.eps[(start+i)%n]; c != a && (usable == nil || usable(c)) {
			if b.cost(c) < b.cost(a) {
				return c, true
			}
			break
		}
	}
	return a, true
}

type roundRobin struct {
	eps  []*endpoint
	next atomic.Uint64
}

func (b *roundRobin) pick(_ uint64, usable func(*endpoint) bool) (*endpoint, bool) {
	if len(b.eps) == 0 {
		return nil, false
	}
	return firstUsable(b.eps, int((b.next.Add(1)-1)%uint64(len(b.eps))), usable)
}

type random []*endpoint

func (b random) pick(_ uint64, usable func(*endpoint) bool) (*endpoint, bool) {
	if len(b) == 0 {
		return nil, false
	}
	return firstUsable(b, rand.IntN(len(b)), usable)
}

// ring is consistent hashing over virtual nodes: each endpoint owns the arcs that
// end at its points, so removing one hands only its arcs to the next points.
type ring struct {
	points []ringPoint // sorted by hash
}

type ringPoint struct {
	hash uint64
	ep   *endpoint
}

const (
	// ringSize is about how many points a ring has, so each endpoint's share is
	// within a few percent of even; per endpoint at least ringMinPoints and at
	// most ringMaxPoints.
	ringSize      = 4096
	ringMinPoints = 16
	ringMaxPoints = 256
)

func newRing(eps []*endpoint) *ring {
	per := 0
	if len(eps) > 0 {
		per = min(max(ringSize/len(eps), ringMinPoints), ringMaxPoints)
	}
	r := &ring{points: make([]ringPoint, 0, per*len(eps))}
	for _, e := range eps {
		// A point's hash depends on its endpoint's address alone, so every agent
		// builds the same ring and a key goes to one endpoint from every node.
		name := []byte(e.addr.String() + "#")
		for i := range per {
			r.points = append(r.points, ringPoint{hash: hashKey(fmt.Appendf(name, "%d", i)), ep: e})
		}
	}
	slices.SortFunc(r.points, func(a, b ringPoint) int {
		switch {
		case a.hash < b.hash:
			return -1
		case a.hash > b.hash:
			return 1
		}
		return 0
	})
	return r
}

func (r *ring) pick(key uint64, usable func(*endpoint) bool) (*endpoint, bool) {
	n := len(r.points)
	if n == 0 {
		return nil, false
	}
	i, _ := slices.BinarySearchFunc(r.points, key, func(p ringPoint, k uint64) int {
		switch {
		case p.hash < k:
			return -1
		case p.hash > k:
			return 1
		}
		return 0
	})
	// Past an unusable endpoint the key goes on round the ring, to the endpoint
	// that would own it were that one removed.
	for j := range n {
		if e := r.points[(i+j)%n].ep; usable == nil || usable(e) {
			return e, true
		}
	}
	return nil, false
}

// hashKey hashes a ring point's name or a request's key (a header's value, a
// client address): FNV-1a, then mixed (SplitMix64's finalizer) so that similar
// names spread over the whole ring.
func hashKey[T string | []byte](b T) uint64 {
	x := uint64(14695981039346656037)
	for i := range len(b) {
		x ^= uint64(b[i])
		x *= 1099511628211
	}
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}
