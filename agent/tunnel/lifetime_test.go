package tunnel

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/agent/identity"
	"github.com/ferrymesh/ferry/internal/loopback"
)

// roundTrip sends "ping" on s and reads it back from the echo app.
func roundTrip(t *testing.T, s *Stream) {
	t.Helper()
	if _, err := s.Write([]byte("ping")); err != nil {
		t.Fatalf("write: %v", err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(s, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("read: %q, %v", buf, err)
	}
}

// finish half-closes s, drains it and closes it.
func finish(s *Stream) {
	s.CloseWrite()
	io.ReadAll(s)
	s.Close()
}

// handshake makes one TLS connection to the tunnel as the client, with the client
// store's session cache, and returns its state.
func (e *env) handshake(t *testing.T) tls.ConnectionState {
	t.Helper()
	raw, err := net.Dial("tcp", e.tunnelAddr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	tc := tls.Client(raw, e.cstore.ClientConfig(clientID, serverID))
	if err := tc.Handshake(); err != nil {
		t.Fatal(err)
	}
	// TLS 1.3 tickets come after the handshake: read until the server's first
	// frames (its SETTINGS) have brought them.
	tc.SetReadDeadline(time.Now().Add(2 * time.Second))
	tc.Read(make([]byte, 64))
	return tc.ConnectionState()
}

// nextEnded is the next stream the server saw end.
func (e *env) nextEnded(t *testing.T) StreamInfo {
	t.Helper()
	select {
	case si := <-e.ended:
		return si
	case <-time.After(10 * time.Second):
		t.Fatal("no stream ended")
		return StreamInfo{}
	}
}

// After the client's certificate is replaced, the pooled tunnel takes no new stream
// (its open stream drains), and the next connection presents the new certificate:
// the destination sees its serial, not the old one from a resumed session.
func TestClientRotationRetiresTunnel(t *testing.T) {
	e := newEnv(t, envOpt{watch: true})
	target := loopback.Serve(t, loopback.Echo)

	// A first tunnel, and a second connection made with a resumed session, so
	// the session cache holds tickets of the old certificate.
	s := e.connect(t, target)
	roundTrip(t, s)
	finish(s)
	old := e.nextEnded(t).PeerSerial
	e.pool.CloseIdle()
	s = e.connect(t, target)
	roundTrip(t, s) // kept open across the rotation
	if e.src.dials.Load() != 2 {
		t.Fatalf("%d dials, want 2", e.src.dials.Load())
	}

	if err := e.cstore.Update(e.ca.RootPEM, map[string]identity.CertPEM{clientID: e.ca.Valid(t, clientID)}); err != nil {
		t.Fatal(err)
	}
	settle(t, "the tunnel to be retired", func() bool { return e.pool.Stats().Retired == 1 })
	roundTrip(t, s) // the stream in progress drains on the retired tunnel

	s2 := e.connect(t, target)
	roundTrip(t, s2)
	finish(s2)
	if n := e.src.dials.Load(); n != 3 {
		t.Fatalf("%d dials, want 3: the stream after the rotation must use a new tunnel", n)
	}
	if got := e.nextEnded(t).PeerSerial; got == old || got == "" {
		t.Fatalf("peer serial after rotation %q, before %q: want a new one", got, old)
	}
	finish(s)
	if got := e.nextEnded(t).PeerSerial; got != old {
		t.Fatalf("the drained stream's serial %q, want the old %q", got, old)
	}
	settle(t, "the retired tunnel to close", func() bool { return e.pool.Stats().Conns == 1 })
}

// The destination's own rotation sends its tunnels a GOAWAY: streams open go on,
// the next one dials a new tunnel, which presents the new server certificate.
func TestServerRotationRetiresTunnel(t *testing.T) {
	e := newEnv(t, envOpt{watch: true})
	target := loopback.Serve(t, loopback.Echo)
	s := e.connect(t, target)
	roundTrip(t, s)
	if st := e.handshake(t); !st.DidResume {
		t.Fatal("no resumption before the rotation: the check after it would prove nothing")
	}

	if err := e.sstore.Update(e.ca.RootPEM, map[string]identity.CertPEM{serverID: e.ca.Valid(t, serverID)}); err != nil {
		t.Fatal(err)
	}
	// A ticket from before the rotation does not resume: the client sees the new
	// certificate.
	cur, err := e.sstore.Certificate(serverID)
	if err != nil {
		t.Fatal(err)
	}
	if st := e.handshake(t); st.DidResume || identity.Serial(&tls.Certificate{Leaf: st.PeerCertificates[0]}) != identity.Serial(cur) {
		t.Fatalf("after the server's rotation: resumed %v, serial %s, want %s", st.DidResume, st.PeerCertificates[0].SerialNumber, cur.Leaf.SerialNumber)
	}
	// The client learns of the GOAWAY asynchronously: a connection it still picks
	// refuses the stream (503 or REFUSED_STREAM), which Connect retries on a new one.
	settle(t, "the second stream on a new tunnel", func() bool {
		s2 := e.connect(t, target)
		defer finish(s2)
		roundTrip(t, s2)
		return e.src.dials.Load() == 2
	})
	roundTrip(t, s)
	finish(s)
	settle(t, "the old tunnel to close", func() bool { return e.pool.Stats().Conns == 1 })
}

// A policy that starts denying while a tunnel is pooled stops the next stream on it:
// Admit runs for every CONNECT, not once per handshake.
func TestDenyAppliesToPooledTunnel(t *testing.T) {
	var deny atomic.Bool
	errDenied := errors.New("denied by default/deny-all")
	e := newEnv(t, envOpt{admit: func(string, netip.AddrPort, netip.AddrPort, bool) error {
		if deny.Load() {
			return errDenied
		}
		return nil
	}})
	target := loopback.Serve(t, loopback.Echo)
	s := e.connect(t, target)
	roundTrip(t, s)
	finish(s)

	deny.Store(true)
	e.refusedOnPooled(t, target)
}

// refusedOnPooled: the next stream to target is refused with 403 on the tunnel
// already pooled.
func (e *env) refusedOnPooled(t *testing.T, target netip.AddrPort) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := e.pool.Connect(ctx, e.src, serverID, e.tunnelAddr, target, "")
	var re *RefusedError
	if !errors.As(err, &re) || re.Status != http.StatusForbidden {
		t.Fatalf("Connect: %v, want 403", err)
	}
	if n := e.src.dials.Load(); n != 1 {
		t.Fatalf("%d dials: the refusal must come on the pooled tunnel", n)
	}
}

// A tunnel lives no longer than the client's certificate: at its NotAfter the pool
// retires it even though nothing told it of the renewal, and the next stream goes
// on a new tunnel with the renewed certificate.
func TestClientExpiryRetiresTunnel(t *testing.T) {
	e := newEnv(t, envOpt{}) // no Changes: only the expiry can retire the tunnel
	short := e.ca.Issue(t, clientID, time.Now().Add(-time.Minute), time.Now().Add(2*time.Second))
	if err := e.cstore.Update(e.ca.RootPEM, map[string]identity.CertPEM{clientID: short}); err != nil {
		t.Fatal(err)
	}
	target := loopback.Serve(t, loopback.Echo)
	s := e.connect(t, target)
	roundTrip(t, s)
	finish(s)
	old := e.nextEnded(t).PeerSerial
	if err := e.cstore.Update(e.ca.RootPEM, map[string]identity.CertPEM{clientID: e.ca.Valid(t, clientID)}); err != nil {
		t.Fatal(err)
	}
	settle(t, "the expiring tunnel to be retired", func() bool { return e.pool.Stats().Retired == 1 })
	s = e.connect(t, target)
	roundTrip(t, s)
	finish(s)
	if got := e.nextEnded(t).PeerSerial; got == old {
		t.Fatalf("serial %q after expiry: the expired certificate's tunnel carried the stream", got)
	}
	if n := e.src.dials.Load(); n != 2 {
		t.Fatalf("%d dials, want 2", n)
	}
}

// The destination holds the line by itself: a client that keeps using a tunnel
// past its certificate's NotAfter gets no new stream (GOAWAY, or 503 until then).
func TestServerRefusesStreamsPastClientExpiry(t *testing.T) {
	e := newEnv(t, envOpt{})
	expiry := time.Now().Add(2 * time.Second)
	short := e.ca.Issue(t, clientID, time.Now().Add(-time.Minute), expiry)
	if err := e.cstore.Update(e.ca.RootPEM, map[string]identity.CertPEM{clientID: short}); err != nil {
		t.Fatal(err)
	}
	target := loopback.Serve(t, loopback.Echo)
	// A bare HTTP/2 client, which (unlike the pool) does not retire anything itself.
	cc := e.bareClient(t)
	connect := func() (int, error) {
		req := &http.Request{Method: http.MethodConnect, URL: &url.URL{Host: target.String()}, Host: target.String(), Header: http.Header{}, Body: http.NoBody}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		res, err := cc.RoundTrip(req.WithContext(ctx))
		if err != nil {
			return 0, err
		}
		res.Body.Close()
		return res.StatusCode, nil
	}
	if st, err := connect(); err != nil || st != http.StatusOK {
		t.Fatalf("before expiry: %d, %v", st, err)
	}
	time.Sleep(time.Until(expiry) + 100*time.Millisecond)
	if st, err := connect(); err == nil && st == http.StatusOK {
		t.Fatal("a stream opened on a tunnel whose client certificate expired")
	}
}

// A destination whose agent dies (its tunnel server closes, its listener is gone)
// and comes back: a stream with bytes in flight is reset, but a connection made
// meanwhile waits for the new server on a fresh dial and gets through.
func TestConnectWaitsForRestartedDestination(t *testing.T) {
	e := newEnv(t, envOpt{})
	target := loopback.Serve(t, loopback.Echo)
	inFlight := e.connect(t, target)
	roundTrip(t, inFlight)
	if _, err := inFlight.Write([]byte("lost")); err != nil {
		t.Fatal(err)
	}

	e.srv.Close() // kill -9: the tunnel connections and the listener are gone
	if _, err := io.ReadAll(inFlight); err == nil {
		t.Error("the stream in flight ended cleanly although its destination died")
	}
	inFlight.Close()

	type result struct {
		s   *Stream
		err error
	}
	done := make(chan result, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		s, err := e.pool.Connect(ctx, e.src, serverID, e.tunnelAddr, target, "")
		done <- result{s, err}
	}()
	// The dial is refused while nothing listens: Connect must still be waiting.
	settle(t, "the pool to dial the dead destination", func() bool { return e.src.dials.Load() >= 3 })
	select {
	case r := <-done:
		t.Fatalf("Connect returned while the destination was down: %v", r.err)
	default:
	}

	srv, err := NewServer(ServerConfig{
		TLS: func(net.Addr) (*tls.Config, error) { return e.sstore.ServerConfig(serverID, nil), nil },
		Dial: func(ctx context.Context, target netip.AddrPort) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "tcp", target.String())
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", e.tunnelAddr.String())
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = srv.Serve(ln)
	}()
	t.Cleanup(func() {
		srv.Close()
		<-served
	})

	r := <-done
	if r.err != nil {
		t.Fatalf("Connect across the restart: %v", r.err)
	}
	roundTrip(t, r.s)
	finish(r.s)
}

// A stream the destination refuses before it did anything (503: its server is
// shutting down) is tried again on a new tunnel.
func TestRefusedByClosingDestinationIsRetried(t *testing.T) {
	var calls atomic.Int64
	e := newEnv(t, envOpt{admit: func(string, netip.AddrPort, netip.AddrPort, bool) error { return nil }})
	target := loopback.Serve(t, loopback.Echo)
	s := e.connect(t, target)
	roundTrip(t, s)
	// Retire the server side of the pooled tunnel behind the client's back: its
	// next stream is refused with 503, and Connect takes a new tunnel.
	e.srv.mu.Lock()
	for _, tc := range e.srv.tconns {
		tc.retired.Store(true)
		calls.Add(1)
	}
	e.srv.mu.Unlock()
	if calls.Load() != 1 {
		t.Fatalf("%d server connections, want 1", calls.Load())
	}
	s2 := e.connect(t, target)
	roundTrip(t, s2)
	finish(s2)
	if n := e.src.dials.Load(); n != 2 {
		t.Fatalf("%d dials, want 2: the refused stream goes on a new tunnel", n)
	}
	roundTrip(t, s) // the first stream is untouched
	finish(s)
}

// The identity check runs again for every stream: once the control plane says
// another workload holds the client's address, the pooled tunnel carries nothing more.
func TestAuthorizeAppliesToPooledTunnel(t *testing.T) {
	var moved atomic.Bool
	e := newEnv(t, envOpt{authorize: func(peerID string, remote netip.AddrPort) error {
		if moved.Load() || peerID != clientID {
			return &identity.MismatchError{Got: peerID, Want: otherID}
		}
		return nil
	}})
	target := loopback.Serve(t, loopback.Echo)
	s := e.connect(t, target)
	roundTrip(t, s)
	finish(s)
	moved.Store(true)
	e.refusedOnPooled(t, target)
}

// A tunnel retired while a stream's last bytes wait in the destination's send
// buffer (a slow link: the relay below reads the server's side slowly) delivers
// them all. Closing the drained connection's socket at once would reset it as soon
// as the client's next WINDOW_UPDATE arrived, and the reset drops what the server's
// kernel had not sent yet.
func TestRetiredTunnelDeliversLastBytes(t *testing.T) {
	e := newEnv(t, envOpt{watch: true})
	e.src.via = slowRelay(t, e.tunnelAddr)
	target := loopback.Serve(t, loopback.Echo)
	s := e.connect(t, target)

	data := make([]byte, 8<<20)
	rand.Read(data)
	go func() {
		s.Write(data)
		s.CloseWrite()
	}()
	got := make([]byte, 0, len(data))
	buf := make([]byte, 64<<10)
	rotated := false
	for {
		n, err := s.Read(buf)
		got = append(got, buf[:n]...)
		if !rotated && len(got) >= 1<<20 {
			// The server's rotation retires the tunnel with the stream in its middle.
			rotated = true
			if err := e.sstore.Update(e.ca.RootPEM, map[string]identity.CertPEM{serverID: e.ca.Valid(t, serverID)}); err != nil {
				t.Fatal(err)
			}
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("after %d of %d bytes: %v", len(got), len(data), err)
		}
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("got %d bytes, not the %d sent in order", len(got), len(data))
	}
	s.Close()
	settle(t, "the retired tunnel to close", func() bool { return e.pool.Stats().Conns == 0 })
}

// slowRelay forwards connections to addr, carrying what addr sends back at about
// 8 MiB/s through a small receive buffer, so addr's send buffer stays full. A
// reset from addr is passed on as a reset.
func slowRelay(t *testing.T, addr netip.AddrPort) netip.AddrPort {
	return loopback.Serve(t, func(c *net.TCPConn) {
		up, err := net.DialTCP("tcp", nil, net.TCPAddrFromAddrPort(addr))
		if err != nil {
			return
		}
		up.SetReadBuffer(32 << 10)
		defer up.Close()
		go func() {
			io.Copy(up, c)
			up.CloseWrite()
		}()
		buf := make([]byte, 16<<10)
		for {
			n, err := up.Read(buf)
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
			if err != nil {
				if errors.Is(err, syscall.ECONNRESET) {
					c.SetLinger(0) // the client sees the reset too
				}
				c.Close()
				return
			}
			time.Sleep(2 * time.Millisecond)
		}
	})
}

// A tunnel whose socket takes nothing for a second (a partition, or TCP crawling
// out of one) gets no new stream: the next one is carried at once on a new tunnel
// instead of queueing behind what the stalled one has not sent.
func TestStalledTunnelGetsNoNewStream(t *testing.T) {
	e := newEnv(t, envOpt{})
	var stall atomic.Bool
	e.src.via = stallingRelay(t, e.tunnelAddr, &stall)
	sink := loopback.Serve(t, func(c *net.TCPConn) { io.Copy(io.Discard, c) })
	s := e.connect(t, sink)
	// Before the cleanups that wait for the relay and the sink: the stalled
	// tunnel's last frames (the reset of s) must get through.
	t.Cleanup(func() { stall.Store(false) })
	stall.Store(true) // the first tunnel's relay reads nothing more from the client
	go func() {
		chunk := make([]byte, 64<<10)
		for {
			if _, err := s.Write(chunk); err != nil {
				return
			}
		}
	}()
	settle(t, "the tunnel's socket write to wait a second", func() bool {
		e.pool.mu.Lock()
		defer e.pool.mu.Unlock()
		for _, en := range e.pool.entries {
			for _, pc := range en.conns {
				if pc.cc.stalled() {
					return true
				}
			}
		}
		return false
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s2, err := e.pool.Connect(ctx, e.src, serverID, e.tunnelAddr, loopback.Serve(t, loopback.Echo), "")
	if err != nil {
		t.Fatalf("a new stream beside a stalled tunnel: %v", err)
	}
	defer s2.Close()
	roundTrip(t, s2)
	if n := e.pool.Stats().Conns; n != 2 {
		t.Errorf("%d tunnel connections, want 2: the stalled one and a new one", n)
	}
	s.Close()
	stall.Store(false)
	e.pool.Close() // its tunnels end the relay's connections, which the relay's cleanup waits for
}

// stallingRelay forwards connections to addr; once stall is set, the first
// connection stops reading from its client, whose socket then fills and stays full.
func stallingRelay(t *testing.T, addr netip.AddrPort, stall *atomic.Bool) netip.AddrPort {
	var first atomic.Bool
	return loopback.Serve(t, func(c *net.TCPConn) {
		up, err := net.DialTCP("tcp", nil, net.TCPAddrFromAddrPort(addr))
		if err != nil {
			return
		}
		defer up.Close()
		go io.Copy(c, up)
		stalls := first.CompareAndSwap(false, true)
		buf := make([]byte, 16<<10)
		for {
			for stalls && stall.Load() {
				time.Sleep(10 * time.Millisecond)
			}
			n, err := c.Read(buf)
			if _, werr := up.Write(buf[:n]); werr != nil || err != nil {
				return
			}
		}
	})
}
