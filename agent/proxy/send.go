// This file is the sending side of the L7 path: from the Service port a request is
// bound for to the endpoint that answers it. On the way the Service's TrafficPolicy
// applies (resilience.go): faults, connection pool limits, the rate limit of a pod
// on this node, and the per-try loop that retries on another endpoint, within the
// retry budget, and feeds outlier detection.

package proxy

import (
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ferrymesh/ferry/agent/tracing"
	"github.com/ferrymesh/ferry/api/admin"
)

// send carries r, bound for Service port dest, to one of its endpoints and answers
// w with the response; dest nil (the port is gone) is answered 503. rule is the
// route rule r matched (nil: the Service has no routes): its retries and per-try
// timeout apply, and the policy's retries and request timeout where it sets none.
// rec is the request's record.
func (p *Proxy) send(w *responseWriter, r *http.Request, dest *vipPort, rule *RouteRule, rec *Conn) {
	if dest == nil {
		rec.Verdict, rec.Reason = admin.VerdictError, admin.ReasonNoEndpoints
		meshAnswer(w, http.StatusServiceUnavailable, "no healthy upstream")
		return
	}
	hc := r.Context().Value(httpConnKey{}).(*httpConn)
	st := dest.policy
	pol := st.policy.Load()
	if f := pol.Fault; f != nil {
		// Delay and abort are drawn independently, as Istio's: a request may be
		// delayed and then aborted.
		if chance(f.DelayPercent) {
			st.faultDelays.Add(1)
			t := time.NewTimer(f.Delay)
			rec.HTTP.FaultDelay = f.Delay
			select {
			case <-t.C:
			case <-r.Context().Done():
				t.Stop()
				rec.Verdict, rec.Reason = admin.VerdictError, admin.ReasonCanceled
				return
			}
		}
		if chance(f.AbortPercent) {
			st.faultAborts.Add(1)
			rec.Verdict, rec.Reason = admin.VerdictDenied, admin.ReasonFault
			meshAnswer(w, f.AbortStatus, "fault filter abort")
			return
		}
	}
	if err := st.admit(r.Context(), pol); err != nil {
		rec.Verdict, rec.Reason = admin.VerdictError, admin.ReasonCanceled
		if errors.Is(err, errCircuitOpen) {
			rec.Verdict, rec.Reason = admin.VerdictDenied, admin.ReasonCircuitOpen
			meshAnswer(w, http.StatusServiceUnavailable, "upstream overflow")
		}
		return
	}
	defer st.requests.release()

	up := &upstream{pod: hc.pd, h2: r.ProtoMajor == 2, dest: dest, st: st, pol: pol, retry: pol.Retry}
	up.tried = up.triedBuf[:0]
	// The policy's retries and request timeout are for requests no rule sets them
	// for; a rule's request timeout is routing's to apply (routeRequest).
	if rule != nil {
		up.tryTimeout = rule.BackendTimeout
		if rule.Retry != nil {
			up.retry = rule.Retry
		}
	}
	if pol.RequestTimeout > 0 && (rule == nil || rule.RequestTimeout == 0) {
		ctx, cancel := context.WithTimeout(r.Context(), pol.RequestTimeout)
		defer cancel()
		r = r.WithContext(ctx)
	}
	if _, hashed := dest.balancer.(*ring); hashed {
		up.key = requestKey(r, pol.HashHeader, rec.Src.Addr())
	}
	if up.retry != nil {
		st.budget.request(budgetOf(pol), time.Now())
	}
	if !up.choose() {
		rec.Verdict, rec.Reason = admin.VerdictError, admin.ReasonNoEndpoints
		meshAnswer(w, http.StatusServiceUnavailable, "no healthy upstream")
		return
	}
	p.forward(w, r, up, rec, p.cfg.Tracer.Client, hc.pd.w, up.rt.Peer, dest.service)
}

// forward sends r on through up (one endpoint, or a Service's with retries) and
// records the outcome in rec and in the hop's span, which startSpan begins: the
// client's on the source node, the server's on the destination; either sets the
// trace headers the next hop receives.
func (p *Proxy) forward(w *responseWriter, r *http.Request, up *upstream, rec *Conn,
	startSpan func(*http.Request, tracing.Attrs) func(int, string, error), from, to Workload, service string) {
	end := startSpan(r, spanAttrs(from, to, service, up.ep.addr))
	rec.HTTP.TraceID = tracing.TraceID(r.Header)
	out := r.WithContext(context.WithValue(r.Context(), upstreamKey{}, up))
	if r.Body != nil && r.Body != http.NoBody {
		out.Body = &countingBody{ReadCloser: r.Body, n: &w.requestBytes}
		if up.retry != nil {
			up.body = &replayBody{src: out.Body}
		}
	}
	defer func() {
		if up.dest != nil {
			rec.Dst, rec.Security, rec.DstIdentity = up.ep.addr, up.rt.Security, up.rt.Peer.Identity
		}
		rec.HTTP.Retries = up.retries
		if up.err != nil {
			var me *meshError
			if errors.As(up.err, &me) {
				rec.Verdict, rec.Reason, rec.Policy = admin.VerdictDenied, me.reason, me.policy
			} else {
				rec.Verdict, rec.Reason, _ = dialOutcome(up.err)
			}
			rec.Error = up.err.Error()
		}
		gs := grpcStatus(w.Header())
		if rec.Protocol == admin.GRPC {
			rec.HTTP.GRPCStatus = gs
		}
		end(w.status, gs, up.err)
	}()
	p.l7.proxy.ServeHTTP(w, out)
}

// upstream is where one request goes: set by send (or serveRequest for the app
// behind an inbound stream), read by rewrite, the transport and the error handler
// through the request's context.
type upstream struct {
	pod *pod
	h2  bool // the client spoke HTTP/2, so the app does
	ep  *endpoint
	rt  route // how ep is reached
	// dest is the Service port the request is for, with its policy state st and
	// policy pol; nil for the one endpoint behind an inbound stream.
	dest       *vipPort
	st         *serviceState
	pol        *Policy
	key        uint64 // RingHash's
	retry      *Retry
	tryTimeout time.Duration
	body       *replayBody // nil: no body, or no retries to replay it for
	tried      []*endpoint // in triedBuf unless a request is tried more often
	triedBuf   [4]*endpoint
	retries    int
	err        error // why the request failed before a response, if it did
}

// choose picks the endpoint of the next try: one not tried yet and not ejected if
// there is one, else one not ejected, else any (when every endpoint is ejected,
// trying one is better than answering nothing, as Envoy's panic mode).
func (up *upstream) choose() bool {
	b := up.dest.balancer
	var ep *endpoint
	var ok bool
	if up.pol.Outlier != nil || len(up.tried) > 0 {
		now := time.Now()
		ep, ok = b.pick(up.key, func(e *endpoint) bool { return !e.outlier.ejected(now) && !slices.Contains(up.tried, e) })
		if !ok && len(up.tried) > 0 {
			ep, ok = b.pick(up.key, func(e *endpoint) bool { return !e.outlier.ejected(now) })
		}
	}
	if !ok {
		ep, ok = b.pick(up.key, nil)
	}
	if !ok {
		return false
	}
	p := up.pod.proxy
	p.mu.RLock()
	up.rt = decide(ep.addr.Addr(), p.byIP, p.local)
	p.mu.RUnlock()
	up.ep = ep
	up.tried = append(up.tried, ep)
	return true
}

// requestKey is what RingHash hashes: the value of the policy's header, or the
// client's address. A request without the header has no key to keep anywhere and
// goes to an endpoint at random (as Envoy's).
func requestKey(r *http.Request, header string, client netip.Addr) uint64 {
	if header != "" {
		if v := r.Header.Get(header); v != "" {
			return hashKey(v)
		}
		return rand.Uint64()
	}
	a := client.Unmap().As16()
	return hashKey(a[:])
}

// upstreamTransport sends a request over the source pod's upstream connections of
// the client's protocol version, trying again on another endpoint while the retry
// policy and budget allow. A try is retried only before its response has reached
// the client: the response ReverseProxy relays is the last try's.
type upstreamTransport struct{}

func (upstreamTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	up := r.Context().Value(upstreamKey{}).(*upstream)
	for {
		res, err := up.try(r)
		if !up.again(r, res, err) {
			return res, err
		}
		if res != nil {
			// Drained so its connection can carry the next request.
			_, _ = io.Copy(io.Discard, io.LimitReader(res.Body, replayLimit))
			res.Body.Close()
		}
		up.retries++
		up.st.retries.Add(1)
		t := time.NewTimer(backoff(up.retry.Backoff, up.retries))
		select {
		case <-t.C:
		case <-r.Context().Done():
			t.Stop()
			return nil, context.Cause(r.Context())
		}
		up.choose()
	}
}

// try sends r to up.ep once.
func (up *upstream) try(r *http.Request) (*http.Response, error) {
	ep := up.ep
	if up.dest != nil && up.rt.Security == admin.SameNode && !up.pod.proxy.allowInto(up.rt.Local, time.Now()) {
		// The pod is on this node, so no destination proxy will see the request:
		// its rate limit is taken here.
		return nil, errRateLimited
	}
	if up.dest != nil && up.rt.Security == admin.SameNode {
		if err := up.pod.proxy.admitLocal(up.pod, up.rt.Local, ep.addr.Port(), r); err != nil {
			return nil, err
		}
	}
	ctx, cancel := r.Context(), context.CancelFunc(func() {})
	if up.tryTimeout > 0 && r.Header.Get("Upgrade") == "" { // an upgraded connection outlives its try
		ctx, cancel = context.WithTimeout(ctx, up.tryTimeout)
	}
	out := r.WithContext(ctx)
	// An upgrade's connection is the client's from then on, never reused: it is not
	// counted, and its Connection: Upgrade must stay.
	if up.dest != nil && up.pol.MaxRequestsPerConnection > 0 && r.Header.Get("Upgrade") == "" {
		limit := int64(up.pol.MaxRequestsPerConnection)
		// The transports copy a request that has a body before they pick its
		// connection, so out.Close set then would be lost: the close is asked for
		// in the header, which the copy shares (HTTP/1.1 sends it, HTTP/2 takes it
		// as "no new streams on this connection" and does not send it). The header
		// is this try's own: the next try may go to another connection.
		hdr := out.Header.Clone()
		if hdr == nil {
			hdr = http.Header{}
		}
		out.Header = hdr
		out = out.WithContext(httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{GotConn: func(info httptrace.GotConnInfo) {
			// GotConn runs before the request is written: its last request on
			// the connection asks for the close.
			if c, ok := info.Conn.(*upstreamConn); ok && c.requests.Add(1) >= limit {
				hdr.Set("Connection", "close")
			}
		}}))
	}
	u := *r.URL
	u.Host = ep.addr.String()
	out.URL = &u
	if up.body != nil && r.Body != nil {
		out.Body = up.body.view()
	}
	ep.begin()
	start := time.Now()
	var idle time.Duration
	if up.dest != nil {
		idle = up.pol.IdleTimeout
	}
	res, err := up.pod.transport(up.h2, idle).RoundTrip(out)
	if err != nil {
		ep.done(0)
		cancel()
		// Not the endpoint's fault: the client left, the request's time is up,
		// or the mesh refused the try itself.
		var me *meshError
		if r.Context().Err() == nil && !errors.As(err, &me) {
			up.observe(ep, 0)
		}
		return nil, err
	}
	rtt := time.Since(start)
	up.observe(ep, res.StatusCode)
	if res.StatusCode == http.StatusSwitchingProtocols {
		// An upgraded connection is no longer a request in flight; its body
		// (the connection) must reach ReverseProxy unwrapped.
		ep.done(rtt)
		cancel()
		return res, nil
	}
	res.Body = &tryBody{ReadCloser: res.Body, ep: ep, rtt: rtt, cancel: cancel}
	return res, nil
}

// again says whether to try r once more after res or err: within the retry's
// attempts, for a failure it names, with a body that can be sent again, and within
// the Service's retry budget.
func (up *upstream) again(r *http.Request, res *http.Response, err error) bool {
	rt := up.retry
	if up.dest == nil || rt == nil || up.retries >= rt.Attempts || r.Context().Err() != nil {
		return false
	}
	var me *meshError
	switch {
	case errors.As(err, &me):
		return false // the mesh's own answer: another endpoint would not change it
	case err == nil && !slices.Contains(rt.Codes, res.StatusCode):
		return false
	}
	if up.body != nil && !up.body.replayable() {
		return false
	}
	if !up.st.budget.withdraw(budgetOf(up.pol), time.Now()) {
		up.st.retriesOver.Add(1)
		return false
	}
	return true
}

func (up *upstream) observe(ep *endpoint, status int) {
	if up.dest != nil {
		up.st.observe(up.pod.proxy.log, ep, up.pol.Outlier, status)
	}
}

// tryBody is a try's response body: closing it ends the try.
type tryBody struct {
	io.ReadCloser
	ep     *endpoint
	rtt    time.Duration
	cancel context.CancelFunc
	closed atomic.Bool
}

func (b *tryBody) Close() error {
	err := b.ReadCloser.Close()
	if !b.closed.Swap(true) {
		b.ep.done(b.rtt)
		b.cancel()
	}
	return err
}

// errBodyReplaced is what a try still reading a request body gets once the body
// went to another try.
var errBodyReplaced = errors.New("request body taken by a retry")

// replayBody keeps what a request body has given, up to replayLimit, so that a
// retry can send it again: each try reads its own view, the kept bytes first and
// then the rest from the client. Past replayLimit nothing is kept and the body
// cannot be sent again.
type replayBody struct {
	src    io.ReadCloser
	readMu sync.Mutex // one read of src at a time

	mu   sync.Mutex
	buf  []byte
	read int   // bytes read from src
	over bool  // more than replayLimit read
	err  error // src's last error (io.EOF at the end)
	cur  *bodyView
}

// view is the body for the next try; the previous try's view reads no more.
func (b *replayBody) view() io.ReadCloser {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.cur != nil {
		b.cur.gone = true
	}
	b.cur = &bodyView{b: b}
	return b.cur
}

func (b *replayBody) replayable() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return !b.over
}

type bodyView struct {
	b    *replayBody
	pos  int
	gone bool // closed, or replaced by a later try's view
}

func (v *bodyView) Read(p []byte) (int, error) {
	b := v.b
	for {
		b.mu.Lock()
		switch {
		case v.gone:
			b.mu.Unlock()
			return 0, errBodyReplaced
		case v.pos < len(b.buf):
			n := copy(p, b.buf[v.pos:])
			v.pos += n
			b.mu.Unlock()
			return n, nil
		case v.pos < b.read: // kept no more (over the limit)
			b.mu.Unlock()
			return 0, errBodyReplaced
		case b.err != nil:
			b.mu.Unlock()
			return 0, b.err
		}
		b.mu.Unlock()

		// Not under mu: a read waits for the client, and a retry must be able
		// to replace this view meanwhile.
		b.readMu.Lock()
		b.mu.Lock()
		caughtUp := v.pos == b.read && b.err == nil
		b.mu.Unlock()
		if !caughtUp { // another view read meanwhile: serve from what it kept
			b.readMu.Unlock()
			continue
		}
		n, err := b.src.Read(p)
		b.mu.Lock()
		if !b.over {
			if len(b.buf)+n > replayLimit {
				b.over, b.buf = true, nil
			} else {
				b.buf = append(b.buf, p[:n]...)
			}
		}
		b.read += n
		v.pos += n
		b.err = err
		b.mu.Unlock()
		b.readMu.Unlock()
		return n, err
	}
}

func (v *bodyView) Close() error {
	v.b.mu.Lock()
	v.gone = true
	v.b.mu.Unlock()
	return nil
}

// upstreamConn is an upstream connection the transports pool: it gives back the
// Service's connection slot when it closes, and counts its requests for
// MaxRequestsPerConnection.
type upstreamConn struct {
	net.Conn
	requests atomic.Int64
	release  func() // nil: no connection limit
	once     sync.Once
}

func (c *upstreamConn) Close() error {
	err := c.Conn.Close()
	if c.release != nil {
		c.once.Do(c.release)
	}
	return err
}
