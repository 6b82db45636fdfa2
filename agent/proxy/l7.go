// This file is the proxy's L7 path: a connection to a Service port that speaks
// HTTP/1.1 or HTTP/2 (declared, or detected) is served by an HTTP server in the
// proxy, and each request goes to an endpoint of its own, picked by the Service's
// load balancer, over an upstream connection the proxy keeps per (source pod,
// endpoint): straight to a pod on this node, a stream of the pooled mTLS tunnel to a
// pod on another, plaintext outside the mesh. The destination node's proxy carries
// such a stream to the app like any other, so the app hears its own protocol.

package proxy

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ferrymesh/ferry/agent/pipe"
	"github.com/ferrymesh/ferry/agent/tracing"
	"github.com/ferrymesh/ferry/agent/tunnel"
	"github.com/ferrymesh/ferry/api/admin"
	"github.com/ferrymesh/ferry/internal/rawsock"
)

// l7 serves the HTTP connections of every pod on this node.
type l7 struct {
	srv   *http.Server
	ln    *connListener
	proxy *httputil.ReverseProxy
	mu    sync.Mutex
	conns map[*httpConn]struct{} // open, including hijacked (upgraded) ones
	// stopped and wg: the mirrored requests in flight (routing.go), which stop
	// waits for.
	stopped bool
	wg      sync.WaitGroup
	limits  Limits // limits.go
}

func (p *Proxy) newL7() *l7 {
	h := &l7{ln: newConnListener(), conns: map[*httpConn]struct{}{}}
	var protocols http.Protocols
	protocols.SetHTTP1(true)
	protocols.SetUnencryptedHTTP2(true) // prior knowledge, as a client with h2c speaks
	errLog := slog.NewLogLogger(p.log.Handler(), slog.LevelDebug)
	h.srv = &http.Server{
		Handler:   http.HandlerFunc(p.serveRequest),
		Protocols: &protocols,
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			return context.WithValue(ctx, httpConnKey{}, c.(*httpConn))
		},
		ErrorLog: errLog,
	}
	h.limits = p.cfg.Limits.withDefaults()
	h.limits.apply(h.srv)
	h.proxy = &httputil.ReverseProxy{
		Rewrite:       rewrite,
		Transport:     upstreamTransport{},
		FlushInterval: -1, // streams (gRPC, SSE, long polls) flow as they come
		ErrorHandler:  upstreamError,
		ErrorLog:      errLog,
		BufferPool:    &copyBuffers{},
	}
	return h
}

// serveHTTP hands c, a client connection whose protocol is HTTP, to the HTTP
// server; rec is its connection record, closed when the connection ends.
func (p *Proxy) serveHTTP(pd *pod, c *net.TCPConn, r io.Reader, rec Conn, h *hold) {
	hc := &httpConn{Conn: rawsock.Wrap(c), r: r, p: p, pd: pd, hold: h}
	if r == nil {
		hc.r = hc.Conn
	}
	hc.rec = p.conns.open(rec)
	p.l7.serve(hc)
}

// serveInboundHTTP serves the HTTP requests a source node's proxy sends through a
// tunnel stream into pod pd: each goes to the app at the stream's target, and is
// recorded on this side too (reporter destination). The stream itself is recorded
// by the tunnel's report when it ends.
func (p *Proxy) serveInboundHTTP(pd *pod, si tunnel.StreamInfo, c net.Conn) {
	hc := &httpConn{Conn: c, r: c, p: p, pd: pd, inbound: &endpoint{addr: si.Target}, rec: &Conn{
		Direction: admin.Inbound, Pod: pd.w.Name, Src: si.Remote, Dst: si.Target,
		SrcIdentity: si.PeerID, DstIdentity: pd.w.Identity, Security: admin.MTLS,
	}}
	p.l7.serve(hc)
}

func (h *l7) serve(hc *httpConn) {
	h.mu.Lock()
	h.conns[hc] = struct{}{}
	h.mu.Unlock()
	if !h.ln.put(hc) {
		hc.Close() // the proxy is stopping
	}
}

// stop ends the HTTP server: requests in flight get until ctx ends, then every
// connection, upgraded ones too, is closed. Mirrored requests end with their pods,
// which the proxy has closed by then.
func (h *l7) stop(ctx context.Context) {
	h.ln.Close()
	_ = h.srv.Shutdown(ctx)
	_ = h.srv.Close()
	h.mu.Lock()
	h.stopped = true
	conns := make([]*httpConn, 0, len(h.conns))
	for c := range h.conns {
		conns = append(conns, c)
	}
	h.mu.Unlock()
	for _, c := range conns {
		c.Close()
	}
	h.wg.Wait()
}

// serveRequest carries one request to an endpoint of the Service the client
// dialled, or of the Service its route sends it to.
func (p *Proxy) serveRequest(w http.ResponseWriter, r *http.Request) {
	hc := r.Context().Value(httpConnKey{}).(*httpConn)
	rec := Conn{
		Direction: hc.rec.Direction, Pod: hc.rec.Pod, Src: hc.rec.Src, Dst: hc.rec.Dst, Service: hc.rec.Service,
		SrcIdentity: hc.rec.SrcIdentity, DstIdentity: hc.rec.DstIdentity, Security: hc.rec.Security,
		Protocol: requestProtocol(r), Start: time.Now(),
		HTTP: &admin.HTTP{Method: r.Method, Authority: r.Host, Path: r.URL.RequestURI(), Proto: r.Proto},
	}
	rw := &responseWriter{ResponseWriter: w}
	defer p.recoverRequest(hc.pd)
	defer func() { p.conns.request(rec, rw, recover()) }()
	if p.onRequest != nil {
		p.onRequest(r)
	}
	src := "" // the tenant: pod a's apps, or the source identity of a tunnel stream
	if hc.inbound != nil {
		src = rec.SrcIdentity
	}
	h, over := p.takeRequest(hc.pd, src)
	if over != nil {
		rec.Verdict, rec.Reason, rec.Budget, rec.Error = admin.VerdictDenied, admin.ReasonPodBudget, over.Budget, over.Error()
		meshAnswer(rw, http.StatusServiceUnavailable, over.Error())
		return
	}
	defer h.release()
	if r = p.limitRequest(rw, r, &rec); r == nil {
		return
	}

	// Routes, policies and the app all see one form of the path.
	if err := normalizeRequest(r, p.pathOptions().EscapedSlashes); err != nil {
		rec.Verdict, rec.Reason, rec.Error = admin.VerdictDenied, admin.ReasonOther, err.Error()
		meshAnswer(rw, http.StatusBadRequest, err.Error())
		return
	}
	rec.HTTP.Path = r.URL.RequestURI()
	if hc.inbound != nil {
		if !p.admitRequest(hc.pd, callerOf(rec.SrcIdentity, rec.Src.Addr()), hc.inbound.addr.Port(), r, rw, &rec) {
			return
		}
		// The app behind the tunnel stream, on the destination's side, where its
		// rate limit is taken.
		if !p.allowInto(hc.pd, time.Now()) {
			rec.Verdict, rec.Reason = admin.VerdictDenied, admin.ReasonRateLimited
			meshAnswer(rw, errRateLimited.status, errRateLimited.why)
			return
		}
		from, _ := p.workloadAt(rec.Src.Addr())
		up := &upstream{pod: hc.pd, ep: hc.inbound, h2: r.ProtoMajor == 2}
		p.forward(rw, r, up, &rec, p.cfg.Tracer.Server, from, hc.pd.w, "")
		return
	}
	out := r.WithContext(r.Context()) // the proxy's copy, which routes may change
	dest, rule, answered := p.routeRequest(hc, rw, out, &rec)
	if answered {
		return
	}
	if rule != nil && rule.RequestTimeout > 0 {
		// The whole request, every try of it: at the deadline the upstream
		// request is canceled and the client answered 504 (upstreamError).
		ctx, cancel := context.WithTimeout(out.Context(), rule.RequestTimeout)
		defer cancel()
		out = out.WithContext(ctx)
	}
	p.send(rw, out, dest, rule, &rec)
}

// rewrite addresses the request to the chosen endpoint and otherwise forwards what
// the client sent: a transparent mesh invents no X-Forwarded-* (ReverseProxy drops
// the client's own before Rewrite, so they are put back).
func rewrite(pr *httputil.ProxyRequest) {
	up := pr.In.Context().Value(upstreamKey{}).(*upstream)
	pr.Out.URL.Scheme = "http"
	pr.Out.URL.Host = up.ep.addr.String()
	for _, h := range []string{"Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto"} {
		if v, ok := pr.In.Header[h]; ok {
			pr.Out.Header[h] = v
		}
	}
}

// upstreamError answers a request whose endpoint could not be reached, or failed
// before its response began (ReverseProxy's ErrorHandler).
func upstreamError(w http.ResponseWriter, r *http.Request, err error) {
	up := r.Context().Value(upstreamKey{}).(*upstream)
	up.err = err
	if be := bodyFailure(r); be != nil {
		// The client's body failed (malformed, or too slow): its fault, not the
		// upstream's.
		status, why := be.answer()
		meshAnswer(w, status, why)
		return
	}
	switch ctxErr := r.Context().Err(); {
	case errors.Is(ctxErr, context.DeadlineExceeded):
		// A request timeout (the route's or the policy's): the client's own
		// context has no deadline.
		meshAnswer(w, http.StatusGatewayTimeout, "upstream request timeout")
		return
	case ctxErr != nil:
		return // the client is gone: nobody to answer
	}
	var me *meshError
	if errors.As(err, &me) {
		meshAnswer(w, me.status, me.why)
		return
	}

	status := http.StatusBadGateway
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded) {
		status = http.StatusGatewayTimeout
	}
	_, reason, _ := dialOutcome(err)
	meshAnswer(w, status, "upstream "+string(reason))
}

// meshAnswer is a response the mesh gives itself, in Envoy's manner: a status and
// one line saying why.
func meshAnswer(w http.ResponseWriter, status int, why string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(status)
	fmt.Fprintln(w, why)
}

type upstreamKey struct{}
type httpConnKey struct{}

// upstreamIdleTimeout is how long an upstream connection may stay idle in the
// pool when the Service's TrafficPolicy sets no idle timeout.
const upstreamIdleTimeout = 90 * time.Second

// transportKey names one of a pod's pools: HTTP/1.1 or HTTP/2, and the idle timeout
// of its connections.
type transportKey struct {
	h2   bool
	idle time.Duration
}

// transport returns the pod's pool of upstream connections for HTTP/1.1 or (h2)
// HTTP/2 with prior knowledge whose connections close after idle without a request
// (0: upstreamIdleTimeout), made on first use. A TrafficPolicy's idle timeout thus
// gets a pool of its own: http.Transport has one idle timeout for all its
// connections, and a pod's pools are shared by every Service it calls. Pools are
// few: one per distinct idle timeout of the policies in force, and one whose
// Service's policy went keeps no connection past its idle timeout.
func (pd *pod) transport(h2 bool, idle time.Duration) *http.Transport {
	if idle <= 0 {
		idle = upstreamIdleTimeout
	}
	k := transportKey{h2: h2, idle: idle}
	pd.transportsMu.RLock()
	t := pd.transports[k]
	pd.transportsMu.RUnlock()
	if t != nil {
		return t
	}
	pd.transportsMu.Lock()
	defer pd.transportsMu.Unlock()
	if t = pd.transports[k]; t == nil {
		if pd.transports == nil {
			pd.transports = map[transportKey]*http.Transport{}
		}
		t = pd.newTransport(h2, idle)
		pd.transports[k] = t
	}
	return t
}

func (pd *pod) newTransport(h2 bool, idle time.Duration) *http.Transport {
	var protocols http.Protocols
	if h2 {
		protocols.SetUnencryptedHTTP2(true)
	} else {
		protocols.SetHTTP1(true)
	}
	return &http.Transport{
		Protocols:           &protocols,
		DialContext:         pd.dialUpstream,
		DisableCompression:  true, // the app's Accept-Encoding and bodies pass as they are
		MaxIdleConnsPerHost: 64,
		IdleConnTimeout:     idle,
		Proxy:               nil, // never an HTTP_PROXY from the agent's environment
	}
}

// dialUpstream opens an upstream connection from the pod to an endpoint, the way a
// connection to it would be carried (route), within the connect timeout and
// connection limit of the Service the request that asked for it is bound to. ctx
// is the transport's: it has the request's values, and ends when the request no
// longer wants the connection.
func (pd *pod) dialUpstream(ctx context.Context, _, addr string) (net.Conn, error) {
	dst, err := netip.ParseAddrPort(addr)
	if err != nil {
		return nil, fmt.Errorf("upstream address %q: %w", addr, err)
	}
	timeout := dialTimeout
	up, _ := ctx.Value(upstreamKey{}).(*upstream)
	if up != nil && up.dest != nil && up.pol.ConnectTimeout > 0 {
		timeout = up.pol.ConnectTimeout
	}
	dctx, cancel := context.WithTimeout(pd.ctx, timeout)
	defer cancel()
	defer context.AfterFunc(ctx, cancel)()
	c := &upstreamConn{}
	if up != nil && up.dest != nil && up.pol.MaxConnections > 0 {
		st := up.st
		if err := st.connections.acquire(dctx, up.pol.MaxConnections, up.pol.MaxPendingRequests, &st.pending); err != nil {
			if errors.Is(err, errCircuitOpen) {
				st.circuitOpen.Add(1)
				return nil, errConnectionOverflow
			}
			return nil, fmt.Errorf("wait for a connection to %s: %w", dst, err)
		}
		c.release = st.connections.release
	}
	p := pd.proxy
	p.mu.RLock()
	r := decide(dst.Addr(), p.byIP, p.local)
	p.mu.RUnlock()
	hc, err := p.dialRoute(dctx, pd, dst, r, tunnel.ProtocolHTTP)
	if err != nil {
		if c.release != nil {
			c.release()
		}
		return nil, err
	}
	if nc, ok := hc.(net.Conn); ok {
		c.Conn = rawsock.Wrap(nc)
	} else {
		c.Conn = streamConn{HalfCloser: hc, remote: dst}
	}
	return c, nil
}

// closeTransports drops the pod's idle upstream connections; requests in flight
// finish on theirs. A pool made after it dials nothing: the pod's context, which
// dialUpstream dials within, has ended.
func (pd *pod) closeTransports() {
	pd.transportsMu.RLock()
	defer pd.transportsMu.RUnlock()
	for _, t := range pd.transports {
		t.CloseIdleConnections()
	}
}

// streamConn is a tunnel stream as the net.Conn an HTTP transport wants. Deadlines
// are not set by the transports as configured here; the stream ends with its context.
type streamConn struct {
	pipe.HalfCloser
	remote netip.AddrPort
}

func (streamConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (s streamConn) RemoteAddr() net.Addr           { return net.TCPAddrFromAddrPort(s.remote) }
func (streamConn) SetDeadline(time.Time) error      { return nil }
func (streamConn) SetReadDeadline(time.Time) error  { return nil }
func (streamConn) SetWriteDeadline(time.Time) error { return nil }

// httpConn is a client connection the HTTP server serves: it carries the pod it
// came from and its connection record, counts its bytes, and ends the record when
// it closes.
type httpConn struct {
	net.Conn
	r  io.Reader // the connection, after the bytes protocol detection read
	p  *Proxy
	pd *pod
	// rec is the connection's record: tracked for a client's connection (outbound),
	// a template for the requests of a tunnel stream (inbound).
	rec *Conn
	// inbound is the app a tunnel stream's requests go to; nil for a client's
	// connection, whose requests are balanced over the Service's endpoints.
	inbound *endpoint
	// hold is what the connection takes of its pod's budgets, given back on Close.
	hold     *hold
	in, out  atomic.Int64
	closeOne sync.Once
}

func (c *httpConn) Read(b []byte) (int, error) {
	n, err := c.r.Read(b)
	c.in.Add(int64(n))
	return n, err
}

func (c *httpConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	c.out.Add(int64(n))
	return n, err
}

func (c *httpConn) Close() error {
	err := c.Conn.Close()
	c.closeOne.Do(func() {
		c.p.l7.mu.Lock()
		delete(c.p.l7.conns, c)
		c.p.l7.mu.Unlock()
		if c.inbound == nil {
			c.p.conns.close(c.rec, c.in.Load(), c.out.Load(), nil)
		}
		c.hold.release()
	})
	return err
}

// connListener is the HTTP server's listener: connections arrive from the pods'
// outbound listeners once their protocol is known.
type connListener struct {
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
}

func newConnListener() *connListener {
	return &connListener{conns: make(chan net.Conn), done: make(chan struct{})}
}

// put hands c to the server; false once the listener is closed.
func (l *connListener) put(c net.Conn) bool {
	select {
	case l.conns <- c:
		return true
	case <-l.done:
		return false
	}
}

func (l *connListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *connListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *connListener) Addr() net.Addr { return &net.TCPAddr{} }

// responseWriter notes what the response was, for the request's record and the
// endpoint's latency, and applies the route's response header filters to it (to
// the mesh's own answers too); Unwrap lets ReverseProxy flush and hijack through
// it.
type responseWriter struct {
	http.ResponseWriter
	status       int
	headerAt     time.Time
	bytes        int64
	requestBytes atomic.Int64
	modifiers    []*HeaderModifier
}

func (w *responseWriter) WriteHeader(code int) {
	if w.status == 0 && (code >= 200 || code == http.StatusSwitchingProtocols) {
		w.status, w.headerAt = code, time.Now()
		h := w.ResponseWriter.Header()
		for _, m := range w.modifiers {
			m.apply(h)
		}
		// net/http would add these to a response without them: nothing invented.
		for _, k := range []string{"Date", "Content-Type"} {
			if _, ok := h[k]; !ok {
				h[k] = nil
			}
		}
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *responseWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.WriteHeader(http.StatusOK)
	}
	n, err := w.ResponseWriter.Write(b)
	w.bytes += int64(n)
	return n, err
}

func (w *responseWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// countingBody counts a request body's bytes as the upstream reads them.
type countingBody struct {
	io.ReadCloser
	n *atomic.Int64
}

func (b *countingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.n.Add(int64(n))
	return n, err
}

// copyBuffers lends ReverseProxy its body copy buffers, so a request allocates none.
// A pool holds pointers; the emptied pointers are kept in a pool of their own, so
// that Put does not allocate one for every buffer it is given back.
type copyBuffers struct{ pool, holders sync.Pool }

func (c *copyBuffers) Get() []byte {
	if bp, ok := c.pool.Get().(*[]byte); ok {
		b := *bp
		*bp = nil
		c.holders.Put(bp)
		return b
	}
	return make([]byte, 32<<10)
}

func (c *copyBuffers) Put(b []byte) {
	bp, ok := c.holders.Get().(*[]byte)
	if !ok {
		bp = new([]byte)
	}
	*bp = b
	c.pool.Put(bp)
}

// requestProtocol says what a request is: gRPC is HTTP/2 with a gRPC content type.
func requestProtocol(r *http.Request) admin.Protocol {
	if r.ProtoMajor != 2 {
		return admin.HTTP1
	}
	if ct := r.Header.Get("Content-Type"); strings.HasPrefix(ct, "application/grpc") {
		return admin.GRPC
	}
	return admin.HTTP2
}

// spanAttrs describes a hop from workload from to workload to (either may be
// unknown: outside the mesh) for its span.
func spanAttrs(from, to Workload, service string, upstream netip.AddrPort) tracing.Attrs {
	a := tracing.Attrs{Upstream: upstream.String()}
	a.SourceNamespace, a.SourceWorkload, _ = strings.Cut(cmp.Or(from.Workload, from.Name), "/")
	a.DestinationNamespace, a.DestinationWorkload, _ = strings.Cut(cmp.Or(to.Workload, to.Name), "/")
	if ns, name, ok := strings.Cut(service, "/"); ok {
		a.Service = name + "." + ns + ".svc.cluster.local"
	}
	return a
}

// grpcStatus is the grpc-status a response carried: in its trailers, or in its
// headers for a trailers-only response.
func grpcStatus(h http.Header) string {
	if s := h.Get("Grpc-Status"); s != "" {
		return s
	}
	return h.Get(http.TrailerPrefix + "Grpc-Status")
}
