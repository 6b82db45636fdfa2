// This file tracks proxied connections: the live ones, a ring of recently ended
// ones for the admin API, and the observer (flows and metrics) told of each one.

package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/ferrymesh/ferry/agent/tunnel"
	"github.com/ferrymesh/ferry/api/admin"
)

// Conn is the record of one proxied connection; its type is the admin API's, so
// the record the proxy keeps is the one GET /connections returns.
type Conn = admin.Conn

// ConnObserver is told of every proxied connection when it opens and when it ends,
// and of every request carried at L7 when its response has ended (Conn.HTTP set).
// The calls run on the connection's or request's goroutine: they must be quick and
// must not block.
type ConnObserver interface {
	ConnOpened(Conn)
	ConnClosed(Conn)
	Request(Conn)
}

// tracker keeps the live connections and a bounded ring of ended ones.
type tracker struct {
	obs     ConnObserver                      // nil: nobody to tell
	resolve func(netip.Addr) (Workload, bool) // mesh workload at an address
	// lifetime is the validity of a local workload's certificate (identity.Store.Lifetime).
	lifetime func(id string) (issued, notAfter time.Time, ok bool)
	nextID   atomic.Uint64
	mu       sync.Mutex
	live     map[uint64]*Conn
	ended    []Conn // ring
	next     int
	full     bool
}

func newTracker(keep int) *tracker {
	return &tracker{live: map[uint64]*Conn{}, ended: make([]Conn, keep)}
}

func (t *tracker) open(c Conn) *Conn {
	c.ID = t.nextID.Add(1)
	if c.Start.IsZero() {
		c.Start = time.Now()
	}
	t.fill(&c)
	p := &c
	t.mu.Lock()
	t.live[c.ID] = p
	t.mu.Unlock()
	if t.obs != nil {
		t.obs.ConnOpened(c)
	}
	return p
}

// fill names the workloads at both ends from the mesh directory. The pod a listener
// belongs to is known already; the other end is looked up by address.
func (t *tracker) fill(c *Conn) {
	t.certExpiry(c, time.Now())
	if t.resolve == nil {
		return
	}
	if w, ok := t.resolve(c.Src.Addr().Unmap()); ok && c.SrcPod == "" {
		c.SrcPod, c.SrcNode, c.SrcWorkload = w.Name, w.Node, w.Workload
	}
	if w, ok := t.resolve(c.Dst.Addr().Unmap()); ok && c.DstPod == "" {
		c.DstPod, c.DstNode, c.DstWorkload = w.Name, w.Node, w.Workload
	}
}

// close records that c, once carried, ended after sent and recv bytes; err is why
// it ended badly (nil: both directions ended cleanly).
func (t *tracker) close(c *Conn, sent, recv int64, err error) {
	c = t.take(c)
	c.Verdict, c.Reason = admin.VerdictForwarded, carriedReason(err)
	if c.Security == admin.MTLS && c.Status == 0 {
		c.Status = http.StatusOK // carried through a tunnel: its CONNECT was answered 200
	}
	t.end(c, sent, recv, err)
}

// refused records that c was never carried: dialling its destination (or the
// tunnel to it) failed with err.
func (t *tracker) refused(c *Conn, err error) {
	c = t.take(c)
	c.Verdict, c.Reason, c.Status = dialOutcome(err)
	if pol, ok := refusedByPolicy(err); ok {
		c.Reason, c.Policy = admin.ReasonPolicy, pol
	}
	if b, ok := refusedByBudget(err); ok {
		c.Verdict, c.Reason, c.Budget = admin.VerdictDenied, admin.ReasonPodBudget, b
	}
	t.end(c, 0, 0, err)
}

// noEndpoint records that c, to a Service, was refused: the Service has no ready
// endpoint for the port the client dialled.
func (t *tracker) noEndpoint(c *Conn, service string) {
	c = t.take(c)
	c.Verdict, c.Reason = admin.VerdictError, admin.ReasonNoEndpoints
	t.end(c, 0, 0, fmt.Errorf("service %s has no ready endpoint for %s", service, c.Service))
}

// request reports one request carried at L7 (c.HTTP set) once its response has
// ended; w is what was answered, and aborted what the handler panicked with (an
// upstream that failed mid-response aborts the client's stream, as it should: the
// panic goes on once the request is counted).
func (t *tracker) request(c Conn, w *responseWriter, aborted any) {
	c.End = time.Now()
	c.HTTP.Status = w.status
	c.BytesSent, c.BytesRecv = w.requestBytes.Load(), w.bytes
	switch {
	case aborted != nil && aborted != http.ErrAbortHandler: //nolint:errorlint // the sentinel itself is what is panicked
		c.Verdict, c.Reason = admin.VerdictError, admin.ReasonPanic
	case aborted != nil:
		c.Verdict, c.Reason = admin.VerdictError, admin.ReasonReset
	case c.Verdict == "":
		c.Verdict = admin.VerdictForwarded
	}
	t.fill(&c)
	if t.obs != nil {
		t.obs.Request(c)
	}
	if aborted != nil {
		panic(aborted)
	}
}

// stream records an inbound tunnel stream from the tunnel server's report: the
// status it answered the CONNECT with says whether the stream was carried.
func (t *tracker) stream(c *Conn, si tunnel.StreamInfo) {
	c = t.take(c)
	if si.Status != http.StatusOK {
		c.Verdict, c.Reason = statusOutcome(si.Status)
		c.Status = si.Status
		t.end(c, si.BytesIn, si.BytesOut, si.Err)
		return
	}
	t.close(c, si.BytesIn, si.BytesOut, si.Err)
}

// take removes c from the live table and returns a copy for its outcome to be
// written in: snapshot reads live records under the lock from other goroutines,
// so a record is never written while it is live. Every outcome starts with it.
func (t *tracker) take(c *Conn) *Conn {
	t.mu.Lock()
	delete(t.live, c.ID)
	t.mu.Unlock()
	cp := *c
	return &cp
}

func (t *tracker) end(c *Conn, sent, recv int64, err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.live, c.ID)
	c.End = time.Now()
	c.BytesSent, c.BytesRecv = sent, recv
	if err != nil {
		c.Error = err.Error()
	}
	t.ended[t.next] = *c
	t.next = (t.next + 1) % len(t.ended)
	if t.next == 0 {
		t.full = true
	}
	if t.obs != nil {
		t.obs.ConnClosed(*c)
	}
}

// dialOutcome classifies a failure to reach a connection's destination by the
// error's type: a tunnel refusal by the status the destination answered, the rest
// by the system error underneath.
func dialOutcome(err error) (admin.Verdict, admin.Reason, int) {
	var re *tunnel.RefusedError
	if errors.As(err, &re) {
		v, r := statusOutcome(re.Status)
		return v, r, re.Status
	}
	var alert tls.AlertError
	var certErr *tls.CertificateVerificationError
	var expired *CertExpiredError
	switch {
	case errors.As(err, &expired):
		return admin.VerdictDenied, admin.ReasonCertExpired, 0
	case errors.As(err, &alert), errors.As(err, &certErr):
		return admin.VerdictError, admin.ReasonTunnel, 0
	case errors.Is(err, tunnel.ErrPoolClosed), errors.Is(err, context.Canceled):
		return admin.VerdictError, admin.ReasonCanceled, 0
	}
	return admin.VerdictError, errnoReason(err), 0
}

// statusOutcome classifies the tunnel's answer to a CONNECT.
func statusOutcome(status int) (admin.Verdict, admin.Reason) {
	switch status {
	case http.StatusOK:
		return admin.VerdictForwarded, admin.ReasonNone
	case http.StatusForbidden:
		return admin.VerdictDenied, admin.ReasonForbidden
	case http.StatusBadGateway:
		return admin.VerdictError, admin.ReasonRefused
	case http.StatusGatewayTimeout:
		return admin.VerdictError, admin.ReasonTimeout
	}
	return admin.VerdictError, admin.ReasonTunnel
}

// carriedReason is why a carried connection ended: none for a clean end.
func carriedReason(err error) admin.Reason {
	if err == nil {
		return admin.ReasonNone
	}
	return errnoReason(err)
}

// errnoReason names a network error by its kind.
func errnoReason(err error) admin.Reason {
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return admin.ReasonRefused
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, os.ErrDeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return admin.ReasonTimeout
	case errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ENETUNREACH):
		return admin.ReasonUnreachable
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		return admin.ReasonReset
	case errors.Is(err, context.Canceled):
		return admin.ReasonCanceled
	}
	return admin.ReasonOther
}

// workloadAt returns the mesh workload with address ip.
func (p *Proxy) workloadAt(ip netip.Addr) (Workload, bool) {
	p.mu.RLock()
	defer p.mu.RUnlock()
	w, ok := p.byIP[ip]
	return w, ok
}

// snapshot returns live connections, then ended ones oldest first.
func (t *tracker) snapshot() (live, ended []Conn) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, c := range t.live {
		live = append(live, *c)
	}
	if t.full {
		ended = append(ended, t.ended[t.next:]...)
	}
	ended = append(ended, t.ended[:t.next]...)
	return live, ended
}
