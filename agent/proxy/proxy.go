// Package proxy is the node's L4 proxy: for every enrolled pod on the node it owns
// three listeners inside the pod's network namespace (outbound capture, inbound
// plaintext capture, mTLS tunnel) and carries each captured connection to where it
// was going: through the tunnel to a pod on another node, straight to a pod on this
// node, or unchanged to a destination outside the mesh.
package proxy

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/ferrymesh/ferry/agent/identity"
	"github.com/ferrymesh/ferry/agent/pipe"
	"github.com/ferrymesh/ferry/agent/tracing"
	"github.com/ferrymesh/ferry/agent/tunnel"
	"github.com/ferrymesh/ferry/api/admin"
	"github.com/ferrymesh/ferry/api/mesh"
	"github.com/ferrymesh/ferry/internal/listener"
	"golang.org/x/sys/unix"
)

// AppSource is the address the agent connects to a pod's app from, so the pod's
// inbound capture (and anything watching) can tell the agent's own hop apart.
var AppSource = netip.MustParseAddr("127.0.0.6")

const dialTimeout = 5 * time.Second

// Workload is an enrolled pod anywhere in the mesh.
type Workload struct {
	UID  string
	Name string // namespace/name
	// Workload is namespace/name of the pod's workload in metrics (its
	// Deployment's, Job's, ... as Istio names it; operator/mesh WorkloadName).
	Workload string
	Identity string // SPIFFE ID
	Node     string
	IPs      []netip.Addr
}

// Capture is what the proxy needs from the capture mode (eBPF or iptables): where a
// pod's inbound listener binds and who is told of it, and where a captured
// connection was going.
type Capture interface {
	// InboundAddr is the address a pod's inbound capture listener binds, given the
	// pod's IP.
	InboundAddr(podIP netip.Addr) netip.Addr
	// SetInboundListener hands the capture a pod's open inbound listener.
	SetInboundListener(podIP netip.Addr, ln syscall.Conn) error
	// OutboundDst is the original destination of an outbound connection accepted
	// from the pod whose netns cookie is given.
	OutboundDst(netnsCookie uint64, c *net.TCPConn) (netip.AddrPort, error)
	// InboundDst is the original destination of an accepted inbound connection.
	InboundDst(c *net.TCPConn) (netip.AddrPort, error)
	// Sockhash reports whether captured sockets may be in Ferry's sockhash (the
	// fast path), where splice(2) must not be used.
	Sockhash() bool
}

// Netns is a pod's network namespace: fn passed to Do runs inside it
// (*netns.Handle).
type Netns interface {
	Do(fn func() error) error
}

// Config configures a Proxy.
type Config struct {
	Node string
	// Mark is the SO_MARK on the agent's sockets, so capture skips them; required.
	Mark uint32
	// Ports are the mesh ports the pods' listeners open on; the capture redirects
	// to the same ones (the agent passes one value to both).
	Ports   mesh.Ports
	Capture Capture
	// Identities holds the trust bundle and the local pods' certificates.
	Identities *identity.Store
	Log        *slog.Logger
	// Observer, optional, is told of every connection (flows and metrics).
	Observer ConnObserver
	// Tracer, optional, makes a span of every request carried at L7.
	Tracer *tracing.Tracer
	// Budgets bound what each pod may hold of the proxy (budget.go); the zero
	// value limits nothing.
	Budgets Budgets
	// Limits bounds what a client connection may cost (limits.go); zero fields
	// take DefaultLimits.
	Limits Limits
}

// Proxy serves the enrolled pods of one node.
type Proxy struct {
	cfg     Config
	log     *slog.Logger
	conns   *tracker
	budgets *ledger // what each pod holds of its budgets (budget.go)
	// onRequest, tests only, runs first in every request's handler (to inject a
	// panic); nil otherwise.
	onRequest func(*http.Request)

	ctx    context.Context // from Start; pods' contexts derive from it
	cancel context.CancelFunc

	mu    sync.RWMutex
	byIP  map[netip.Addr]Workload // every mesh workload, by IP
	pods  map[string]*pod         // local enrolled pods, by UID
	local map[netip.Addr]*pod     // local enrolled pods, by IP
	// services are the Services' cluster IPs and their ready endpoints (services.go).
	services serviceTable
	// authz is the AuthorizationPolicies by protected workload (authz.go).
	authz authzTable
	// paths is how request paths are normalised and matched (normalize.go).
	paths PathOptions

	l7      *l7          // the HTTP server of connections proxied per request (l7.go)
	pool    *tunnel.Pool // tunnels to pods on other nodes
	tunnels tunnels      // pool, as routing uses it (a fake in tests)

	// draining holds the tunnel servers of removed pods until their streams end.
	draining map[*tunnel.Server]struct{}

	wg sync.WaitGroup
	// handling counts the accepted connections whose handler runs (handoff.go).
	handling atomic.Int64
}

// tunnels opens streams to pods on other nodes.
type tunnels interface {
	Connect(ctx context.Context, src tunnel.Source, dstID string, tunnelAddr, target netip.AddrPort, protocol string) (pipe.HalfCloser, error)
}

// poolTunnels is a tunnel.Pool as tunnels.
type poolTunnels struct{ *tunnel.Pool }

func (p poolTunnels) Connect(ctx context.Context, src tunnel.Source, dstID string, tunnelAddr, target netip.AddrPort, protocol string) (pipe.HalfCloser, error) {
	s, err := p.Pool.Connect(ctx, src, dstID, tunnelAddr, target, protocol)
	if err != nil {
		return nil, err
	}
	return s, nil
}

// pod is one enrolled pod on this node and the listeners the proxy holds in it. It
// is also the tunnel pool's handle for the pod (tunnel.Source): tunnels are pooled
// per pod and dialled from inside its namespace with its certificate.
type pod struct {
	proxy     *Proxy
	w         Workload
	net       podNet
	ids       *identity.Store
	cookie    uint64
	listeners []net.Listener
	tunnel    *tunnel.Server
	ctx       context.Context
	cancel    context.CancelFunc

	// transports are the pod's upstream HTTP connections, per endpoint (l7.go): a
	// pool per protocol and idle timeout.
	transportsMu sync.RWMutex
	transports   map[transportKey]*http.Transport

	// expiredLogged is the NotAfter (Unix ns) of the expired certificate whose
	// refusals were last logged (certexpiry.go).
	expiredLogged atomic.Int64
}

// New validates cfg and returns a proxy with no pods.
func New(cfg Config) (*Proxy, error) {
	if cfg.Capture == nil || cfg.Identities == nil || cfg.Log == nil {
		return nil, errors.New("proxy config: capture, identities and logger are required")
	}
	if cfg.Mark == 0 {
		return nil, errors.New("proxy config: a socket mark is required, or capture would take the proxy's own connections")
	}
	if err := cfg.Ports.Validate(); err != nil {
		return nil, fmt.Errorf("proxy config: %w", err)
	}
	p := &Proxy{
		cfg:     cfg,
		log:     cfg.Log,
		conns:   newTracker(1024),
		budgets: newLedger(cfg.Budgets),
		byIP:    map[netip.Addr]Workload{},
		pods:    map[string]*pod{},
		local:   map[netip.Addr]*pod{},
		paths:   PathOptions{EscapedSlashes: mesh.EscapedKeep},

		draining: map[*tunnel.Server]struct{}{},
	}
	p.conns.obs, p.conns.resolve, p.conns.lifetime = cfg.Observer, p.workloadAt, cfg.Identities.Lifetime
	var err error
	p.pool, err = tunnel.NewPool(tunnel.PoolConfig{Logger: cfg.Log, Changes: cfg.Identities.Changed})
	if err != nil {
		return nil, err
	}
	p.tunnels = poolTunnels{p.pool}
	p.l7 = p.newL7()
	return p, nil
}

// Start readies the proxy for pods; their listeners open as AddPod is called. ctx
// bounds the proxy's life: pods' connections derive their contexts from it.
func (p *Proxy) Start(ctx context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ctx != nil {
		return errors.New("proxy already started")
	}
	p.ctx, p.cancel = context.WithCancel(ctx)
	p.goServe(func() { _ = p.l7.srv.Serve(p.l7.ln) })
	return nil
}

// SetMesh replaces the directory of mesh workloads used to route connections.
func (p *Proxy) SetMesh(ws []Workload) {
	byIP := make(map[netip.Addr]Workload, len(ws))
	for _, w := range ws {
		for _, ip := range w.IPs {
			byIP[ip] = w
		}
	}
	p.mu.Lock()
	p.byIP = byIP
	p.mu.Unlock()
}

// AddPod opens the pod's listeners inside its network namespace and starts serving
// them. ns stays owned by the caller until RemovePod.
func (p *Proxy) AddPod(w Workload, ns Netns, cookie uint64) error {
	p.mu.RLock()
	ctx := p.ctx
	p.mu.RUnlock()
	if ctx == nil {
		ctx = context.Background()
	}
	return p.addPod(w, nsNet{ns: ns, mark: p.cfg.Mark, cookie: cookie, ctx: ctx}, cookie)
}

func (p *Proxy) addPod(w Workload, pn podNet, cookie uint64) error {
	if len(w.IPs) == 0 {
		return fmt.Errorf("pod %s: no IP", w.Name)
	}
	p.mu.RLock()
	parent := p.ctx
	p.mu.RUnlock()
	if parent == nil {
		return fmt.Errorf("pod %s: proxy not started", w.Name)
	}
	ip := w.IPs[0]
	ports := p.cfg.Ports
	pd := &pod{proxy: p, w: w, net: pn, ids: p.cfg.Identities, cookie: cookie}
	pd.ctx, pd.cancel = context.WithCancel(parent)

	out, err := pn.Listen(netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), ports.Outbound))
	if err != nil {
		pd.cancel()
		return fmt.Errorf("pod %s outbound listener: %w", w.Name, err)
	}
	outs := []net.Listener{out}
	if out6, err := pn.Listen(netip.AddrPortFrom(netip.IPv6Loopback(), ports.Outbound)); err == nil {
		outs = append(outs, out6)
	} // else no IPv6 loopback in this pod: no IPv6 destination to capture either
	pd.listeners = append(pd.listeners, outs...)
	in, err := pn.Listen(netip.AddrPortFrom(p.cfg.Capture.InboundAddr(ip), ports.Inbound))
	if err != nil {
		pd.close()
		return fmt.Errorf("pod %s inbound listener: %w", w.Name, err)
	}
	pd.listeners = append(pd.listeners, in)
	tun, err := pn.Listen(netip.AddrPortFrom(ip, ports.Tunnel))
	if err != nil {
		pd.close()
		return fmt.Errorf("pod %s tunnel listener: %w", w.Name, err)
	}
	pd.listeners = append(pd.listeners, tun)
	if err := p.cfg.Capture.SetInboundListener(ip, in.(*net.TCPListener)); err != nil {
		pd.close()
		return fmt.Errorf("pod %s inbound capture: %w", w.Name, err)
	}
	pd.tunnel, err = tunnel.NewServer(tunnel.ServerConfig{
		TLS: func(net.Addr) (*tls.Config, error) {
			return p.cfg.Identities.ServerConfig(w.Identity, nil), nil
		},
		Authorize: p.authorize,
		Changes:   p.cfg.Identities.Changed,
		Limits:    p.cfg.Limits.Tunnel,
		OnHandshakeFailed: func(remote netip.AddrPort, he *tunnel.HandshakeError) {
			p.handshakeRefused(pd, remote, he)
		},
		Admit: func(peer string, remote, target netip.AddrPort, httpStream bool) error {
			if err := pd.certValid(time.Now()); err != nil {
				return err
			}
			if httpStream {
				return nil // each request is decided at L7 (serveRequest)
			}
			if d := p.admit(pd, callerOf(peer, remote.Addr()), target.Port(), nil); d != nil {
				return d
			}
			return nil
		},
		Hold: func(peer string, _ netip.AddrPort) (func(), error) {
			h, over := p.takeInbound(peer)
			if over != nil {
				return nil, over
			}
			return h.release, nil
		},
		Dial: func(ctx context.Context, target netip.AddrPort) (net.Conn, error) {
			return p.dialApp(ctx, pd, target)
		},
		Logger:    p.log.With("pod", w.Name),
		OnStream:  func(si tunnel.StreamInfo) { p.recordTunnelStream(pd, si) },
		ServeHTTP: func(si tunnel.StreamInfo, c net.Conn) { p.serveInboundHTTP(pd, si, c) },
	})
	if err != nil {
		pd.close()
		return fmt.Errorf("pod %s tunnel: %w", w.Name, err)
	}

	p.mu.Lock()
	old := p.pods[w.UID]
	p.pods[w.UID] = pd
	for _, ip := range w.IPs {
		p.local[ip] = pd
	}
	p.mu.Unlock()
	if old != nil {
		old.close()
		p.pool.Forget(old)
	}

	for _, ln := range outs {
		p.goServe(func() { p.serveOutbound(pd, ln) })
	}
	p.goServe(func() { p.serveInbound(pd, in) })
	p.goServe(func() {
		err := pd.tunnel.Serve(tunnelListener{tun.(*net.TCPListener)})
		if err != nil && pd.ctx.Err() == nil && !errors.Is(err, tunnel.ErrServerClosed) && !errors.Is(err, net.ErrClosed) {
			p.log.Warn("tunnel listener stopped", "pod", w.Name, "error", err)
		}
	})
	p.log.Info("pod listeners open", "pod", w.Name, "ip", ip, "netns_cookie", cookie)
	return nil
}

// RemovePod closes the pod's listeners. Connections already proxied keep running
// until they end on their own.
func (p *Proxy) RemovePod(uid string) {
	p.mu.Lock()
	pd := p.pods[uid]
	delete(p.pods, uid)
	if pd != nil {
		for _, ip := range pd.w.IPs {
			if p.local[ip] == pd {
				delete(p.local, ip)
			}
		}
	}
	p.mu.Unlock()
	if pd != nil {
		pd.close()
		p.pool.Forget(pd) // a pod enrolled again is a new handle with tunnels of its own
		// Peers stop opening streams on tunnels into a pod that left (they could
		// no longer reach its apps), while streams in progress carry on.
		p.drainTunnel(pd.tunnel)
		p.log.Info("pod listeners closed", "pod", pd.w.Name)
	}
}

// Pods lists the UIDs of the pods the proxy serves.
func (p *Proxy) Pods() []string {
	p.mu.RLock()
	defer p.mu.RUnlock()
	uids := make([]string, 0, len(p.pods))
	for uid := range p.pods {
		uids = append(uids, uid)
	}
	return uids
}

// Stop closes every pod's listeners and waits for every proxied connection to end;
// requests in flight at L7 get until ctx ends.
func (p *Proxy) Stop(ctx context.Context) error {
	p.mu.Lock()
	pods := p.pods
	p.pods = map[string]*pod{}
	p.local = map[netip.Addr]*pod{}
	p.mu.Unlock()
	for _, pd := range pods {
		pd.close()
	}
	p.l7.stop(ctx)
	p.mu.Lock()
	for ts := range p.draining {
		ts.Close() // its Shutdown goroutine then returns
	}
	p.mu.Unlock()
	p.wg.Wait()
	p.pool.Close()
	for _, pd := range pods {
		if pd.tunnel != nil {
			pd.tunnel.Close()
		}
	}
	if p.cancel != nil {
		p.cancel()
	}
	return nil
}

// TunnelStats counts the tunnel connections and streams this node has open to others.
func (p *Proxy) TunnelStats() tunnel.PoolStats { return p.pool.Stats() }

// Connections returns the live proxied connections and the most recent ended ones.
func (p *Proxy) Connections() (live, ended []Conn) { return p.conns.snapshot() }

// close stops the pod's listeners; streams in progress carry on to their end.
func (pd *pod) close() {
	pd.cancel()
	for _, ln := range pd.listeners {
		ln.Close()
	}
	pd.closeTransports()
}

// DialTunnel opens a tunnel connection from inside the pod (tunnel.Source).
func (pd *pod) DialTunnel(ctx context.Context, addr netip.AddrPort) (net.Conn, error) {
	c, err := pd.net.Dial(ctx, netip.Addr{}, addr)
	if err != nil {
		return nil, err
	}
	tuneTunnel(c)
	return c, nil
}

// tunnelRTOMax caps the retransmission timeout of tunnel sockets. Linux backs it
// off towards 120 s: after a 10 s partition a tunnel with bytes in flight would
// next retransmit some 3 to 6 s after the link is back, and every stream on it (new
// ones too) would wait that long. Nodes of one cluster are far less than a second
// apart, so a 1 s cap costs nothing and brings tunnels back within about a second.
const tunnelRTOMax = time.Second

// tunnelUserTimeout is how long a tunnel's sent bytes may stay unacknowledged
// before TCP gives the connection up: the tunnel's ping timeout, which does not
// judge a connection whose own write is stalled (its PING may be queued behind
// that write), so a peer gone during such a write is found this way.
const tunnelUserTimeout = 15 * time.Second

// tuneTunnel caps a tunnel socket's retransmission timeout: TCP_RTO_MAX_MS (Linux
// 6.15 and later) to tunnelRTOMax; an older kernel keeps its default backoff. It
// sets TCP_USER_TIMEOUT to tunnelUserTimeout.
func tuneTunnel(c syscall.Conn) {
	rc, err := c.SyscallConn()
	if err != nil {
		return
	}
	_ = rc.Control(func(fd uintptr) {
		_ = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_RTO_MAX_MS, int(tunnelRTOMax.Milliseconds()))
		_ = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, int(tunnelUserTimeout.Milliseconds()))
	})
}

// tunnelListener tunes each tunnel connection it accepts (tuneTunnel): Linux takes
// TCP_RTO_MAX_MS only on a connected socket, so a listener cannot pass it on.
type tunnelListener struct{ *net.TCPListener }

func (l tunnelListener) Accept() (net.Conn, error) {
	c, err := l.AcceptTCP()
	if err != nil {
		return nil, err
	}
	tuneTunnel(c)
	return c, nil
}

// ClientTLS presents the pod's certificate and requires dstID (tunnel.Source).
func (pd *pod) ClientTLS(dstID string) *tls.Config { return pd.ids.ClientConfig(pd.w.Identity, dstID) }

// String names the pod (tunnel.Source).
func (pd *pod) String() string { return pd.w.Name }

func (pd *pod) has(ip netip.Addr) bool {
	for _, a := range pd.w.IPs {
		if a == ip.Unmap() {
			return true
		}
	}
	return false
}

func (p *Proxy) goServe(fn func()) {
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		fn()
	}()
}

// acceptLoop accepts on ln until it is closed and handles each connection on its
// own goroutine, owned by the proxy's wait group.
func (p *Proxy) acceptLoop(pd *pod, ln net.Listener, handle func(*net.TCPConn)) {
	for {
		c, err := ln.Accept()
		if err != nil {
			if pd.ctx.Err() == nil && !errors.Is(err, net.ErrClosed) {
				p.log.Warn("accept", "pod", pd.w.Name, "error", err)
			}
			return
		}
		p.handling.Add(1) // Drain waits for it
		p.goServe(func() {
			defer p.handling.Add(-1)
			p.serveConn(pd, c.(*net.TCPConn), handle)
		})
	}
}

// serveOutbound handles connections the pod's apps made, captured on their way out.
func (p *Proxy) serveOutbound(pd *pod, ln net.Listener) {
	p.acceptLoop(pd, ln, func(client *net.TCPConn) { p.handleOutbound(pd, client) })
}

// handleOutbound carries one captured outbound connection of pod pd to where it was
// going, and records it.
func (p *Proxy) handleOutbound(pd *pod, client *net.TCPConn) {
	peer := client.RemoteAddr().(*net.TCPAddr).AddrPort()
	dst, err := p.cfg.Capture.OutboundDst(pd.cookie, client)
	if err != nil {
		p.log.Warn("outbound without original destination", "pod", pd.w.Name, "port", peer.Port(), "error", err)
		pipe.Abort(client)
		return
	}
	src := netip.AddrPortFrom(pd.w.IPs[0], peer.Port())
	rec := Conn{Direction: admin.Outbound, Pod: pd.w.Name, Src: src, Dst: dst, SrcIdentity: pd.w.Identity}
	h, over := p.takeOutbound(pd)
	if over != nil {
		pipe.Abort(client) // at once: a pod over its budget waits for nothing
		p.conns.budgetRefused(p.conns.open(rec), over)
		return
	}
	handed := false // to the L7 server, which releases h when the connection closes
	defer func() {
		if !handed {
			h.release()
		}
	}()
	p.mu.RLock()
	vp, service, isService := p.services.lookup(dst)
	p.mu.RUnlock()
	var early []byte // what the client sent while its protocol was detected
	if isService {
		// A Service address: the proxy picks the endpoint, as kube-proxy would
		// have, per connection (TCP) or per request (HTTP).
		rec.Service = dst
		if vp == nil || !vp.reachable() {
			pipe.Abort(client) // refused at once: no endpoint will come
			p.conns.noEndpoint(p.conns.open(rec), service)
			return
		}
		proto, r := vp.protocol, io.Reader(nil)
		if proto == "" {
			br := bufio.NewReaderSize(client, 2*maxRequestLine)
			proto, r = detect(client, br, detectWait), br
			early, _ = br.Peek(br.Buffered())
		}
		if proto != admin.TCP {
			rec.Protocol = proto
			handed = true
			p.serveHTTP(pd, client, r, rec, h)
			return
		}
		rec.Protocol = admin.TCP
		ep, ok := vp.pick()
		if !ok { // routes, which TCP does not follow, kept it open
			pipe.Abort(client)
			p.conns.noEndpoint(p.conns.open(rec), service)
			return
		}
		rec.Dst = ep
	}
	p.mu.RLock()
	r := decide(rec.Dst.Addr(), p.byIP, p.local)
	p.mu.RUnlock()
	rec.Security, rec.DstIdentity = r.Security, r.Peer.Identity
	if r.Security == admin.SameNode {
		// No destination proxy will see it: the destination's policies are
		// applied here, with the source pod's identity.
		if d := p.admit(r.Local, callerOf(pd.w.Identity, pd.w.IPs[0]), rec.Dst.Port(), nil); d != nil {
			pipe.Abort(client)
			p.conns.policyRefused(p.conns.open(rec), d)
			return
		}
	}
	upstream, err := p.dialRoute(pd.ctx, pd, rec.Dst, r, "")
	if err == nil && len(early) > 0 {
		if _, err = upstream.Write(early); err != nil {
			upstream.Close()
		}
	}
	c := p.conns.open(rec)
	if err != nil {
		// The app's connect already succeeded (to the capture listener), so a
		// reset is how it learns the destination refused.
		pipe.Abort(client)
		p.conns.refused(c, err)
		p.log.Debug("outbound refused", "pod", pd.w.Name, "dst", rec.Dst, "error", err)
		return
	}
	sent, recv, err := pipe.Join(client, upstream, !p.cfg.Capture.Sockhash())
	p.conns.close(c, sent+int64(len(early)), recv, err)
}

// route is how a captured outbound connection reaches its original destination.
type route struct {
	Security admin.Security // SameNode, MTLS or Plaintext
	Local    *pod           // SameNode: the destination pod, which this proxy serves
	Peer     Workload       // SameNode and MTLS: the destination workload
}

// decide is the one routing rule: a pod this proxy serves is reached directly inside
// its own namespace, any other mesh workload through the tunnel to its node, and
// anything else (outside the mesh) in plaintext from the source pod.
func decide(dst netip.Addr, byIP map[netip.Addr]Workload, local map[netip.Addr]*pod) route {
	dst = dst.Unmap()
	if lp := local[dst]; lp != nil {
		return route{Security: admin.SameNode, Local: lp, Peer: lp.w}
	}
	if w, ok := byIP[dst]; ok {
		return route{Security: admin.MTLS, Peer: w}
	}
	return route{Security: admin.Plaintext}
}

// dialRoute opens the upstream side of a connection from pod from to dst along r,
// within ctx; protocol tells a tunnel what the stream carries (tunnel.Pool.Connect).
func (p *Proxy) dialRoute(ctx context.Context, from *pod, dst netip.AddrPort, r route, protocol string) (pipe.HalfCloser, error) {
	switch r.Security {
	case admin.SameNode:
		return p.dialApp(ctx, r.Local, dst)
	case admin.MTLS:
		if err := from.certValid(time.Now()); err != nil {
			return nil, err
		}
		ctx, cancel := context.WithTimeout(ctx, dialTimeout)
		defer cancel()
		return p.tunnels.Connect(ctx, from, r.Peer.Identity, netip.AddrPortFrom(dst.Addr().Unmap(), p.cfg.Ports.Tunnel), dst, protocol)
	default:
		return from.net.Dial(ctx, netip.Addr{}, dst)
	}
}

// serveInbound handles plaintext connections to the pod's ports that inbound capture
// steered to its listener (permissive mode).
func (p *Proxy) serveInbound(pd *pod, ln net.Listener) {
	p.acceptLoop(pd, ln, func(client *net.TCPConn) {
		src := client.RemoteAddr().(*net.TCPAddr).AddrPort()
		dst, err := p.cfg.Capture.InboundDst(client)
		if err != nil {
			p.log.Warn("inbound without original destination", "pod", pd.w.Name, "error", err)
			pipe.Abort(client)
			return
		}
		rec := Conn{Direction: admin.Inbound, Pod: pd.w.Name, Src: src, Dst: dst, DstIdentity: pd.w.Identity, Security: admin.Plaintext}
		// Plaintext proves no identity: its source address is the tenant.
		h, over := p.takeInbound(src.Addr().Unmap().String())
		if over != nil {
			pipe.Abort(client)
			p.conns.budgetRefused(p.conns.open(rec), over)
			return
		}
		defer h.release()
		// Plaintext has no identity: only rules without identities and
		// namespaces can allow it.
		if d := p.admit(pd, callerOf("", src.Addr()), dst.Port(), nil); d != nil {
			pipe.Abort(client)
			p.conns.policyRefused(p.conns.open(rec), d)
			return
		}
		c := p.conns.open(rec)
		app, err := p.dialApp(pd.ctx, pd, dst)
		if err != nil {
			pipe.Abort(client)
			p.conns.refused(c, err)
			return
		}
		sent, recv, err := pipe.Join(client, app, !p.cfg.Capture.Sockhash())
		p.conns.close(c, sent, recv, err)
	})
}

// authorize admits a tunnel from remote only if the verified peer identity is the
// one the mesh gives the workload at that address: tunnels are dialled from inside
// the source pod, so the address names the workload.
func (p *Proxy) authorize(peer string, remote netip.AddrPort) error {
	p.mu.RLock()
	w, known := p.byIP[remote.Addr().Unmap()]
	p.mu.RUnlock()
	if !known {
		return fmt.Errorf("no mesh workload at %s (peer %s)", remote.Addr(), peer)
	}
	if w.Identity != peer {
		return fmt.Errorf("peer %s at %s: the workload there is %s", peer, remote.Addr(), w.Identity)
	}
	return nil
}

// recordTunnelStream enters an ended inbound tunnel stream in the connection table.
func (p *Proxy) recordTunnelStream(pd *pod, si tunnel.StreamInfo) {
	rec := Conn{
		Direction: admin.Inbound, Pod: pd.w.Name, Src: si.Remote, Dst: si.Target,
		SrcIdentity: si.PeerID, DstIdentity: pd.w.Identity, Security: admin.MTLS, PeerSerial: si.PeerSerial,
		Start: time.Now().Add(-si.Duration), Status: si.Status,
	}
	if si.HTTP {
		rec.Protocol = admin.HTTP1 // or HTTP/2: the requests' own records say which
	}
	c := p.conns.open(rec)
	if over, ok := asBudgetExceeded(si.Err); ok {
		p.conns.budgetRefused(c, over)
		return
	}
	if d, ok := asPolicyDenied(si.Err); ok {
		p.conns.policyRefused(c, d)
		return
	}
	if ce := (*CertExpiredError)(nil); errors.As(si.Err, &ce) {
		p.conns.refused(c, ce)
		return
	}
	p.conns.stream(c, si)
}

// dialApp connects to an app in pod pd from AppSource, inside the pod's netns.
func (p *Proxy) dialApp(ctx context.Context, pd *pod, target netip.AddrPort) (*net.TCPConn, error) {
	if !pd.has(target.Addr()) {
		return nil, fmt.Errorf("%s is not an address of pod %s", target.Addr(), pd.w.Name)
	}
	src := AppSource
	if target.Addr().Is6() && !target.Addr().Is4In6() {
		src = netip.IPv6Loopback()
	}
	return pd.net.Dial(ctx, src, target)
}

// podNet opens the proxy's sockets inside one pod's network namespace.
type podNet interface {
	Listen(addr netip.AddrPort) (net.Listener, error)
	// Dial connects to dst, from src when it is valid, with the agent's mark.
	Dial(ctx context.Context, src netip.Addr, dst netip.AddrPort) (*net.TCPConn, error)
}

// nsNet is podNet for a real namespace.
type nsNet struct {
	ns   Netns
	mark uint32
	// cookie is the namespace's, and ctx the proxy's: listeners a previous agent
	// handed over (listener.WithInherited) are taken instead of bound again.
	cookie uint64
	ctx    context.Context
}

// Dial connects to dst from inside the namespace, optionally from src, with the
// agent's mark so the capture programs leave the socket alone.
func (n nsNet) Dial(ctx context.Context, src netip.Addr, dst netip.AddrPort) (*net.TCPConn, error) {
	d := net.Dialer{
		Timeout: dialTimeout,
		Control: func(_, _ string, rc syscall.RawConn) error {
			var serr error
			err := rc.Control(func(fd uintptr) {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(n.mark))
				if serr == nil && src.IsValid() {
					// Bound to a source address, the socket would get its port at bind,
					// where ports in TIME_WAIT are never reused: our half-close leaves
					// every connection to the app in TIME_WAIT, and ~28k of them in a
					// minute exhaust the ephemeral range (bind: address already in use).
					// Choosing the port at connect lets the kernel reuse them.
					serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1)
				}
			})
			if err != nil {
				return err
			}
			if serr != nil {
				return fmt.Errorf("set SO_MARK: %w", serr)
			}
			return nil
		},
	}
	d.SetMultipathTCP(false)
	if src.IsValid() {
		d.LocalAddr = net.TCPAddrFromAddrPort(netip.AddrPortFrom(src, 0))
	}
	var conn net.Conn
	err := n.ns.Do(func() error {
		var err error
		conn, err = d.DialContext(ctx, "tcp", dst.String())
		return err
	})
	if err != nil {
		return nil, err
	}
	return conn.(*net.TCPConn), nil
}

// Listen opens a TCP listener on addr inside the namespace (internal/listener: MPTCP
// off, which sk_lookup steering and the sockhash need).
func (n nsNet) Listen(addr netip.AddrPort) (net.Listener, error) {
	return listener.InNetns(n.ctx, n.cookie, addr, func() (net.Listener, error) {
		lc := listener.Config()
		var ln net.Listener
		err := n.ns.Do(func() error {
			var err error
			ln, err = lc.Listen(context.Background(), "tcp", addr.String())
			return err
		})
		return ln, err
	})
}
