package tunnel

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/ferrymesh/ferry/agent/identity"
)

const (
	defaultIdleTimeout = 90 * time.Second
	defaultConnectTO   = 10 * time.Second
)

// Source is the local pod a tunnel is opened for: the pool dials through it and
// presents its certificate. The handle itself is part of the pool's key, so it must
// be comparable and stand for one pod (a pointer): a pod enrolled again gets a new
// handle, and so new tunnels, dialled from its new namespace with its new identity.
type Source interface {
	// DialTunnel opens the raw TCP connection to a tunnel address from inside the
	// pod's network namespace, so the destination sees the pod's IP.
	DialTunnel(ctx context.Context, tunnelAddr netip.AddrPort) (net.Conn, error)
	// ClientTLS is the client configuration presenting the pod's certificate and
	// requiring the server to prove dstID, e.g. identity.Store.ClientConfig. Its
	// GetClientCertificate must name the certificate connections made with it present
	// (resumed ones too), as identity.Store.ClientConfig's does: the pool compares it
	// with a fresh configuration's to find tunnels whose certificate was replaced.
	ClientTLS(dstID string) *tls.Config
	// String names the pod in logs.
	String() string
}

// PoolConfig configures a client Pool.
type PoolConfig struct {
	// Logger receives connection-level events; nil discards them.
	Logger *slog.Logger
	// IdleTimeout closes a tunnel connection with no streams for this long; 90 s when
	// zero. Keepalive pings, not this, keep long idle streams alive.
	IdleTimeout time.Duration
	// ConnectTimeout bounds dialing and the TLS handshake of a new tunnel connection;
	// 10 s when zero. While the destination refuses the TCP connection (its agent is
	// restarting) the dial is tried again within this time.
	ConnectTimeout time.Duration
	// Changes, optional, returns a channel closed when the local certificates may
	// have changed (identity.Store.Changed): tunnels whose certificate is no longer
	// the source's current one are then retired. Without it a rotation is noticed
	// at the next Connect to the same destination.
	Changes func() <-chan struct{}
}

// RefusedError is a CONNECT the destination answered with something other than 200: the
// destination could not reach (or may not reach) the application, so the caller should
// reset its own client connection rather than pretend it was accepted.
type RefusedError struct {
	Status int    // HTTP status, e.g. 502 (refused), 504 (timeout), 403
	Reason string // the destination's ReasonHeader
	// NewTunnel: the destination refused the tunnel, not the stream (RetryHeader).
	NewTunnel bool
}

// retryable says the destination refused the stream before it did anything with it
// because of the tunnel (its server is closing, or the tunnel was retired): a new
// tunnel may take it.
func (e *RefusedError) retryable() bool { return e.NewTunnel }

func (e *RefusedError) Error() string {
	if e.Reason == "" {
		return fmt.Sprintf("refused by destination: status %d", e.Status)
	}
	return fmt.Sprintf("refused by destination: status %d: %s", e.Status, e.Reason)
}

// ErrPoolClosed is returned by Connect after Close.
var ErrPoolClosed = errors.New("tunnel pool closed")

// PoolStats counts what a Pool holds open.
type PoolStats struct {
	Conns   int // TLS connections not yet closed, retired ones draining included
	Streams int // Streams returned by Connect and not yet closed
	Retired int // connections retired so far (certificate replaced or expiring)
}

// Pool keeps HTTP/2-over-TLS connections to tunnel endpoints and opens CONNECT streams
// on them. Connections are pooled per source pod (its Source handle), destination
// identity and tunnel address: one serves many streams, and more are opened only when
// the peer's stream limit is reached. Pooling per pod rather than per identity keeps
// each tunnel's source address that of the pod whose certificate it presents.
type Pool struct {
	cfg PoolConfig
	log *slog.Logger

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup // dials in flight

	mu      sync.Mutex
	closed  bool
	entries map[poolKey]*poolEntry
	// retiring are connections told GOAWAY, draining their streams (retire).
	retiring map[*poolConn]struct{}
	watch    sync.Once // starts watchChanges with the first dial

	streams atomic.Int64
	retired atomic.Int64
}

// poolKey is what one set of pooled connections serves.
type poolKey struct {
	src  Source         // the source pod
	dst  string         // the SPIFFE ID the server must prove
	addr netip.AddrPort // the destination pod's tunnel address
}

type poolEntry struct {
	conns []*poolConn
	dial  *dialCall // non-nil while a dial is in flight
}

// poolConn is one pooled tunnel connection and the certificates that made it: it
// serves new streams only while both are valid and this side's is the current one.
type poolConn struct {
	cc      *h2conn
	serial  string    // the certificate this side presented (identity.Serial)
	expires time.Time // the earlier NotAfter of both sides' leaf certificates
	timer   *time.Timer
}

// dialCall is one dial shared by every Connect that found no usable connection, so a
// burst of new streams to a fresh destination opens one connection, not hundreds.
type dialCall struct {
	done chan struct{}
	err  error
}

// NewPool validates cfg; connections are opened on demand.
func NewPool(cfg PoolConfig) (*Pool, error) {
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = defaultIdleTimeout
	}
	if cfg.ConnectTimeout <= 0 {
		cfg.ConnectTimeout = defaultConnectTO
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Pool{
		cfg:      cfg,
		log:      log,
		ctx:      ctx,
		cancel:   cancel,
		entries:  map[poolKey]*poolEntry{},
		retiring: map[*poolConn]struct{}{},
	}, nil
}

// Connect opens a stream from the pod src to target through the tunnel at tunnelAddr,
// whose server must prove identity dstID. protocol is what the stream carries: ""
// for a byte stream to the app, ProtocolHTTP for HTTP requests the destination's
// proxy serves itself (ServerConfig.ServeHTTP). It returns once the destination
// answered 200; any other answer is a *RefusedError.
func (p *Pool) Connect(ctx context.Context, src Source, dstID string, tunnelAddr, target netip.AddrPort, protocol string) (*Stream, error) {
	if src == nil {
		return nil, errors.New("tunnel connect: no source pod")
	}
	key := poolKey{src: src, dst: dstID, addr: tunnelAddr}
	var lastErr error
	// A connection can turn unusable between picking it and sending on it (GOAWAY,
	// idle close, the destination's agent killed), and a destination that is closing
	// refuses the stream with 503: nothing of the stream has reached the application
	// then, so it is tried once more, on another connection or a fresh dial (which
	// waits for a restarting destination, see openWaiting).
	for attempt := 0; attempt < 2; attempt++ {
		pc, err := p.get(ctx, key)
		if err != nil {
			return nil, err
		}
		s, err := p.roundTrip(ctx, pc.cc, target, protocol)
		if err == nil {
			return s, nil
		}
		var re *RefusedError
		if errors.As(err, &re) && !re.retryable() || ctx.Err() != nil {
			return nil, err
		}
		if re != nil {
			p.retire(key, pc, "refused by a closing destination")
		}
		lastErr = err
	}
	return nil, lastErr
}

func (p *Pool) roundTrip(ctx context.Context, cc *h2conn, target netip.AddrPort, protocol string) (*Stream, error) {
	// The stream outlives Connect's ctx; only the pool or Stream.Close end it. ctx
	// still cancels the CONNECT while it waits for the answer.
	st, resp, err := cc.openStream(ctx, target.String(), protocol)
	if err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("tunnel connect %s: %w", target, context.Cause(ctx))
		}
		return nil, fmt.Errorf("tunnel connect %s: %w", target, err)
	}
	if resp.status != 200 {
		st.Close()
		return nil, &RefusedError{Status: resp.status, Reason: resp.get(reasonField), NewTunnel: resp.get(retryField) == RetryNewTunnel}
	}
	p.streams.Add(1)
	return &Stream{pool: p, st: st}, nil
}

// get returns a connection for key with a stream reserved on it, dialing one if needed.
func (p *Pool) get(ctx context.Context, key poolKey) (*poolConn, error) {
	for {
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			return nil, ErrPoolClosed
		}
		e := p.entries[key]
		if e == nil {
			e = &poolEntry{}
			p.entries[key] = e
		}
		live := e.conns[:0]
		var found *poolConn
		var expired []*poolConn
		now := time.Now()
		for _, pc := range e.conns {
			if pc.cc.state().closed {
				pc.timer.Stop()
				continue
			}
			if !now.Before(pc.expires) {
				// Its timer is late (a loaded machine): no stream on an expired tunnel.
				expired = append(expired, pc)
				continue
			}
			live = append(live, pc)
			if found == nil && pc.cc.reserve() {
				found = pc
			}
		}
		clear(e.conns[len(live):])
		e.conns = live
		for _, pc := range expired {
			p.drainLocked(key, pc, "certificate expired")
		}
		if found != nil {
			p.mu.Unlock()
			return found, nil
		}
		call := e.dial
		if call == nil {
			call = &dialCall{done: make(chan struct{})}
			e.dial = call
			p.wg.Add(1)
			go p.dial(key, e, call)
		}
		p.mu.Unlock()

		select {
		case <-call.done:
			if call.err != nil {
				return nil, call.err
			}
			// Loop: the new connection is in e.conns, competing with other waiters
			// for its streams.
		case <-ctx.Done():
			return nil, fmt.Errorf("tunnel connect %s: %w", key.addr, context.Cause(ctx))
		}
	}
}

// dial opens one tunnel connection for key. It runs on its own goroutine, owned by the
// pool, so a caller that gives up does not cancel the dial the others wait for.
func (p *Pool) dial(key poolKey, e *poolEntry, call *dialCall) {
	defer p.wg.Done()
	pc, err := p.openWaiting(key)
	p.mu.Lock()
	e.dial = nil
	if err == nil {
		if p.closed {
			pc.cc.close(ErrPoolClosed)
			err = ErrPoolClosed
		} else {
			// Retired when the first of the two certificates expires.
			pc.timer = time.AfterFunc(time.Until(pc.expires), func() { p.retire(key, pc, "certificate expiry") })
			e.conns = append(e.conns, pc)
		}
	}
	call.err = err
	close(call.done)
	p.mu.Unlock()
	if err != nil {
		p.log.Info("tunnel dial", "src", key.src.String(), "dst", key.dst, "addr", key.addr.String(), "error", err)
	}
}

// openWaiting opens a connection for key within ConnectTimeout. A destination that
// refuses the TCP connection has no tunnel listener now: its agent is restarting
// (the pod's sockets went with the old one), so the dial is tried again with a short
// backoff rather than failing every connection made during the restart. A reset
// while dialling or in the handshake is the same restart caught a moment later (the
// old listener closed with the connection in its queue); no stream was sent on it.
func (p *Pool) openWaiting(key poolKey) (*poolConn, error) {
	ctx, cancel := context.WithTimeout(p.ctx, p.cfg.ConnectTimeout)
	defer cancel()
	backoff := 10 * time.Millisecond
	for {
		pc, err := p.open(ctx, key)
		if err == nil || !errors.Is(err, syscall.ECONNREFUSED) && !errors.Is(err, syscall.ECONNRESET) {
			return pc, err
		}
		t := time.NewTimer(backoff)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return nil, err
		}
		backoff = min(2*backoff, 200*time.Millisecond)
	}
}

func (p *Pool) open(ctx context.Context, key poolKey) (*poolConn, error) {
	raw, err := key.src.DialTunnel(ctx, key.addr)
	if err != nil {
		return nil, fmt.Errorf("tunnel dial %s: %w", key.addr, err)
	}
	cfg := key.src.ClientTLS(key.dst)
	bc := newBatchConn(raw)
	tc := tls.Client(bc, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, fmt.Errorf("tunnel handshake %s: %w", key.addr, err)
	}
	cs := tc.ConnectionState()
	if proto := cs.NegotiatedProtocol; proto != "h2" {
		tc.Close()
		return nil, fmt.Errorf("tunnel handshake %s: ALPN %q, want h2", key.addr, proto)
	}
	pc := &poolConn{expires: cs.PeerCertificates[0].NotAfter}
	if own := presented(cfg); own != nil {
		pc.serial = identity.Serial(own)
		if own.Leaf != nil && own.Leaf.NotAfter.Before(pc.expires) {
			pc.expires = own.Leaf.NotAfter
		}
	}
	cc, err := newH2conn(tc, bc, h2config{
		maxHeaderBytes: DefaultServerLimits().MaxHeaderBytes,
		headerTable:    DefaultServerLimits().MaxDecoderHeaderTableSize,
		// A ping after 30 s of silence keeps NAT and conntrack state warm and finds
		// dead peers, so an idle application connection survives for minutes.
		readIdle:    keepaliveInterval,
		pingTimeout: keepaliveTimeout,
		idleTimeout: p.cfg.IdleTimeout,
		log:         p.log,
	})
	if err != nil {
		raw.Close()
		return nil, fmt.Errorf("tunnel http2 %s: %w", key.addr, err)
	}
	pc.cc = cc
	p.watch.Do(p.startWatch)
	return pc, nil
}

// presented is the certificate a client configuration presents (Source.ClientTLS).
func presented(cfg *tls.Config) *tls.Certificate {
	if cfg.GetClientCertificate != nil {
		c, err := cfg.GetClientCertificate(&tls.CertificateRequestInfo{})
		if err != nil {
			return nil
		}
		return c
	}
	if len(cfg.Certificates) > 0 {
		return &cfg.Certificates[0]
	}
	return nil
}

// startWatch follows Changes, when configured, until the pool closes.
func (p *Pool) startWatch() { follow(p.ctx, &p.wg, p.cfg.Changes, p.retireRotated) }

// retireRotated retires every connection whose source now presents another
// certificate (rotated), or none (the identity left this node).
func (p *Pool) retireRotated() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for key, e := range p.entries {
		cur := ""
		if c := presented(key.src.ClientTLS(key.dst)); c != nil {
			cur = identity.Serial(c)
		}
		for _, pc := range slices.Clone(e.conns) {
			if pc.serial != cur {
				p.retireLocked(key, pc, "certificate rotated")
			}
		}
	}
}

// retire takes pc out of key's pool: it carries no new stream, tells the server
// with GOAWAY, and closes once its streams have ended.
func (p *Pool) retire(key poolKey, pc *poolConn, why string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.retireLocked(key, pc, why)
}

func (p *Pool) retireLocked(key poolKey, pc *poolConn, why string) {
	e := p.entries[key]
	if e == nil || p.closed {
		return
	}
	i := slices.Index(e.conns, pc)
	if i < 0 {
		return // retired already, or closed
	}
	e.conns = slices.Delete(e.conns, i, i+1)
	p.drainLocked(key, pc, why)
}

// drainLocked retires pc, no longer in the pool's entries.
func (p *Pool) drainLocked(key poolKey, pc *poolConn, why string) {
	pc.timer.Stop()
	p.retiring[pc] = struct{}{}
	p.retired.Add(1)
	p.log.Info("tunnel retired", "src", key.src.String(), "dst", key.dst, "addr", key.addr.String(), "reason", why)
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		pc.cc.shutdown(p.ctx) // closes it at once once the pool is closing
		p.mu.Lock()
		delete(p.retiring, pc)
		p.mu.Unlock()
	}()
}

// Stats reports open connections and streams; tests use it to find leaks.
func (p *Pool) Stats() PoolStats {
	p.mu.Lock()
	defer p.mu.Unlock()
	st := PoolStats{Streams: int(p.streams.Load()), Retired: int(p.retired.Load())}
	for pc := range p.retiring {
		if !pc.cc.state().closed {
			st.Conns++
		}
	}
	for k, e := range p.entries {
		live := 0
		for _, pc := range e.conns {
			if !pc.cc.state().closed {
				live++
			}
		}
		st.Conns += live
		if live == 0 && e.dial == nil {
			// Forget destinations whose connections all closed (idle timeout).
			delete(p.entries, k)
		}
	}
	return st
}

// CloseIdle closes connections that carry no stream, and forgets closed ones.
func (p *Pool) CloseIdle() { p.closeIdle(nil) }

// Forget closes src's connections that carry no stream, for a pod that left: its
// handle is never used again, so they would otherwise wait for the idle timeout.
// Connections still carrying streams close when those end and the timeout passes.
func (p *Pool) Forget(src Source) { p.closeIdle(src) }

// closeIdle closes the idle connections of src, or of every source when src is nil.
func (p *Pool) closeIdle(src Source) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for k, e := range p.entries {
		if src != nil && k.src != src {
			continue
		}
		live := e.conns[:0]
		for _, pc := range e.conns {
			st := pc.cc.state()
			if !st.closed && st.active == 0 && st.reserved == 0 {
				pc.cc.close(errConnClosed)
				pc.timer.Stop()
				continue
			}
			if !st.closed {
				live = append(live, pc)
			} else {
				pc.timer.Stop()
			}
		}
		clear(e.conns[len(live):])
		e.conns = live
		if len(live) == 0 && e.dial == nil {
			delete(p.entries, k)
		}
	}
}

// Close closes every connection, which resets the streams on them, and waits for dials
// in flight.
func (p *Pool) Close() error {
	p.mu.Lock()
	p.closed = true
	for _, e := range p.entries {
		for _, pc := range e.conns {
			pc.timer.Stop()
			pc.cc.close(ErrPoolClosed)
		}
	}
	for pc := range p.retiring {
		pc.cc.close(ErrPoolClosed)
	}
	p.entries = map[poolKey]*poolEntry{}
	p.mu.Unlock()
	p.cancel()
	p.wg.Wait()
	return nil
}

// Stream is one tunnelled TCP connection. Read and Write may run concurrently with each
// other; CloseWrite half-closes (END_STREAM) and Close tears the stream down.
type Stream struct {
	pool   *Pool
	st     *h2stream
	closed atomic.Bool
}

// Read reads what the destination application sent; io.EOF when it closed its side.
func (s *Stream) Read(b []byte) (int, error) { return s.st.Read(b) }

// Write sends b to the destination application. It returns once the bytes are
// written to the tunnel connection, which flow control bounds.
func (s *Stream) Write(b []byte) (int, error) { return s.st.Write(b) }

// WriteTo copies what the destination application sends to w until it closes its
// side (h2stream.WriteTo: the bytes go to w's socket from the tunnel's read loop
// when they can).
func (s *Stream) WriteTo(w io.Writer) (int64, error) { return s.st.WriteTo(w) }

// CloseWrite ends the sending direction; the application reads EOF, and the reply can
// still be read.
func (s *Stream) CloseWrite() error { return s.st.CloseWrite() }

// Close ends both directions. A stream not finished in both directions is reset.
func (s *Stream) Close() error {
	if !s.closed.CompareAndSwap(false, true) {
		return nil
	}
	err := s.st.Close()
	s.pool.streams.Add(-1)
	return err
}
