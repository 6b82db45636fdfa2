// Package tunnel carries TCP connections between nodes over mutual TLS: HTTP/2 CONNECT
// streams multiplexed on one TLS 1.3 session per (source pod, destination), in the
// style of Istio ambient's HBONE. The server side runs on each pod's :15008 listener;
// the client side is a Pool of such sessions.
//
// Which network namespace to dial from or listen in is the caller's business: the pool
// dials through a Source handle and the server through a dial callback, so this
// package is plain Go and testable on loopback.
package tunnel

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/ferrymesh/ferry/agent/pipe"
	"github.com/ferrymesh/ferry/api/spiffe"
)

// ReasonHeader carries, on a refused CONNECT, why the destination refused it.
const ReasonHeader = "Ferry-Error"

// The headers as HTTP/2 spells them (lower case).
const (
	reasonField   = "ferry-error"
	retryField    = "ferry-retry"
	protocolField = "ferry-protocol"
)

// RetryHeader, set to RetryNewTunnel on a refused CONNECT, says the refusal is the
// tunnel's (retired, or its server closing), not the stream's: the source may send
// the stream again on another tunnel. Other refusals (a budget, a policy) stand.
const (
	RetryHeader    = "Ferry-Retry"
	RetryNewTunnel = "new-tunnel"
)

// Flow-control and framing sizes, tuned for bulk throughput on fast links: a stream may
// have 4 MiB in flight and a connection 16 MiB before the receiver must read.
const (
	maxStreamWindow   = 4 << 20
	maxConnWindow     = 16 << 20
	maxFrameSize      = 1 << 20
	maxStreamsPerConn = 512
	defaultDialTO     = 5 * time.Second
	keepaliveInterval = 30 * time.Second
	keepaliveTimeout  = 15 * time.Second
	serverIdleTimeout = 10 * time.Minute
)

// ServerConfig configures a tunnel Server.
type ServerConfig struct {
	// TLS returns the TLS configuration for a listener (one pod's tunnel port), given
	// its local address. It is called once per Serve, so session tickets work across
	// the listener's connections. It must require and verify client certificates, as
	// identity.Store.ServerConfig does.
	TLS func(local net.Addr) (*tls.Config, error)
	// Authorize decides whether the verified client identity peerID may use a tunnel
	// from remote (the source pod's address): the control plane says which workload
	// holds each pod IP. It runs inside the handshake, also on resumption, so a refusal
	// is a TLS alert. Nil accepts any identity the TLS configuration accepted.
	Authorize func(peerID string, remote netip.AddrPort) error
	// Admit, optional, decides each stream before it is dialled or served: peerID
	// (verified) from remote asks for target; httpStream says its CONNECT carries
	// ProtocolHTTP (ServeHTTP then decides each request). A refusal is answered 403
	// with the error as the reason, and is StreamInfo.Err. It runs for every CONNECT,
	// so a policy changed while a tunnel is open applies to its next stream; so does
	// Authorize, run again per stream, and the certificates' validity (lifetime.go).
	Admit func(peerID string, remote, target netip.AddrPort, httpStream bool) error
	// Changes, optional, returns a channel closed when this side's certificates may
	// have changed (identity.Store.Changed): connections made with a certificate the
	// listener no longer presents are then retired (GOAWAY; their streams drain).
	// Without it a rotation is noticed at the connection's next stream.
	Changes func() <-chan struct{}
	// Hold, optional, takes what a stream of peerID costs of a budget before it is
	// admitted, dialled or served; release runs when the stream ends. A refusal is
	// answered 503 with the error as the reason, and is StreamInfo.Err.
	Hold func(peerID string, remote netip.AddrPort) (release func(), err error)
	// Dial connects to the application at target, e.g. from 127.0.0.6 inside the pod.
	Dial func(ctx context.Context, target netip.AddrPort) (net.Conn, error)
	// DialTimeout bounds Dial; 5 s when zero.
	DialTimeout time.Duration
	// Limits bounds what one connection may hold (limits.go); zero fields take
	// DefaultServerLimits.
	Limits ServerLimits
	// OnHandshakeFailed, optional, is told of each refused handshake, with its
	// typed reason.
	OnHandshakeFailed func(remote netip.AddrPort, err *HandshakeError)
	// Logger receives connection-level events; nil discards them.
	Logger *slog.Logger
	// OnStream, optional, is called when a stream ends.
	OnStream func(StreamInfo)
	// ServeHTTP, optional, takes over a stream whose CONNECT says ProtocolHTTP: it
	// serves c, the stream as a connection (HTTP requests the source node's proxy
	// sends), and closes c when done; it must not block. The stream ends when c is
	// closed or the peer resets it. Nil: such streams are dialled like any other.
	ServeHTTP func(si StreamInfo, c net.Conn)
}

// ProtocolHeader, on a CONNECT, says what the stream carries; absent, it is a byte
// stream for the app. A peer that does not know it (an HBONE peer) ignores it.
const ProtocolHeader = "Ferry-Protocol"

// ProtocolHTTP is ProtocolHeader's value for a stream of HTTP/1.1 requests, or an
// HTTP/2 connection with prior knowledge, from the source node's proxy.
const ProtocolHTTP = "http"

// StreamInfo describes one tunnelled connection, reported when it ends.
type StreamInfo struct {
	PeerID string // client's SPIFFE ID
	// PeerSerial is the serial number (hex) of the certificate the client
	// presented, or made the resumed session with.
	PeerSerial string
	Target     netip.AddrPort // original destination (CONNECT authority)
	Remote     netip.AddrPort // client's address (the source pod)
	BytesIn    int64          // from the peer to the application
	BytesOut   int64          // from the application to the peer
	Duration   time.Duration
	Status     int   // HTTP status answered to the CONNECT
	Err        error // nil when both directions ended cleanly
	// HTTP: the stream carried HTTP requests that ServeHTTP served.
	HTTP bool
}

// Server terminates tunnels: it accepts TLS connections, serves HTTP/2 CONNECT streams
// and pipes each one to the application.
type Server struct {
	cfg ServerConfig
	log *slog.Logger

	ctx    context.Context
	cancel context.CancelFunc

	mu     sync.Mutex
	closed bool // no new listener or connection (Shutdown, Close)
	// stopped: no new stream either (Close). After Shutdown's GOAWAY, streams the
	// peer opened before it saw the GOAWAY (IDs up to the last one announced) are
	// still served, or they would fail after a handoff's drain began.
	stopped   bool
	listeners map[net.Listener]struct{}
	conns     map[net.Conn]struct{}
	tconns    map[net.Conn]*tunnelConn // each connection's lifetime (lifetime.go)
	watch     sync.Once                // starts watchRotations with the first Serve
	wg        sync.WaitGroup           // Serve loops, connections and stream handlers
	watcher   sync.WaitGroup           // the rotation watcher: it ends with ctx, so Shutdown (which waits for wg) does not wait for it
}

// NewServer validates cfg; nothing runs until Serve.
func NewServer(cfg ServerConfig) (*Server, error) {
	if cfg.TLS == nil {
		return nil, errors.New("tunnel server: TLS is required")
	}
	if cfg.Dial == nil {
		return nil, errors.New("tunnel server: Dial is required")
	}
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = defaultDialTO
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	cfg.Limits = cfg.Limits.withDefaults()
	ctx, cancel := context.WithCancel(context.Background())
	return &Server{
		cfg:       cfg,
		log:       log,
		ctx:       ctx,
		cancel:    cancel,
		listeners: map[net.Listener]struct{}{},
		conns:     map[net.Conn]struct{}{},
		tconns:    map[net.Conn]*tunnelConn{},
	}, nil
}

// ErrServerClosed is returned by Serve after Close or Shutdown.
var ErrServerClosed = errors.New("tunnel server closed")

// Serve accepts tunnel connections on ln until the server is closed. The listener is
// closed on return.
func (s *Server) Serve(ln net.Listener) error {
	base, err := s.cfg.TLS(ln.Addr())
	if err != nil {
		ln.Close()
		return fmt.Errorf("tunnel tls config: %w", err)
	}
	if !s.track(ln, nil) {
		ln.Close()
		return ErrServerClosed
	}
	defer s.untrack(ln, nil)
	defer ln.Close()
	s.watch.Do(s.watchRotations)
	local := addrPort(ln.Addr())
	tlsCfg := s.listenerTLS(base)
	var backoff time.Duration
	for {
		raw, err := ln.Accept()
		if err != nil {
			if s.isClosed() {
				return ErrServerClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				// Out of descriptors or a transient error: back off instead of spinning.
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.log.Warn("tunnel accept", "error", err)
				select {
				case <-time.After(backoff):
					continue
				case <-s.ctx.Done():
					return ErrServerClosed
				}
			}
			return fmt.Errorf("tunnel accept: %w", err)
		}
		backoff = 0
		if !s.track(nil, raw) {
			raw.Close()
			return ErrServerClosed
		}
		go s.serveConn(raw, tlsCfg, local)
	}
}

// listenerTLS wraps a listener's configuration so Authorize sees each connection's
// remote address, and a refusal says which check made it (verifyClient), and so the
// connection's lifetime knows its certificate (bindLifetime). The per-connection
// clone is returned from GetConfigForClient, which keeps using the listener
// configuration's session ticket keys, so resumption works.
func (s *Server) listenerTLS(base *tls.Config) *tls.Config {
	outer := base.Clone()
	outer.GetConfigForClient = func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
		remote := addrPort(hello.Conn.RemoteAddr())
		c := base.Clone()
		if tc := s.tunnelConnOf(hello.Conn); tc != nil {
			bindLifetime(c, outer, base, hello, tc)
		}
		var authorize func(tls.ConnectionState) error
		if s.cfg.Authorize != nil {
			authorize = func(cs tls.ConnectionState) error {
				id, err := spiffe.FromCert(cs.PeerCertificates[0])
				if err != nil {
					return err
				}
				return s.cfg.Authorize(id, remote)
			}
		}
		verifyClient(c, authorize)
		return c, nil
	}
	return outer
}

// connInfo is what every stream of one tunnel connection shares.
type connInfo struct {
	peerID string
	remote netip.AddrPort
	local  netip.AddrPort
	tc     *tunnelConn
}

func (s *Server) serveConn(raw net.Conn, cfg *tls.Config, local netip.AddrPort) {
	defer s.untrack(nil, raw)
	defer raw.Close()
	remote := addrPort(raw.RemoteAddr())
	life := &tunnelConn{}
	// The TLS server's hello.Conn: tunnelConnOf finds the lifetime by it.
	bc := newBatchConn(raw)
	s.mu.Lock()
	s.tconns[bc] = life
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.tconns, bc)
		s.mu.Unlock()
		life.end()
	}()
	tc := tls.Server(bc, cfg)
	hctx, cancel := context.WithTimeout(s.ctx, s.cfg.Limits.HandshakeTimeout)
	err := tc.HandshakeContext(hctx)
	if err != nil {
		he := handshakeError(hctx, err)
		cancel()
		s.log.Info("tunnel handshake refused", "remote", remote.String(), "reason", string(he.Reason), "error", err)
		if s.cfg.OnHandshakeFailed != nil {
			s.cfg.OnHandshakeFailed(remote, he)
		}
		return
	}
	cancel()
	cs := tc.ConnectionState()
	if cs.NegotiatedProtocol != "h2" {
		s.log.Info("tunnel refused", "remote", remote.String(), "error", "ALPN is not h2")
		return
	}
	peerID, err := spiffe.FromCert(cs.PeerCertificates[0])
	if err != nil {
		s.log.Info("tunnel refused", "remote", remote.String(), "error", err)
		return
	}
	s.begin(life, cs)
	if life.rotated() {
		s.log.Info("tunnel refused", "remote", remote.String(), "error", "certificate rotated during the handshake")
		return
	}
	ci := &connInfo{peerID: peerID, remote: remote, local: local, tc: life}
	s.log.Debug("tunnel connection", "remote", remote.String(), "peer", peerID, "resumed", cs.DidResume)
	l := s.cfg.Limits
	c, err := newH2conn(tc, bc, h2config{
		server:         true,
		maxStreams:     l.MaxConcurrentStreams,
		maxHeaderBytes: l.MaxHeaderBytes,
		headerTable:    l.MaxDecoderHeaderTableSize,
		readIdle:       l.ReadIdleTimeout,
		pingTimeout:    l.PingTimeout,
		idleTimeout:    l.IdleTimeout,
		onStream:       func(st *h2stream, h *h2headers) { s.handle(st, h, ci) },
		log:            s.log,
	})
	if err != nil {
		s.log.Info("tunnel connection", "remote", remote.String(), "error", err)
		return
	}
	life.serve(c)
	<-c.done
}

func (s *Server) handle(st *h2stream, h *h2headers, ci *connInfo) {
	// Register the handler before anything else so Close waits for it; a handler that
	// starts after Close has begun is turned away. Its connection is counted in wg
	// until it ends, so the Add below never races with Shutdown's Wait.
	s.mu.Lock()
	if s.stopped {
		s.mu.Unlock()
		st.respond(http.StatusServiceUnavailable, true, retryField, RetryNewTunnel)
		return
	}
	s.wg.Add(1)
	s.mu.Unlock()
	defer s.wg.Done()

	start := time.Now()
	info := StreamInfo{Remote: ci.remote, PeerID: ci.peerID}
	if ci.tc != nil {
		ci.tc.mu.Lock()
		info.PeerSerial = ci.tc.peerSerial
		ci.tc.mu.Unlock()
	}
	defer func() {
		if s.cfg.OnStream != nil {
			info.Duration = time.Since(start)
			s.cfg.OnStream(info)
		}
	}()
	refuse := func(status int, reason string, fields ...string) {
		info.Status = status
		info.Err = fmt.Errorf("%d %s", status, reason)
		st.respond(status, true, append([]string{reasonField, reason}, fields...)...)
	}

	switch {
	case h.truncated:
		refuse(http.StatusRequestHeaderFieldsTooLarge, "request headers too large")
		return
	case h.method != http.MethodConnect || h.malformed || h.protocol == "" && (h.scheme != "" || h.path != ""):
		refuse(http.StatusBadRequest, "method must be CONNECT")
		return
	}
	target, err := netip.ParseAddrPort(h.authority)
	if err != nil || target.Port() == 0 || !target.Addr().IsValid() || target.Addr().IsUnspecified() || target.Addr().IsMulticast() {
		refuse(http.StatusBadRequest, "authority must be ip:port")
		return
	}
	target = netip.AddrPortFrom(target.Addr().Unmap(), target.Port())
	info.Target = target
	// The listener lives in the destination pod: it only reaches that pod, so a peer
	// cannot use one pod's tunnel to reach a neighbour on the same node.
	if la := ci.local.Addr(); la.IsValid() && !la.IsUnspecified() && la.Unmap() != target.Addr() {
		refuse(http.StatusForbidden, "target is not this pod")
		return
	}

	if status, err := s.streamRefusal(ci.tc, ci); err != nil {
		if status == http.StatusServiceUnavailable {
			refuse(status, err.Error(), retryField, RetryNewTunnel)
		} else {
			refuse(status, err.Error())
		}
		info.Err = err
		return
	}
	if s.cfg.Hold != nil {
		release, err := s.cfg.Hold(ci.peerID, ci.remote)
		if err != nil {
			refuse(http.StatusServiceUnavailable, err.Error())
			info.Err = err
			return
		}
		defer release()
	}
	httpStream := s.cfg.ServeHTTP != nil && h.get(protocolField) == ProtocolHTTP
	if s.cfg.Admit != nil {
		if err := s.cfg.Admit(ci.peerID, ci.remote, target, httpStream); err != nil {
			refuse(http.StatusForbidden, err.Error())
			info.Err = err
			return
		}
	}
	st.local, st.remote = net.TCPAddrFromAddrPort(target), net.TCPAddrFromAddrPort(ci.remote)
	if httpStream {
		info.HTTP = true
		s.serveHTTP(st, &info)
		return
	}

	dctx, cancel := context.WithTimeout(st.ctx, s.cfg.DialTimeout)
	app, err := s.cfg.Dial(dctx, target)
	cancel()
	if err != nil {
		status := http.StatusBadGateway
		if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded) || isTimeout(err) {
			status = http.StatusGatewayTimeout
		}
		refuse(status, dialReason(err))
		info.Err = fmt.Errorf("dial %s: %w", target, err)
		return
	}
	info.Status = http.StatusOK
	if err := st.respond(http.StatusOK, false); err != nil {
		app.Close()
		st.Close()
		info.Err = fmt.Errorf("answer: %w", err)
		return
	}
	// A reset stream or a closed tunnel ends the stream's context: drop the app
	// connection so both copies unblock.
	stop := context.AfterFunc(st.ctx, func() { app.Close() })
	defer stop()
	hc, ok := app.(pipe.HalfCloser)
	if !ok {
		hc = halfCloser{app}
	}
	in, out, err := pipe.Join(st, hc, false)
	info.BytesIn, info.BytesOut = in, out
	if err != nil && !errors.Is(err, net.ErrClosed) {
		info.Err = err
	}
}

// halfCloser gives an application connection that cannot half-close a CloseWrite
// that does nothing.
type halfCloser struct{ net.Conn }

func (h halfCloser) CloseWrite() error {
	if cw, ok := h.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// Close stops listening, closes every tunnel connection (resetting their streams) and
// waits for all goroutines the server started.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed, s.stopped = true, true
	for ln := range s.listeners {
		ln.Close()
	}
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.cancel()
	s.wg.Wait()
	s.watcher.Wait()
	return nil
}

// Shutdown stops listening, tells clients with GOAWAY to open no new streams, and waits
// for the streams in progress to end or ctx to expire; then it closes what is left.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.closed = true
	for ln := range s.listeners {
		ln.Close()
	}
	s.mu.Unlock()
	// Sends GOAWAY on every connection; each closes once its streams are done.
	s.retireAll("server shutting down")
	done := make(chan struct{})
	go func() {
		s.wg.Wait()
		close(done)
	}()
	var err error
	select {
	case <-done:
	case <-ctx.Done():
		err = ctx.Err()
	}
	s.Close()
	<-done
	return err
}

func (s *Server) track(ln net.Listener, c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	if ln != nil {
		s.listeners[ln] = struct{}{}
	}
	if c != nil {
		s.conns[c] = struct{}{}
	}
	s.wg.Add(1)
	return true
}

func (s *Server) untrack(ln net.Listener, c net.Conn) {
	s.mu.Lock()
	if ln != nil {
		delete(s.listeners, ln)
	}
	if c != nil {
		delete(s.conns, c)
	}
	s.mu.Unlock()
	s.wg.Done()
}

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// dialReason is a short, stable reason for a failed dial, for the client's logs.
func dialReason(err error) string {
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return "connection refused"
	case errors.Is(err, syscall.EHOSTUNREACH):
		return "host unreachable"
	case errors.Is(err, syscall.ENETUNREACH):
		return "network unreachable"
	case errors.Is(err, context.DeadlineExceeded), isTimeout(err):
		return "dial timeout"
	default:
		return "dial failed"
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func addrPort(a net.Addr) netip.AddrPort {
	switch a := a.(type) {
	case *net.TCPAddr:
		ap := a.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	case nil:
		return netip.AddrPort{}
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}
