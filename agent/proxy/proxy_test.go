package proxy

import (
	"cmp"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"testing"

	"github.com/ferrymesh/ferry/agent/identity"
	"github.com/ferrymesh/ferry/agent/pipe"
	"github.com/ferrymesh/ferry/agent/tunnel"
	"github.com/ferrymesh/ferry/api/admin"
	"github.com/ferrymesh/ferry/api/mesh"
	"github.com/ferrymesh/ferry/internal/loopback"
	"golang.org/x/sys/unix"
)

// These tests run as an ordinary user: the capture, the pods' namespaces and the
// tunnel pool are fakes, and every byte crosses loopback in the test's own namespace.

// fakeCapture says every outbound connection was going to dst (or fails with err).
// A test changes dst with setDst while the connections it opened before are still
// being handled.
type fakeCapture struct {
	mu  sync.Mutex
	dst netip.AddrPort
	err error
}

func (f *fakeCapture) setDst(dst netip.AddrPort) {
	f.mu.Lock()
	f.dst = dst
	f.mu.Unlock()
}

func (*fakeCapture) InboundAddr(netip.Addr) netip.Addr                 { return netip.MustParseAddr("127.0.0.1") }
func (*fakeCapture) SetInboundListener(netip.Addr, syscall.Conn) error { return nil }
func (f *fakeCapture) OutboundDst(uint64, *net.TCPConn) (netip.AddrPort, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.dst, f.err
}
func (*fakeCapture) InboundDst(c *net.TCPConn) (netip.AddrPort, error) {
	return c.LocalAddr().(*net.TCPAddr).AddrPort(), nil
}
func (*fakeCapture) Sockhash() bool { return false }

// dialed is one connection a fake opened: from where, to where.
type dialed struct {
	src  tunnel.Source // fakeTunnels only
	id   string        // fakeTunnels: the identity the server must prove
	via  netip.AddrPort
	from netip.Addr // loopNet: the source address asked for
	to   netip.AddrPort
}

// loopNet is a pod's namespace on loopback: it records each dial and connects it to
// the test's app instead.
type loopNet struct {
	app netip.AddrPort
	mu  sync.Mutex
	log []dialed
}

func (n *loopNet) Listen(netip.AddrPort) (net.Listener, error) {
	return nil, errors.New("loopNet: no listeners")
}

func (n *loopNet) Dial(ctx context.Context, src netip.Addr, dst netip.AddrPort) (*net.TCPConn, error) {
	n.mu.Lock()
	n.log = append(n.log, dialed{from: src, to: dst})
	n.mu.Unlock()
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", n.app.String())
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

func (n *loopNet) dials() []dialed {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]dialed(nil), n.log...)
}

// fakeTunnels stands in for the tunnel pool: it records each Connect and answers with
// a connection to the app, or with err.
type fakeTunnels struct {
	app netip.AddrPort
	err error
	mu  sync.Mutex
	log []dialed
}

func (f *fakeTunnels) Connect(ctx context.Context, src tunnel.Source, dstID string, tunnelAddr, target netip.AddrPort, _ string) (pipe.HalfCloser, error) {
	f.mu.Lock()
	f.log = append(f.log, dialed{src: src, id: dstID, via: tunnelAddr, to: target})
	f.mu.Unlock()
	if f.err != nil {
		return nil, f.err
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", f.app.String())
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

var (
	wa = Workload{UID: "ua", Name: "default/a", Identity: "spiffe://cluster.local/ns/default/sa/a", Node: "node1", IPs: []netip.Addr{netip.MustParseAddr("10.1.1.10")}}
	wb = Workload{UID: "ub", Name: "default/b", Identity: "spiffe://cluster.local/ns/default/sa/b", Node: "node1", IPs: []netip.Addr{netip.MustParseAddr("10.1.1.11")}}
	wc = Workload{UID: "uc", Name: "default/c", Identity: "spiffe://cluster.local/ns/default/sa/c", Node: "node2", IPs: []netip.Addr{netip.MustParseAddr("10.1.2.10")}}
)

// testProxy is a started proxy serving pods a and b (node1), with c on node2 in the
// mesh; each local pod's namespace is a loopNet to app.
type testProxy struct {
	*Proxy
	capture *fakeCapture
	tunnels *fakeTunnels
	a, b    *pod
	netA    *loopNet
	netB    *loopNet
}

func newTestProxy(t testing.TB) *testProxy {
	t.Helper()
	return newTestProxyWith(t, Limits{})
}

// newTestProxyWith is newTestProxy with the given limits.
func newTestProxyWith(t testing.TB, lim Limits) *testProxy {
	t.Helper()
	app := loopback.Serve(t, loopback.Echo)
	tp := &testProxy{capture: &fakeCapture{}, tunnels: &fakeTunnels{app: app}, netA: &loopNet{app: app}, netB: &loopNet{app: app}}
	p, err := New(Config{Node: "node1", Mark: mesh.DefaultMark, Ports: mesh.DefaultPorts(), Capture: tp.capture,
		Identities: identity.NewStore(), Log: slog.New(slog.DiscardHandler), Limits: lim})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Stop(context.Background()) })
	p.tunnels = tp.tunnels
	p.SetMesh([]Workload{wa, wb, wc})
	tp.Proxy = p
	tp.a, tp.b = tp.pod(wa, tp.netA), tp.pod(wb, tp.netB)
	return tp
}

// pod enters w as a local pod without opening listeners: the tests hand connections
// to handleOutbound as an accept would.
func (tp *testProxy) pod(w Workload, n podNet) *pod {
	pd := &pod{proxy: tp.Proxy, w: w, net: n, ids: tp.cfg.Identities}
	pd.ctx, pd.cancel = context.WithCancel(tp.ctx)
	tp.mu.Lock()
	tp.pods[w.UID] = pd
	for _, ip := range w.IPs {
		tp.local[ip] = pd
	}
	tp.mu.Unlock()
	return pd
}

// outbound runs one captured connection from pod pd through handleOutbound: it sends
// msg, half-closes, and returns what came back, the client's first error and the
// record.
func (tp *testProxy) outbound(t *testing.T, pd *pod, dst netip.AddrPort, msg string) (string, error, Conn) {
	t.Helper()
	tp.capture.setDst(dst)
	client, accepted := loopback.Pair(t)
	done := make(chan struct{})
	go func() {
		defer close(done)
		tp.handleOutbound(pd, accepted)
	}()
	// A reset is reported once, to whichever call meets it first: the write, the
	// half-close or the read; the first error of the three is the client's. A
	// half-close after the reset arrived fails with ENOTCONN and leaves the reset
	// for the read to report.
	_, werr := client.Write([]byte(msg))
	cerr := client.CloseWrite()
	if errors.Is(cerr, syscall.ENOTCONN) {
		cerr = nil
	}
	reply, rerr := io.ReadAll(client)
	<-done
	rerr = cmp.Or(werr, cerr, rerr)
	_, ended := tp.Connections()
	if len(ended) == 0 {
		t.Fatal("no connection record")
	}
	return string(reply), rerr, ended[len(ended)-1]
}

func TestDecide(t *testing.T) {
	local := &pod{w: wb}
	byIP := map[netip.Addr]Workload{wa.IPs[0]: wa, wb.IPs[0]: wb, wc.IPs[0]: wc}
	locals := map[netip.Addr]*pod{wb.IPs[0]: local}
	for _, tc := range []struct {
		dst  string
		want admin.Security
		peer string
	}{
		{"10.1.1.11", admin.SameNode, wb.Identity},
		{"::ffff:10.1.1.11", admin.SameNode, wb.Identity}, // a v4-mapped address is the same pod
		{"10.1.2.10", admin.MTLS, wc.Identity},
		{"192.0.2.1", admin.Plaintext, ""},
	} {
		r := decide(netip.MustParseAddr(tc.dst), byIP, locals)
		if r.Security != tc.want || r.Peer.Identity != tc.peer {
			t.Errorf("%s: %s to %q, want %s to %q", tc.dst, r.Security, r.Peer.Identity, tc.want, tc.peer)
		}
		if (r.Security == admin.SameNode) != (r.Local == local) {
			t.Errorf("%s: local pod %v", tc.dst, r.Local)
		}
	}
}

func TestOutboundSameNode(t *testing.T) {
	tp := newTestProxy(t)
	dst := netip.AddrPortFrom(wb.IPs[0], 8080)
	reply, err, rec := tp.outbound(t, tp.a, dst, "ping")
	if err != nil || reply != "ping" {
		t.Fatalf("reply %q, %v", reply, err)
	}
	if rec.Security != admin.SameNode || rec.SrcIdentity != wa.Identity || rec.DstIdentity != wb.Identity || rec.Dst != dst || rec.Src.Addr() != wa.IPs[0] {
		t.Errorf("record %+v", rec)
	}
	// Delivered from the agent's own address inside b's namespace, not a's.
	if d := tp.netB.dials(); len(d) != 1 || d[0].from != AppSource || d[0].to != dst {
		t.Errorf("dials in b: %+v", d)
	}
	if d := tp.netA.dials(); len(d) != 0 {
		t.Errorf("dials in a: %+v", d)
	}
	if len(tp.tunnels.log) != 0 {
		t.Errorf("tunnel used for a pod on this node: %+v", tp.tunnels.log)
	}
}

func TestOutboundOtherNodeThroughTunnel(t *testing.T) {
	tp := newTestProxy(t)
	dst := netip.AddrPortFrom(wc.IPs[0], 8080)
	reply, err, rec := tp.outbound(t, tp.a, dst, "ping")
	if err != nil || reply != "ping" {
		t.Fatalf("reply %q, %v", reply, err)
	}
	if rec.Security != admin.MTLS || rec.DstIdentity != wc.Identity || rec.BytesSent != 4 || rec.BytesRecv != 4 {
		t.Errorf("record %+v", rec)
	}
	want := dialed{src: tp.a, id: wc.Identity, via: netip.AddrPortFrom(wc.IPs[0], mesh.DefaultPorts().Tunnel), to: dst}
	if len(tp.tunnels.log) != 1 || tp.tunnels.log[0] != want {
		t.Errorf("tunnel connects %+v, want one %+v", tp.tunnels.log, want)
	}
	if len(tp.netA.dials())+len(tp.netB.dials()) != 0 {
		t.Error("a pod on another node was dialled directly")
	}
}

func TestOutboundOutsideMeshPlaintext(t *testing.T) {
	tp := newTestProxy(t)
	dst := netip.MustParseAddrPort("192.0.2.1:80")
	reply, err, rec := tp.outbound(t, tp.a, dst, "ping")
	if err != nil || reply != "ping" {
		t.Fatalf("reply %q, %v", reply, err)
	}
	if rec.Security != admin.Plaintext || rec.DstIdentity != "" {
		t.Errorf("record %+v", rec)
	}
	// From the source pod's own namespace and address, unchanged.
	if d := tp.netA.dials(); len(d) != 1 || d[0].from.IsValid() || d[0].to != dst {
		t.Errorf("dials in a: %+v", d)
	}
	if len(tp.tunnels.log) != 0 {
		t.Errorf("tunnel used outside the mesh: %+v", tp.tunnels.log)
	}
}

func TestOutboundRefusedResetsClient(t *testing.T) {
	tp := newTestProxy(t)
	tp.tunnels.err = &tunnel.RefusedError{Status: 403, Reason: "target is not this pod"}
	_, err, rec := tp.outbound(t, tp.a, netip.AddrPortFrom(wc.IPs[0], 8080), "ping")
	if !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, syscall.EPIPE) {
		t.Errorf("client saw %v, want a reset", err)
	}
	if rec.Security != admin.MTLS || rec.Verdict != admin.VerdictDenied || rec.Reason != admin.ReasonForbidden || rec.Status != 403 || rec.BytesSent != 0 {
		t.Errorf("record %+v, want an mTLS connection denied with 403 (forbidden)", rec)
	}
}

func TestOutboundWithoutOrigDst(t *testing.T) {
	tp := newTestProxy(t)
	tp.capture.err = errors.New("no original destination")
	client, accepted := loopback.Pair(t)
	tp.handleOutbound(tp.a, accepted)
	if _, err := io.ReadAll(client); !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("client read %v, want a reset", err)
	}
	if live, ended := tp.Connections(); len(live)+len(ended) != 0 {
		t.Errorf("records %v %v for a connection that went nowhere", live, ended)
	}
}

func TestNewRequiresMarkAndPorts(t *testing.T) {
	base := Config{Node: "n", Mark: mesh.DefaultMark, Ports: mesh.DefaultPorts(), Capture: &fakeCapture{}, Identities: identity.NewStore(), Log: slog.New(slog.DiscardHandler)}
	noMark, noPorts := base, base
	noMark.Mark = 0
	noPorts.Ports = mesh.Ports{}
	for name, cfg := range map[string]Config{"mark": noMark, "ports": noPorts} {
		if _, err := New(cfg); err == nil {
			t.Errorf("no %s: accepted", name)
		}
	}
}

// TestTunnelSocketsCapTheirRTO: the sockets a pod dials tunnels on, and those its
// tunnel listener accepts (Linux does not pass TCP_RTO_MAX_MS from a listener on),
// have the capped retransmission timeout.
func TestTunnelSocketsCapTheirRTO(t *testing.T) {
	check := func(t *testing.T, what string, c syscall.Conn) {
		t.Helper()
		rc, err := c.SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		var rto, user int
		var uerr error
		if err := rc.Control(func(fd uintptr) {
			rto, err = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_RTO_MAX_MS)
			user, uerr = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT)
		}); err != nil {
			t.Fatal(err)
		}
		if errors.Is(err, unix.ENOPROTOOPT) {
			t.Skip("no TCP_RTO_MAX_MS before Linux 6.15")
		}
		if err != nil {
			t.Fatal(err)
		}
		if rto != int(tunnelRTOMax.Milliseconds()) {
			t.Errorf("%s: TCP_RTO_MAX_MS %d, want %d", what, rto, tunnelRTOMax.Milliseconds())
		}
		if uerr != nil || user != int(tunnelUserTimeout.Milliseconds()) {
			t.Errorf("%s: TCP_USER_TIMEOUT %d (%v), want %d", what, user, uerr, tunnelUserTimeout.Milliseconds())
		}
	}

	tp := newTestProxy(t)
	c, err := tp.a.DialTunnel(t.Context(), netip.MustParseAddrPort("10.1.2.10:15008"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	check(t, "dialed tunnel", c.(syscall.Conn))

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tl := tunnelListener{ln.(*net.TCPListener)}
	defer tl.Close()
	d, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	a, err := tl.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	check(t, "accepted tunnel", a.(syscall.Conn))
}
