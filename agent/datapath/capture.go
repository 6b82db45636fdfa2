// The two capture modes as the agent and the proxy use them: the eBPF data path
// itself, and iptables REDIRECT rules (which keep the eBPF data path loaded but enroll
// nothing in it). The agent picks one at construction; nothing else branches on the
// mode.

package datapath

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"

	"github.com/ferrymesh/ferry/agent/netns"
	"github.com/ferrymesh/ferry/bpf"
)

// ErrStrictNeedsEBPF means a pod on this node is STRICT under iptables capture,
// where no sk_lookup program runs to refuse its plaintext.
var ErrStrictNeedsEBPF = errors.New("STRICT mTLS is enforced by the eBPF capture only (ferry-agent --capture=ebpf)")

// Capture modes of the agent (ferry-agent --capture).
const (
	CaptureEBPF     = "ebpf"
	CaptureIPTables = "iptables"
)

// Release stops capturing a pod that left: see Unenroll.
func (d *Datapath) Release(_ *netns.Handle, cookie uint64) error { return d.Unenroll(cookie) }

// Leave is called for each enrolled pod when the agent stops: eBPF capture stays
// pinned, so it keeps working for the next agent, which adopts it.
func (d *Datapath) Leave(*netns.Handle, uint64) error { return nil }

// Prune unenrolls every namespace a previous run enrolled whose cookie is not in keep.
func (d *Datapath) Prune(keep map[uint64]bool) error {
	pinned, err := d.Enrolled()
	if err != nil {
		return err
	}
	var errs []error
	for cookie, pod := range pinned {
		if !keep[cookie] {
			d.log.Info("removing stale enrollment", "pod", pod, "netns_cookie", cookie)
			errs = append(errs, d.Unenroll(cookie))
		}
	}
	return errors.Join(errs...)
}

// InboundAddr is where a pod's inbound capture listener binds: loopback, since
// sk_lookup assigns sockets whatever their bound address, and loopback keeps the
// listener unreachable from outside.
func (d *Datapath) InboundAddr(netip.Addr) netip.Addr { return netip.AddrFrom4([4]byte{127, 0, 0, 1}) }

// OutboundDst returns, and forgets, where an outbound connection accepted from the
// pod with this netns cookie was going, by its client port (see OrigDst).
func (d *Datapath) OutboundDst(netnsCookie uint64, c *net.TCPConn) (netip.AddrPort, error) {
	return d.OrigDst(netnsCookie, uint16(c.RemoteAddr().(*net.TCPAddr).Port))
}

// InboundDst is where an inbound connection steered by sk_lookup was going: the
// accepted socket's local address.
func (d *Datapath) InboundDst(c *net.TCPConn) (netip.AddrPort, error) {
	return c.LocalAddr().(*net.TCPAddr).AddrPort(), nil
}

// Sockhash reports whether captured sockets may be in Ferry's sockhash (the fast
// path), where splice(2) must not be used.
func (d *Datapath) Sockhash() bool { return d.cfg.FastPath }

// IPTables captures pods with nat REDIRECT rules in each pod's namespace. The eBPF
// data path stays loaded (so the pins and tools work the same) with nothing enrolled.
type IPTables struct {
	dp    *Datapath
	rules IPTablesCapture
}

// NewIPTables returns the iptables capture beside dp, with dp's mark and mesh ports.
func NewIPTables(dp *Datapath) *IPTables {
	return &IPTables{dp: dp, rules: IPTablesCapture{Mark: dp.cfg.Mark, Ports: dp.cfg.Ports}}
}

// Start loads the eBPF data path (see Datapath.Start).
func (c *IPTables) Start(ctx context.Context) error { return c.dp.Start(ctx) }

// Stop releases the eBPF data path (see Datapath.Stop).
func (c *IPTables) Stop(ctx context.Context) error { return c.dp.Stop(ctx) }

// Lock takes the pin folder's lock (see Datapath.Lock).
func (c *IPTables) Lock() error { return c.dp.Lock() }

// Unlock releases it (see Datapath.Unlock).
func (c *IPTables) Unlock() error { return c.dp.Unlock() }

// Enroll installs the REDIRECT rules in the pod's namespace and returns its cookie,
// and whether the rules were there already (a killed agent's).
func (c *IPTables) Enroll(h *netns.Handle, _ string) (uint64, bool, error) {
	cookie, err := h.Cookie()
	if err != nil {
		return 0, false, err
	}
	adopted := c.rules.Installed(h)
	return cookie, adopted, c.rules.Install(h)
}

// Release removes the pod's rules.
func (c *IPTables) Release(h *netns.Handle, _ uint64) error { return c.rules.Remove(h) }

// Leave removes the pod's rules: iptables capture ends with the agent.
func (c *IPTables) Leave(h *netns.Handle, _ uint64) error { return c.rules.Remove(h) }

// Prune unenrolls every eBPF enrollment a previous run left: under iptables capture
// no pod keeps one.
func (c *IPTables) Prune(map[uint64]bool) error { return c.dp.Prune(nil) }

// InboundAddr is the pod IP, where PREROUTING redirects to.
func (c *IPTables) InboundAddr(podIP netip.Addr) netip.Addr { return podIP }

// SetInboundListener has nothing to do: the rules, not a map, steer inbound traffic.
func (c *IPTables) SetInboundListener(netip.Addr, syscall.Conn) error { return nil }

// OutboundDst is the connection's destination before the REDIRECT.
func (c *IPTables) OutboundDst(_ uint64, conn *net.TCPConn) (netip.AddrPort, error) {
	return SocketOrigDst(conn)
}

// InboundDst is the connection's destination before the REDIRECT.
func (c *IPTables) InboundDst(conn *net.TCPConn) (netip.AddrPort, error) { return SocketOrigDst(conn) }

// SetStrictPorts refuses a STRICT entry: nothing under iptables capture would
// enforce it, and a pod must not look STRICT while it takes plaintext. Without one
// it clears the map, so a previous eBPF run's entries do not linger.
func (c *IPTables) SetStrictPorts(ps []bpf.StrictPort) error {
	for _, p := range ps {
		if p.Mode == bpf.MTLSStrict {
			return fmt.Errorf("pod address %s: %w", p.IP, ErrStrictNeedsEBPF)
		}
	}
	return c.dp.SetStrictPorts(nil)
}

// Sockhash is false: iptables-captured pods are not enrolled in eBPF, so their
// sockets never enter the sockhash and splice stays safe for them.
func (c *IPTables) Sockhash() bool { return false }
