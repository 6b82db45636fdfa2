// Package proxy is the node's L4 proxy: for every enrolled pod on the node it owns
// three listeners inside the pod's network namespace (outbound capture, inbound
// plaintext capture, mTLS tunnel) and carries each captured connection to where it
// was going: through the tunnel to a pod on another node, straight to a pod on this
// node, or unchanged to a destination outside the mesh.
package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"time"

	"github.com/ferrymesh/ferry/agent/datapath"
	"github.com/ferrymesh/ferry/agent/identity"
	"github.com/ferrymesh/ferry/agent/netns"
	"github.com/ferrymesh/ferry/agent/tunnel"
	"github.com/ferrymesh/ferry/api/admin"
	"golang.org/x/sys/unix"
)

// The mesh's ports inside every enrolled pod's network namespace.
const (
	OutboundPort = 15001
	InboundPort  = 15006
	TunnelPort   = 15008
)

// AppSource is the address the agent connects to a pod's app from, so the pod's
// inbound capture (and anything watching) can tell the agent's own hop apart.
var AppSource = netip.MustParseAddr("127.0.0.6")

const dialTimeout = 5 * time.Second

// Workload is an enrolled pod anywhere in the mesh.
type Workload struct {
	UID      string
	Name     string // namespace/name
	Identity string // SPIFFE ID
	Node     string
	IPs      []netip.Addr
}

// Datapath is what the proxy needs from the kernel side.
type Datapath interface {
	OrigDst(netnsCookie uint64, clientPort uint16) (netip.AddrPort, error)
	SetInboundListener(podIP netip.Addr, ln syscall.Conn) error
}

// Config configures a Proxy.
type Config struct {
	Node     string
	Mark     uint32 // SO_MARK on the agent's sockets, so capture skips them
	FastPath bool   // sockets may be in the sockhash: never splice
	// IPTables says capture is by nat REDIRECT rules (--capture=iptables), not eBPF:
	// original destinations come from SO_ORIGINAL_DST and the inbound listener
	// takes the pod IP, where PREROUTING redirects to.
	IPTables bool
	Datapath Datapath
	// Identities holds the trust bundle and the local pods' certificates.
	Identities *identity.Store
	Log        *slog.Logger
	// Observer, optional, is told of every connection (flows and metrics).
	Observer ConnObserver
}

// Proxy serves the enrolled pods of one node.
type Proxy struct {
	cfg   Config
	log   *slog.Logger
	conns *tracker

	mu    sync.RWMutex
	byIP  map[netip.Addr]Workload // every mesh workload, by IP
	pods  map[string]*pod         // local enrolled pods, by UID
	local map[netip.Addr]*pod     // local enrolled pods, by IP

	pool *tunnel.Pool // tunnels to pods on other nodes

	// draining holds the tunnel servers of removed pods until their streams end.
	draining map[*tunnel.Server]struct{}

	wg sync.WaitGroup
}

// pod is one enrolled pod on this node and the listeners the proxy holds in it.
type pod struct {
	w         Workload
	ns        *netns.Handle
	cookie    uint64
	listeners []net.Listener
	tunnel    *tunnel.Server
	ctx       context.Context
	cancel    context.CancelFunc
}

// New validates cfg and returns a proxy with no pods.
func New(cfg Config) (*Proxy, error) {
	if cfg.Datapath == nil || cfg.Identities == nil || cfg.Log == nil {
		return nil, errors.New("proxy config: datapath, identities and logger are required")
	}
	p := &Proxy{
		cfg:   cfg,
		log:   cfg.Log,
		conns: newTracker(1024),
		byIP:  map[netip.Addr]Workload{},
		pods:  map[string]*pod{},
		local: map[netip.Addr]*pod{},

		draining: map[*tunnel.Server]struct{}{},
	}
	p.conns.obs, p.conns.resolve = cfg.Observer, p.workloadAt
	var err error
	p.pool, err = tunnel.NewPool(tunnel.PoolConfig{
		// Tunnels are pooled per source pod: the pool's source key is the pod's UID,
		// and each tunnel is dialled from inside that pod.
		Dial: func(ctx context.Context, uid string, addr netip.AddrPort) (net.Conn, error) {
			pd := p.pod(uid)
			if pd == nil {
				return nil, fmt.Errorf("pod %s is no longer enrolled", uid)
			}
			return p.dial(ctx, pd.ns, netip.Addr{}, addr)
		},
		TLS: func(uid, dstID string) *tls.Config {
			var id string
			if pd := p.pod(uid); pd != nil {
				id = pd.w.Identity
			}
			return cfg.Identities.ClientConfig(id, dstID)
		},
		Logger: cfg.Log,
	})
	if err != nil {
		return nil, err
	}
	return p, nil
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
func (p *Proxy) AddPod(w Workload, ns *netns.Handle, cookie uint64) error {
	if len(w.IPs) == 0 {
		return fmt.Errorf("pod %s: no IP", w.Name)
	}
	ip := w.IPs[0]
	pd := &pod{w: w, ns: ns, cookie: cookie}
	pd.ctx, pd.cancel = context.WithCancel(context.Background())

	out, err := listen(ns, "127.0.0.1", OutboundPort)
	if err != nil {
		pd.cancel()
		return fmt.Errorf("pod %s outbound listener: %w", w.Name, err)
	}
	outs := []net.Listener{out}
	if out6, err := listen(ns, "::1", OutboundPort); err == nil {
		outs = append(outs, out6)
	} // else no IPv6 loopback in this pod: no IPv6 destination to capture either
	pd.listeners = append(pd.listeners, outs...)
	inHost := "127.0.0.1"
	if p.cfg.IPTables {
		inHost = ip.String()
	}
	in, err := listen(ns, inHost, InboundPort)
	if err != nil {
		pd.close()
		return fmt.Errorf("pod %s inbound listener: %w", w.Name, err)
	}
	pd.listeners = append(pd.listeners, in)
	tun, err := listen(ns, ip.String(), TunnelPort)
	if err != nil {
		pd.close()
		return fmt.Errorf("pod %s tunnel listener: %w", w.Name, err)
	}
	pd.listeners = append(pd.listeners, tun)
	if !p.cfg.IPTables {
		if err := p.cfg.Datapath.SetInboundListener(ip, in.(*net.TCPListener)); err != nil {
			pd.close()
			return fmt.Errorf("pod %s inbound capture: %w", w.Name, err)
		}
	}
	pd.tunnel, err = tunnel.NewServer(tunnel.ServerConfig{
		TLS: func(net.Addr) (*tls.Config, error) {
			return p.cfg.Identities.ServerConfig(w.Identity, nil), nil
		},
		Authorize: p.authorize,
		Dial: func(ctx context.Context, target netip.AddrPort) (net.Conn, error) {
			return p.dialApp(ctx, pd, target)
		},
		Logger:   p.log.With("pod", w.Name),
		OnStream: func(si tunnel.StreamInfo) { p.recordTunnelStream(pd, si) },
	})
	if err != nil {
		pd.close()
		return fmt.Errorf("pod %s tunnel: %w", w.Name, err)
	}

	p.mu.Lock()
	if old := p.pods[w.UID]; old != nil {
		old.close()
	}
	p.pods[w.UID] = pd
	for _, ip := range w.IPs {
		p.local[ip] = pd
	}
	p.mu.Unlock()

	for _, ln := range outs {
		p.goServe(func() { p.serveOutbound(pd, ln) })
	}
	p.goServe(func() { p.serveInbound(pd, in) })
	p.goServe(func() {
		err := pd.tunnel.Serve(tun)
		if err != nil && pd.ctx.Err() == nil && !errors.Is(err, tunnel.ErrServerClosed) {
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
		if ts := pd.tunnel; ts != nil {
			// GOAWAY: peers stop opening streams on tunnels into a pod that left
			// (they could no longer reach its apps), while streams in progress carry on.
			p.mu.Lock()
			p.draining[ts] = struct{}{}
			p.mu.Unlock()
			go func() {
				_ = ts.Shutdown(context.Background())
				p.mu.Lock()
				delete(p.draining, ts)
				p.mu.Unlock()
			}()
		}
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

// Stop closes every pod's listeners and waits for every proxied connection to end.
func (p *Proxy) Stop() {
	p.mu.Lock()
	pods := p.pods
	p.pods = map[string]*pod{}
	p.local = map[netip.Addr]*pod{}
	p.mu.Unlock()
	for _, pd := range pods {
		pd.close()
	}
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
}

// TunnelStats counts the tunnel connections and streams this node has open to others.
func (p *Proxy) TunnelStats() tunnel.PoolStats { return p.pool.Stats() }

// Connections returns the live proxied connections and the most recent ended ones.
func (p *Proxy) Connections() (live, ended []Conn) { return p.conns.snapshot() }

func (p *Proxy) pod(uid string) *pod {
	p.mu.RLock()
	defer p.mu.RUnlock()
	return p.pods[uid]
}

// close stops the pod's listeners; streams in progress carry on to their end.
func (pd *pod) close() {
	pd.cancel()
	for _, ln := range pd.listeners {
		ln.Close()
	}
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
		p.goServe(func() { handle(c.(*net.TCPConn)) })
	}
}

// serveOutbound handles connections the pod's apps made, captured by connect4/6.
func (p *Proxy) serveOutbound(pd *pod, ln net.Listener) {
	p.acceptLoop(pd, ln, func(client *net.TCPConn) {
		peer := client.RemoteAddr().(*net.TCPAddr).AddrPort()
		dst, err := p.outboundOrigDst(pd, client, peer.Port())
		if err != nil {
			p.log.Warn("outbound without original destination", "pod", pd.w.Name, "port", peer.Port(), "error", err)
			abort(client)
			return
		}
		src := netip.AddrPortFrom(pd.w.IPs[0], peer.Port())
		p.mu.RLock()
		dw, inMesh := p.byIP[dst.Addr().Unmap()]
		lp := p.local[dst.Addr().Unmap()]
		p.mu.RUnlock()

		rec := Conn{Direction: admin.Outbound, Pod: pd.w.Name, Src: src, Dst: dst, SrcIdentity: pd.w.Identity}
		var upstream halfCloser
		switch {
		case lp != nil:
			rec.Security, rec.DstIdentity = admin.SameNode, lp.w.Identity
			upstream, err = p.dialApp(pd.ctx, lp, dst)
		case inMesh:
			rec.Security, rec.DstIdentity = admin.MTLS, dw.Identity
			ctx, cancel := context.WithTimeout(pd.ctx, dialTimeout)
			upstream, err = p.pool.Connect(ctx, pd.w.UID, dw.Identity, netip.AddrPortFrom(dst.Addr().Unmap(), TunnelPort), dst)
			cancel()
		default:
			rec.Security = admin.Plaintext
			upstream, err = p.dial(pd.ctx, pd.ns, netip.Addr{}, dst)
		}
		c := p.conns.open(rec)
		if err != nil {
			// The app's connect already succeeded (to the capture listener), so a
			// reset is how it learns the destination refused.
			abort(client)
			p.conns.refused(c, err)
			p.log.Debug("outbound refused", "pod", pd.w.Name, "dst", dst, "error", err)
			return
		}
		sent, recv, err := pipe(client, upstream, p.splice(upstream))
		p.conns.close(c, sent, recv, err)
	})
}

// serveInbound handles plaintext connections to the pod's ports steered by sk_lookup
// (permissive mode): the accepted socket's local address is the original one.
func (p *Proxy) serveInbound(pd *pod, ln net.Listener) {
	p.acceptLoop(pd, ln, func(client *net.TCPConn) {
		src := client.RemoteAddr().(*net.TCPAddr).AddrPort()
		dst := client.LocalAddr().(*net.TCPAddr).AddrPort()
		if p.cfg.IPTables {
			var err error
			if dst, err = datapath.SocketOrigDst(client); err != nil {
				p.log.Warn("inbound without original destination", "pod", pd.w.Name, "error", err)
				abort(client)
				return
			}
		}
		rec := Conn{Direction: admin.Inbound, Pod: pd.w.Name, Src: src, Dst: dst, DstIdentity: pd.w.Identity, Security: admin.Plaintext}
		c := p.conns.open(rec)
		app, err := p.dialApp(pd.ctx, pd, dst)
		if err != nil {
			abort(client)
			p.conns.refused(c, err)
			return
		}
		sent, recv, err := pipe(client, app, p.splice(app))
		p.conns.close(c, sent, recv, err)
	})
}

// outboundOrigDst is where a captured outbound connection was going: from the eBPF
// map by (netns cookie, client port), or from the socket under iptables capture.
func (p *Proxy) outboundOrigDst(pd *pod, client *net.TCPConn, clientPort uint16) (netip.AddrPort, error) {
	if p.cfg.IPTables {
		return datapath.SocketOrigDst(client)
	}
	return p.cfg.Datapath.OrigDst(pd.cookie, clientPort)
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
	c := p.conns.open(Conn{
		Direction: admin.Inbound, Pod: pd.w.Name, Src: si.Remote, Dst: si.Target,
		SrcIdentity: si.PeerID, DstIdentity: pd.w.Identity, Security: admin.MTLS,
	})
	c.Start = time.Now().Add(-si.Duration)
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
	return p.dial(ctx, pd.ns, src, target)
}

func (pd *pod) has(ip netip.Addr) bool {
	for _, a := range pd.w.IPs {
		if a == ip.Unmap() {
			return true
		}
	}
	return false
}

// splice reports whether copies to and from upstream may use splice(2).
func (p *Proxy) splice(upstream halfCloser) bool {
	_, tcp := upstream.(*net.TCPConn)
	return tcp && !p.cfg.FastPath
}

// dial connects to dst from inside ns, optionally from src, with the agent's mark
// so the capture programs leave the socket alone.
func (p *Proxy) dial(ctx context.Context, ns *netns.Handle, src netip.Addr, dst netip.AddrPort) (*net.TCPConn, error) {
	d := net.Dialer{
		Timeout: dialTimeout,
		Control: func(_, _ string, rc syscall.RawConn) error {
			var serr error
			err := rc.Control(func(fd uintptr) {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(p.cfg.Mark))
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
	err := ns.Do(func() error {
		var err error
		conn, err = d.DialContext(ctx, "tcp", dst.String())
		return err
	})
	if err != nil {
		return nil, err
	}
	return conn.(*net.TCPConn), nil
}

// listen opens a TCP listener on host:port inside ns, without MPTCP: an MPTCP socket
// cannot enter a sockmap, so sk_lookup steering and the fast path would silently fail.
func listen(ns *netns.Handle, host string, port int) (net.Listener, error) {
	lc := net.ListenConfig{}
	lc.SetMultipathTCP(false)
	var ln net.Listener
	err := ns.Do(func() error {
		var err error
		ln, err = lc.Listen(context.Background(), "tcp", net.JoinHostPort(host, fmt.Sprint(port)))
		return err
	})
	return ln, err
}
