package tunnel

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/agent/identity"
	"github.com/ferrymesh/ferry/agent/identity/identitytest"
	"github.com/ferrymesh/ferry/api/spiffe"
	"github.com/ferrymesh/ferry/internal/loopback"
	"golang.org/x/net/http2"
	"golang.org/x/sys/unix"
)

var (
	clientID = spiffe.ID("cluster.local", "default", "client")
	serverID = spiffe.ID("cluster.local", "default", "server")
	otherID  = spiffe.ID("cluster.local", "default", "other")
)

// env is a tunnel on loopback: Pool → Server (127.0.0.1) → application listeners.
type env struct {
	ca         *identitytest.CA
	cstore     *identity.Store
	sstore     *identity.Store
	srv        *Server
	pool       *Pool
	src        *loopSource // the client pod
	tunnelAddr netip.AddrPort

	mu      sync.Mutex
	streams []StreamInfo
	ended   chan StreamInfo
}

type envOpt struct {
	serverDial  func(ctx context.Context, target netip.AddrPort) (net.Conn, error)
	authorize   func(peerID string, remote netip.AddrPort) error
	idleTimeout time.Duration
	dialTimeout time.Duration
	serveHTTP   func(si StreamInfo, c net.Conn)
	admit       func(peerID string, remote, target netip.AddrPort, httpStream bool) error
	hold        func(peerID string, remote netip.AddrPort) (func(), error)
	limits      ServerLimits
	onRefused   func(remote netip.AddrPort, err *HandshakeError)
	// watch gives both sides their store's Changes, so rotations retire tunnels.
	watch bool
}

func newEnv(tb testing.TB, o envOpt) *env {
	tb.Helper()
	e := &env{ca: identitytest.NewCA(tb), cstore: identity.NewStore(), sstore: identity.NewStore(), ended: make(chan StreamInfo, 4096)}
	if err := e.cstore.Update(e.ca.RootPEM, map[string]identity.CertPEM{clientID: e.ca.Valid(tb, clientID)}); err != nil {
		tb.Fatal(err)
	}
	if err := e.sstore.Update(e.ca.RootPEM, map[string]identity.CertPEM{serverID: e.ca.Valid(tb, serverID)}); err != nil {
		tb.Fatal(err)
	}
	dial := o.serverDial
	if dial == nil {
		dial = func(ctx context.Context, target netip.AddrPort) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "tcp", target.String())
		}
	}
	authorize := o.authorize
	if authorize == nil {
		// The "control plane" says the workload at 127.0.0.1 is the client.
		authorize = func(peerID string, remote netip.AddrPort) error {
			if peerID != clientID {
				return &identity.MismatchError{Got: peerID, Want: clientID}
			}
			return nil
		}
	}
	srv, err := NewServer(ServerConfig{
		TLS: func(net.Addr) (*tls.Config, error) {
			return e.sstore.ServerConfig(serverID, nil), nil
		},
		Authorize:         authorize,
		Dial:              dial,
		DialTimeout:       o.dialTimeout,
		ServeHTTP:         o.serveHTTP,
		Admit:             o.admit,
		Hold:              o.hold,
		Limits:            o.limits,
		OnHandshakeFailed: o.onRefused,
		Changes:           changes(o.watch, e.sstore),
		OnStream: func(si StreamInfo) {
			e.mu.Lock()
			e.streams = append(e.streams, si)
			e.mu.Unlock()
			select {
			case e.ended <- si:
			default:
			}
		},
	})
	if err != nil {
		tb.Fatal(err)
	}
	e.srv = srv
	ln := loopback.Listen(tb)
	e.tunnelAddr = ln.Addr().(*net.TCPAddr).AddrPort()
	served := make(chan struct{})
	go func() {
		defer close(served)
		if err := srv.Serve(ln); !errors.Is(err, ErrServerClosed) {
			tb.Errorf("Serve: %v", err)
		}
	}()
	e.src = &loopSource{store: e.cstore, id: clientID}
	e.pool, err = NewPool(PoolConfig{IdleTimeout: o.idleTimeout, Changes: changes(o.watch, e.cstore)})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		e.pool.Close()
		e.srv.Close()
		<-served
	})
	return e
}

func changes(on bool, st *identity.Store) func() <-chan struct{} {
	if !on {
		return nil
	}
	return st.Changed
}

// loopSource is a client pod on loopback: it dials from the test's own namespace.
type loopSource struct {
	store  *identity.Store
	id     string
	dials  atomic.Int64   // tunnel connections dialled
	via    netip.AddrPort // when valid, tunnels go through this relay instead
	writes atomic.Int64   // socket writes on the tunnels it dialled
}

// countingConn counts its writes: each is one write(2).
type countingConn struct {
	net.Conn
	writes *atomic.Int64
}

func (c *countingConn) Write(b []byte) (int, error) {
	c.writes.Add(1)
	return c.Conn.Write(b)
}

func (s *loopSource) DialTunnel(ctx context.Context, addr netip.AddrPort) (net.Conn, error) {
	s.dials.Add(1)
	if s.via.IsValid() {
		addr = s.via
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", addr.String())
	if err != nil {
		return nil, err
	}
	return &countingConn{Conn: c, writes: &s.writes}, nil
}

func (s *loopSource) ClientTLS(dstID string) *tls.Config { return s.store.ClientConfig(s.id, dstID) }

func (s *loopSource) String() string { return s.id }

// bareClient is x/net/http2's client on a tunnel connection of its own, as an
// HBONE peer other than Ferry's pool would be: it retires nothing by itself.
func (e *env) bareClient(t *testing.T) *http2.ClientConn {
	t.Helper()
	raw, err := net.Dial("tcp", e.tunnelAddr.String())
	if err != nil {
		t.Fatal(err)
	}
	tc := tls.Client(raw, e.cstore.ClientConfig(clientID, serverID))
	if err := tc.Handshake(); err != nil {
		t.Fatal(err)
	}
	cc, err := (&http2.Transport{}).NewClientConn(tc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

func (e *env) connect(tb testing.TB, target netip.AddrPort) *Stream {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := e.pool.Connect(ctx, e.src, serverID, e.tunnelAddr, target, "")
	if err != nil {
		tb.Fatalf("Connect: %v", err)
	}
	// Before the app's cleanup, which waits for its connections: a test that fails
	// with a stream open ends instead of hanging.
	tb.Cleanup(func() { s.Close() })
	return s
}

func TestEcho10MiB(t *testing.T) {
	e := newEnv(t, envOpt{})
	target := loopback.Serve(t, loopback.Echo)
	s := e.connect(t, target)
	defer s.Close()

	data := make([]byte, 10<<20)
	rand.Read(data)
	werr := make(chan error, 1)
	go func() {
		_, err := s.Write(data)
		if err == nil {
			err = s.CloseWrite()
		}
		werr <- err
	}()
	got, err := io.ReadAll(s)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	if err := <-werr; err != nil {
		t.Fatalf("write: %v", err)
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("echo differs: got %d bytes, want %d", len(got), len(data))
	}
	s.Close()

	si := <-e.ended
	if si.PeerID != clientID {
		t.Errorf("server saw peer %q, want %q", si.PeerID, clientID)
	}
	if si.Target != target || si.Status != http.StatusOK || si.Err != nil {
		t.Errorf("stream info %+v", si)
	}
	if si.BytesIn != int64(len(data)) || si.BytesOut != int64(len(data)) {
		t.Errorf("bytes in %d out %d, want %d each", si.BytesIn, si.BytesOut, len(data))
	}
	if !si.Remote.Addr().IsLoopback() {
		t.Errorf("remote %s", si.Remote)
	}
}

// WriteTo, as the proxy's copy loop runs it: the read loop writes what arrives
// straight to the destination socket while it takes it, and WriteTo writes the
// rest. A reader that stops for a while (the socket fills, writes go partial) still
// gets every byte in order.
func TestWriteToSlowSocket(t *testing.T) {
	e := newEnv(t, envOpt{})
	target := loopback.Serve(t, loopback.Echo)
	s := e.connect(t, target)
	dst, reader := loopback.Pair(t)
	dst.SetWriteBuffer(16 << 10)
	reader.SetReadBuffer(16 << 10)

	data := make([]byte, 8<<20)
	rand.Read(data)
	go func() {
		s.Write(data)
		s.CloseWrite()
	}()
	copied := make(chan error, 1)
	go func() {
		n, err := s.WriteTo(dst)
		if err == nil && n != int64(len(data)) {
			err = fmt.Errorf("WriteTo copied %d bytes, want %d", n, len(data))
		}
		dst.CloseWrite()
		copied <- err
	}()
	got := make([]byte, 0, len(data))
	buf := make([]byte, 4<<10)
	for i := 0; ; i++ {
		if i%256 == 0 {
			time.Sleep(20 * time.Millisecond) // stop reading: the socket fills
		}
		n, err := reader.Read(buf)
		got = append(got, buf[:n]...)
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := <-copied; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("got %d bytes, not the %d sent in order", len(got), len(data))
	}
}

func TestServerSpeaksFirst(t *testing.T) {
	e := newEnv(t, envOpt{})
	target := loopback.Serve(t, func(c *net.TCPConn) {
		c.Write([]byte("220 hello\r\n"))
		loopback.Echo(c)
	})
	s := e.connect(t, target)
	defer s.Close()
	buf := make([]byte, 11)
	if _, err := io.ReadFull(s, buf); err != nil || string(buf) != "220 hello\r\n" {
		t.Fatalf("banner %q, %v", buf, err)
	}
	s.Write([]byte("ping"))
	s.CloseWrite()
	rest, err := io.ReadAll(s)
	if err != nil || string(rest) != "ping" {
		t.Fatalf("after banner %q, %v", rest, err)
	}
}

func TestHalfClose(t *testing.T) {
	e := newEnv(t, envOpt{})
	// The app reads to EOF, then answers: only works if CloseWrite reaches it as EOF
	// while the other direction stays open.
	target := loopback.Serve(t, func(c *net.TCPConn) {
		n, err := io.Copy(io.Discard, c)
		if err != nil {
			return
		}
		fmt.Fprintf(c, "got %d bytes", n)
	})
	s := e.connect(t, target)
	defer s.Close()
	if _, err := s.Write(bytes.Repeat([]byte("x"), 100000)); err != nil {
		t.Fatal(err)
	}
	if err := s.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	reply, err := io.ReadAll(s)
	if err != nil || string(reply) != "got 100000 bytes" {
		t.Fatalf("reply %q, %v", reply, err)
	}
}

func TestManySmallWrites(t *testing.T) {
	e := newEnv(t, envOpt{})
	s := e.connect(t, loopback.Serve(t, loopback.Echo))
	defer s.Close()
	const n = 5000
	done := make(chan []byte)
	go func() {
		b, _ := io.ReadAll(s)
		done <- b
	}()
	for i := 0; i < n; i++ {
		if _, err := s.Write([]byte{byte(i)}); err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
	}
	s.CloseWrite()
	got := <-done
	if len(got) != n {
		t.Fatalf("got %d bytes, want %d", len(got), n)
	}
	for i, b := range got {
		if b != byte(i) {
			t.Fatalf("byte %d is %d, want %d", i, b, byte(i))
		}
	}
}

// TestStreamsShareWrites: small messages on many streams at once leave in fewer
// socket writes than there are messages, for frames wait for the connection's
// flusher, which writes the frames of every stream ready by then together (a
// write(2) per message made many small exchanges cost twice what they do now).
func TestStreamsShareWrites(t *testing.T) {
	e := newEnv(t, envOpt{})
	target := loopback.Serve(t, loopback.Echo)
	const streams, rounds = 32, 20
	ss := make([]*Stream, streams)
	for i := range ss {
		ss[i] = e.connect(t, target)
	}
	before := e.src.writes.Load()
	var wg sync.WaitGroup
	for i, s := range ss {
		wg.Add(1)
		go func() {
			defer wg.Done()
			msg, got := make([]byte, 16), make([]byte, 16)
			for r := range rounds {
				msg[0], msg[1] = byte(i), byte(r)
				if _, err := s.Write(msg); err != nil {
					t.Errorf("stream %d round %d: write: %v", i, r, err)
					return
				}
				if _, err := io.ReadFull(s, got); err != nil || !bytes.Equal(got, msg) {
					t.Errorf("stream %d round %d: read %v, %v; want %v", i, r, got, err, msg)
					return
				}
			}
		}()
	}
	wg.Wait()
	writes := e.src.writes.Load() - before
	t.Logf("%d messages left in %d socket writes", streams*rounds, writes)
	if writes > streams*rounds/2 {
		t.Errorf("%d messages on %d streams left in %d socket writes, want at most %d", streams*rounds, streams, writes, streams*rounds/2)
	}
}

// closedPort is a loopback port that refuses connections: a TCP socket bound to it
// that never listens holds it until the test ends, so no other test can take it
// (closing a listener and reusing its port would race with them).
func closedPort(t *testing.T) netip.AddrPort {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), uint16(sa.(*unix.SockaddrInet4).Port))
}

func TestAppRefuses(t *testing.T) {
	e := newEnv(t, envOpt{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := e.pool.Connect(ctx, e.src, serverID, e.tunnelAddr, closedPort(t), "")
	var re *RefusedError
	if !errors.As(err, &re) {
		t.Fatalf("error %v, want *RefusedError", err)
	}
	if re.Status != http.StatusBadGateway || re.Reason != "connection refused" {
		t.Errorf("refused %d %q, want 502 connection refused", re.Status, re.Reason)
	}
	if st := e.pool.Stats(); st.Streams != 0 {
		t.Errorf("streams %d after refusal", st.Streams)
	}
}

func TestAppDialTimeout(t *testing.T) {
	e := newEnv(t, envOpt{serverDial: func(ctx context.Context, _ netip.AddrPort) (net.Conn, error) {
		<-ctx.Done()
		return nil, ctx.Err()
	}, dialTimeout: 100 * time.Millisecond})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := e.pool.Connect(ctx, e.src, serverID, e.tunnelAddr, netip.MustParseAddrPort("127.0.0.1:9"), "")
	var re *RefusedError
	if !errors.As(err, &re) || re.Status != http.StatusGatewayTimeout {
		t.Fatalf("error %v, want 504", err)
	}
}

func TestTargetMustBeThisPod(t *testing.T) {
	e := newEnv(t, envOpt{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := e.pool.Connect(ctx, e.src, serverID, e.tunnelAddr, netip.MustParseAddrPort("127.0.0.2:80"), "")
	var re *RefusedError
	if !errors.As(err, &re) || re.Status != http.StatusForbidden {
		t.Fatalf("error %v, want 403", err)
	}
}

// Admit refuses a stream before its app is dialled: 403 with the reason, which the
// stream's report keeps as its error.
func TestAdmitRefuses(t *testing.T) {
	denied := errors.New("denied by policy default/deny-a")
	var dialled atomic.Bool
	e := newEnv(t, envOpt{
		admit: func(peerID string, remote, target netip.AddrPort, httpStream bool) error {
			if peerID != clientID || !remote.IsValid() || target.Port() != 9 || httpStream {
				return fmt.Errorf("admit got %s %s %s %v", peerID, remote, target, httpStream)
			}
			return denied
		},
		serverDial: func(context.Context, netip.AddrPort) (net.Conn, error) {
			dialled.Store(true)
			return nil, errors.New("dialled")
		},
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := e.pool.Connect(ctx, e.src, serverID, e.tunnelAddr, netip.MustParseAddrPort("127.0.0.1:9"), "")
	var re *RefusedError
	if !errors.As(err, &re) || re.Status != http.StatusForbidden || re.Reason != denied.Error() {
		t.Fatalf("error %v, want 403 %q", err, denied)
	}
	si := <-e.ended
	if si.Status != http.StatusForbidden || !errors.Is(si.Err, denied) || dialled.Load() {
		t.Fatalf("stream %+v, dialled %v", si, dialled.Load())
	}
}

// Hold takes a budget per stream: a stream over it is answered 503 with the reason
// before it is dialled, and one carried gives its place back when it ends.
func TestHoldBudget(t *testing.T) {
	over := errors.New("pod_budget: over")
	var held atomic.Int64
	var dialled atomic.Int64
	e := newEnv(t, envOpt{
		hold: func(peerID string, remote netip.AddrPort) (func(), error) {
			if peerID != clientID || !remote.IsValid() {
				return nil, fmt.Errorf("hold got %s %s", peerID, remote)
			}
			if held.Add(1) > 1 {
				held.Add(-1)
				return nil, over
			}
			return func() { held.Add(-1) }, nil
		},
		serverDial: func(ctx context.Context, target netip.AddrPort) (net.Conn, error) {
			dialled.Add(1)
			var d net.Dialer
			return d.DialContext(ctx, "tcp", target.String())
		},
	})
	app := loopback.Serve(t, loopback.Echo)
	first := e.connect(t, app)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := e.pool.Connect(ctx, e.src, serverID, e.tunnelAddr, app, "")
	var re *RefusedError
	if !errors.As(err, &re) || re.Status != http.StatusServiceUnavailable || re.Reason != over.Error() {
		t.Fatalf("second stream: %v, want 503 %q", err, over)
	}
	if n := dialled.Load(); n != 1 {
		t.Errorf("dialled %d times, want once", n)
	}
	first.Close()
	settle(t, "the first stream's hold released", func() bool { return held.Load() == 0 })
	s := e.connect(t, app)
	s.Close()
}

func TestOnlyConnect(t *testing.T) {
	e := newEnv(t, envOpt{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cc := e.bareClient(t) // sends what it is asked to
	for _, tc := range []struct {
		method, authority string
	}{
		{http.MethodGet, "127.0.0.1:80"},
		{http.MethodConnect, "localhost:80"},
		{http.MethodConnect, "127.0.0.1:0"},
	} {
		if !cc.ReserveNewRequest() {
			t.Fatal("cannot reserve")
		}
		req := &http.Request{Method: tc.method, URL: &url.URL{Scheme: "https", Host: tc.authority, Path: "/"}, Host: tc.authority, Header: http.Header{}}
		if tc.method == http.MethodConnect {
			req.URL = &url.URL{Host: tc.authority}
		}
		resp, err := cc.RoundTrip(req.WithContext(ctx))
		if err != nil {
			t.Fatalf("%s %s: %v", tc.method, tc.authority, err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("%s %s: status %d, want 400", tc.method, tc.authority, resp.StatusCode)
		}
	}
}

func TestWrongServerIdentity(t *testing.T) {
	e := newEnv(t, envOpt{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := e.pool.Connect(ctx, e.src, otherID, e.tunnelAddr, loopback.Serve(t, loopback.Echo), "")
	if err == nil || !strings.Contains(err.Error(), "peer identity "+serverID+", want "+otherID) {
		t.Fatalf("error %v, want identity mismatch", err)
	}
	var re *RefusedError
	if errors.As(err, &re) {
		t.Error("identity mismatch reported as a refusal by the destination")
	}
}

func TestWrongClientIdentity(t *testing.T) {
	// The control plane says the workload at the client's address is someone else.
	e := newEnv(t, envOpt{authorize: func(peerID string, _ netip.AddrPort) error {
		return &identity.MismatchError{Got: peerID, Want: otherID}
	}})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := e.pool.Connect(ctx, e.src, serverID, e.tunnelAddr, loopback.Serve(t, loopback.Echo), "")
	if err == nil {
		t.Fatal("server accepted a client the control plane does not know at that address")
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if len(e.streams) != 0 {
		t.Error("a stream reached the server")
	}
}

func TestClientFromOtherCA(t *testing.T) {
	e := newEnv(t, envOpt{})
	other := identitytest.NewCA(t)
	bundle := append(append([]byte(nil), e.ca.RootPEM...), other.RootPEM...)
	if err := e.cstore.Update(bundle, map[string]identity.CertPEM{clientID: other.Valid(t, clientID)}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := e.pool.Connect(ctx, e.src, serverID, e.tunnelAddr, loopback.Serve(t, loopback.Echo), ""); err == nil {
		t.Fatal("client with a certificate from another CA accepted")
	}
}

// settle polls until cond holds or the deadline passes.
func settle(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestConcurrentStreams(t *testing.T) {
	base := runtime.NumGoroutine()
	target := loopback.Serve(t, loopback.Echo)
	e := newEnv(t, envOpt{})
	const n = 200
	var wg sync.WaitGroup
	errs := make(chan error, n)
	streams := make(chan *Stream, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			s, err := e.pool.Connect(ctx, e.src, serverID, e.tunnelAddr, target, "")
			if err != nil {
				errs <- err
				return
			}
			streams <- s
			msg := bytes.Repeat([]byte{byte(i)}, 1000+i)
			if _, err := s.Write(msg); err != nil {
				errs <- err
				return
			}
			s.CloseWrite()
			got, err := io.ReadAll(s)
			if err != nil || !bytes.Equal(got, msg) {
				errs <- fmt.Errorf("stream %d: %d bytes, %v", i, len(got), err)
			}
		}()
	}
	// Every stream is open at the same time at some point: hold them until all read.
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	st := e.pool.Stats()
	if st.Conns < 1 || st.Conns > 3 {
		t.Errorf("%d tunnel connections for %d streams, want 1 to 3", st.Conns, n)
	}
	if st.Streams != len(streams) {
		t.Errorf("Stats().Streams %d, want %d", st.Streams, len(streams))
	}
	close(streams)
	for s := range streams {
		s.Close()
	}
	if st := e.pool.Stats(); st.Streams != 0 {
		t.Errorf("streams %d after closing all", st.Streams)
	}
	settle(t, "server handlers to finish", func() bool {
		e.mu.Lock()
		defer e.mu.Unlock()
		return len(e.streams) == n
	})
	// Per-stream goroutines are gone while the pooled connections stay up.
	settle(t, "per-stream goroutines to exit", func() bool { return runtime.NumGoroutine() <= base+20 })
	e.pool.Close()
	e.srv.Close()
	settle(t, "goroutines back to baseline", func() bool { return runtime.NumGoroutine() <= base+2 })
}

func TestIdleConnectionsClose(t *testing.T) {
	e := newEnv(t, envOpt{idleTimeout: 200 * time.Millisecond})
	s := e.connect(t, loopback.Serve(t, loopback.Echo))
	// Counted while the stream is open: the idle clock has not started yet.
	if st := e.pool.Stats(); st.Conns != 1 {
		t.Fatalf("conns %d, want 1", st.Conns)
	}
	s.CloseWrite()
	io.ReadAll(s)
	s.Close()
	settle(t, "idle connection to close", func() bool { return e.pool.Stats().Conns == 0 })
	// The pool dials again when needed.
	s = e.connect(t, loopback.Serve(t, loopback.Echo))
	s.Close()
}

func TestServerCloseEndsStreams(t *testing.T) {
	base := runtime.NumGoroutine()
	e := newEnv(t, envOpt{})
	s := e.connect(t, loopback.Serve(t, loopback.Echo))
	defer s.Close()
	if _, err := s.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	e.srv.Close()
	if _, err := io.ReadAll(s); err == nil {
		// Echo may have answered first; then EOF would be wrong too: the app never
		// half-closed, so the stream must end with an error.
		t.Error("stream ended cleanly after the server closed")
	}
	s.Close()
	e.pool.Close()
	settle(t, "goroutines back to baseline", func() bool { return runtime.NumGoroutine() <= base+2 })
}

func TestPoolReusesConnection(t *testing.T) {
	e := newEnv(t, envOpt{})
	target := loopback.Serve(t, loopback.Echo)
	for i := 0; i < 3; i++ {
		s := e.connect(t, target)
		s.CloseWrite()
		io.ReadAll(s)
		s.Close()
	}
	if st := e.pool.Stats(); st.Conns != 1 {
		t.Errorf("conns %d after sequential streams, want 1", st.Conns)
	}
}

// Streams closed with bytes received and unread give them back to the connection's
// flow-control window: six of them hold more than its 16 MiB, and a stream after
// them on the same connection still carries 8 MiB.
func TestClosedStreamsReturnTheirWindow(t *testing.T) {
	e := newEnv(t, envOpt{})
	talker := loopback.Serve(t, func(c *net.TCPConn) {
		c.Write(make([]byte, 4<<20))
		io.Copy(io.Discard, c)
	})
	for i := range 6 {
		s := e.connect(t, talker)
		stop := time.AfterFunc(10*time.Second, func() { s.Close() }) // a stall fails the read
		if _, err := io.ReadFull(s, make([]byte, 1)); err != nil {
			t.Fatalf("stream %d after %d closed ones: no byte in 10 s: %v", i+1, i, err)
		}
		stop.Stop()
		time.Sleep(100 * time.Millisecond) // the stream's window fills, unread
		s.Close()
	}
	s := e.connect(t, loopback.Serve(t, loopback.Echo))
	stop := time.AfterFunc(20*time.Second, func() { s.Close() })
	defer stop.Stop()
	data := make([]byte, 8<<20)
	go func() {
		s.Write(data)
		s.CloseWrite()
	}()
	n, err := io.Copy(io.Discard, s)
	if err != nil || n != int64(len(data)) {
		t.Fatalf("echoed %d of %d bytes after the closed streams: %v", n, len(data), err)
	}
	if d := e.src.dials.Load(); d != 1 {
		t.Fatalf("%d tunnel connections, want 1: the check needs the one the closed streams used", d)
	}
}

func TestShutdownWaitsForStreams(t *testing.T) {
	e := newEnv(t, envOpt{})
	s := e.connect(t, loopback.Serve(t, loopback.Echo))
	defer s.Close()
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		done <- e.srv.Shutdown(ctx)
	}()
	// Once the server is draining, the stream in progress keeps working, and
	// Shutdown cannot have returned: it returns only when the stream has ended.
	settle(t, "the server to start draining", e.srv.isClosed)
	if _, err := s.Write([]byte("still here")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 10)
	if _, err := io.ReadFull(s, buf); err != nil || string(buf) != "still here" {
		t.Fatalf("during shutdown: %q, %v", buf, err)
	}
	select {
	case err := <-done:
		t.Fatalf("Shutdown returned %v with a stream open", err)
	default:
	}
	s.CloseWrite()
	io.ReadAll(s)
	s.Close()
	if err := <-done; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
}

// TestShutdownWithRotationWatcher: a server that follows certificate changes
// returns from Shutdown once its streams have ended, not when ctx expires (the
// watcher lives until Close; a handoff's drain waited out its whole grace on it).
func TestShutdownWithRotationWatcher(t *testing.T) {
	e := newEnv(t, envOpt{watch: true})
	s := e.connect(t, loopback.Serve(t, loopback.Echo))
	s.CloseWrite()
	io.ReadAll(s)
	s.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := e.srv.Shutdown(ctx); err != nil {
		t.Fatalf("Shutdown with no stream open: %v (it waited for the rotation watcher)", err)
	}
}
