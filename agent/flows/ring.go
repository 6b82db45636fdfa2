// Package flows keeps the agent's flow records — one per proxied connection — in a
// bounded ring, matches them against filters, and serves them over the Observer gRPC
// API (api/ferryv1/observer.proto) with the last N, a start time and follow mode.
package flows

import (
	"sync"
	"time"

	"github.com/ferrymesh/ferry/api/ferryv1"
)

// DefaultCapacity is the ring size an agent keeps unless configured otherwise: at
// about 700 bytes a flow, a few megabytes whatever the traffic.
const DefaultCapacity = 4096

// followBuffer is how many flows a follower may fall behind before it loses some.
const followBuffer = 1024

// Ring holds the most recent flows. When it is full a new flow replaces the oldest.
// Flows in the ring are never modified after Add, so readers share them.
type Ring struct {
	mu    sync.Mutex
	buf   []*ferryv1.Flow
	next  int // slot of the next flow
	count int // flows in buf
	seen  uint64
	lost  uint64
	subs  map[*Subscription]struct{}
}

// NewRing returns an empty ring holding at most capacity flows.
func NewRing(capacity int) *Ring {
	if capacity <= 0 {
		capacity = DefaultCapacity
	}
	return &Ring{buf: make([]*ferryv1.Flow, capacity), subs: map[*Subscription]struct{}{}}
}

// Add records f, giving it the next ID, and hands it to every follower. A follower
// that has fallen followBuffer flows behind misses it (counted in Status.Lost) rather
// than slowing the proxy.
func (r *Ring) Add(f *ferryv1.Flow) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.seen++
	f.Id = r.seen
	r.buf[r.next] = f
	r.next = (r.next + 1) % len(r.buf)
	if r.count < len(r.buf) {
		r.count++
	}
	for s := range r.subs {
		select {
		case s.c <- f:
		default:
			s.lost++
			r.lost++
		}
	}
}

// Query selects stored flows: those recorded at or after Since that match Filter,
// and of those only the last Number (0: all).
type Query struct {
	Filter *ferryv1.FlowFilter
	Since  time.Time
	Number int
}

// Flows returns the stored flows that match q, oldest first.
func (r *Ring) Flows(q Query) []*ferryv1.Flow {
	r.mu.Lock()
	all := make([]*ferryv1.Flow, 0, r.count)
	start := (r.next - r.count + len(r.buf)) % len(r.buf)
	for i := 0; i < r.count; i++ {
		all = append(all, r.buf[(start+i)%len(r.buf)])
	}
	r.mu.Unlock()
	return Select(all, q)
}

// Select returns the flows of fs (oldest first) that match q.
func Select(fs []*ferryv1.Flow, q Query) []*ferryv1.Flow {
	var out []*ferryv1.Flow
	for _, f := range fs {
		if !q.Since.IsZero() && f.GetTime().AsTime().Before(q.Since) {
			continue
		}
		if Match(f, q.Filter) {
			out = append(out, f)
		}
	}
	if q.Number > 0 && len(out) > q.Number {
		out = out[len(out)-q.Number:]
	}
	return out
}

// Status describes the ring.
type Status struct {
	Flows, Capacity int
	// Seen counts every flow ever added; Lost those a slow follower missed.
	Seen, Lost uint64
}

// Status reports the ring's fill and counters.
func (r *Ring) Status() Status {
	r.mu.Lock()
	defer r.mu.Unlock()
	return Status{Flows: r.count, Capacity: len(r.buf), Seen: r.seen, Lost: r.lost}
}

// Subscription receives every flow added after Subscribe until Close.
type Subscription struct {
	r    *Ring
	c    chan *ferryv1.Flow
	lost uint64 // under r.mu
	// After is the ID of the last flow added before the subscription started: the
	// flows a follower reads from the ring are those with IDs up to After.
	After uint64
}

// Subscribe starts delivering new flows on the returned subscription's channel.
func (r *Ring) Subscribe() *Subscription {
	s := &Subscription{r: r, c: make(chan *ferryv1.Flow, followBuffer)}
	r.mu.Lock()
	s.After = r.seen
	r.subs[s] = struct{}{}
	r.mu.Unlock()
	return s
}

// C delivers the new flows.
func (s *Subscription) C() <-chan *ferryv1.Flow { return s.c }

// Lost counts the flows this subscription missed because it fell behind.
func (s *Subscription) Lost() uint64 {
	s.r.mu.Lock()
	defer s.r.mu.Unlock()
	return s.lost
}

// Close stops delivery. The channel is not closed: Add may be sending.
func (s *Subscription) Close() {
	s.r.mu.Lock()
	delete(s.r.subs, s)
	s.r.mu.Unlock()
}
