// This file builds and removes the lab's network: named namespaces, bridges, veths,
// addresses and routes. Every link is created from inside a lab namespace (netlink
// handles bound to it), so the root namespace never sees a lab interface, address or
// route.

package lab

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"

	"github.com/ferrymesh/ferry/agent/netns"
	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// NetnsDir is where named network namespaces live, as iproute2 expects.
const NetnsDir = "/var/run/netns"

func netnsPath(name string) string { return filepath.Join(NetnsDir, name) }

// createNetns creates the named network namespace name with its loopback up.
func createNetns(name string) error {
	errc := make(chan error, 1)
	go func() {
		// NewNamed moves this thread into the new namespace; it is never unlocked,
		// so the runtime discards the thread when the goroutine ends.
		runtime.LockOSThread()
		ns, err := vnetns.NewNamed(name)
		if err != nil {
			errc <- err
			return
		}
		defer ns.Close()
		errc <- linkUpAt(ns, "lo")
	}()
	if err := <-errc; err != nil {
		return fmt.Errorf("create netns %s: %w", name, err)
	}
	return nil
}

func linkUpAt(ns vnetns.NsHandle, name string) error {
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return err
	}
	defer h.Close()
	link, err := h.LinkByName(name)
	if err != nil {
		return err
	}
	return h.LinkSetUp(link)
}

// deleteNetns removes the named namespace; it is gone once no process holds it.
func deleteNetns(name string) error {
	p := netnsPath(name)
	if err := unix.Unmount(p, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmount netns %s: %w", name, err)
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove netns %s: %w", name, err)
	}
	return nil
}

// listNetns returns the named namespaces that belong to the lab with this prefix.
func listNetns(prefix string) []string {
	entries, err := os.ReadDir(NetnsDir)
	if err != nil {
		return nil
	}
	var out []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), prefix+"-") {
			out = append(out, e.Name())
		}
	}
	return out
}

// nsConn is a netlink handle bound to one named namespace.
type nsConn struct {
	name string
	ns   vnetns.NsHandle
	nl   *netlink.Handle
}

func openNS(name string) (*nsConn, error) {
	ns, err := vnetns.GetFromPath(netnsPath(name))
	if err != nil {
		return nil, fmt.Errorf("open netns %s: %w", name, err)
	}
	nl, err := netlink.NewHandleAt(ns)
	if err != nil {
		ns.Close()
		return nil, fmt.Errorf("netlink in %s: %w", name, err)
	}
	return &nsConn{name: name, ns: ns, nl: nl}, nil
}

func (c *nsConn) Close() {
	c.nl.Close()
	c.ns.Close()
}

// addBridge creates an up bridge named name, with addr on it when addr is valid.
func (c *nsConn) addBridge(name string, addr netip.Prefix) error {
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: name}}
	if err := c.nl.LinkAdd(br); err != nil {
		return fmt.Errorf("add bridge %s in %s: %w", name, c.name, err)
	}
	if addr.IsValid() {
		if err := c.addAddr(name, addr); err != nil {
			return err
		}
	}
	if err := c.nl.LinkSetUp(br); err != nil {
		return fmt.Errorf("set %s up in %s: %w", name, c.name, err)
	}
	return nil
}

// addVeth creates a veth pair: local (enslaved to bridge, up) here and remote in peer.
func (c *nsConn) addVeth(local, bridge string, peer *nsConn, remote string) error {
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: local},
		PeerName:      remote,
		PeerNamespace: netlink.NsFd(int(peer.ns)),
	}
	if err := c.nl.LinkAdd(veth); err != nil {
		return fmt.Errorf("add veth %s in %s to %s: %w", local, c.name, peer.name, err)
	}
	link, err := c.nl.LinkByName(local)
	if err != nil {
		return fmt.Errorf("find %s in %s: %w", local, c.name, err)
	}
	br, err := c.nl.LinkByName(bridge)
	if err != nil {
		return fmt.Errorf("find %s in %s: %w", bridge, c.name, err)
	}
	if err := c.nl.LinkSetMaster(link, br); err != nil {
		return fmt.Errorf("attach %s to %s in %s: %w", local, bridge, c.name, err)
	}
	if err := c.nl.LinkSetUp(link); err != nil {
		return fmt.Errorf("set %s up in %s: %w", local, c.name, err)
	}
	return nil
}

func (c *nsConn) addAddr(link string, addr netip.Prefix) error {
	l, err := c.nl.LinkByName(link)
	if err != nil {
		return fmt.Errorf("find %s in %s: %w", link, c.name, err)
	}
	a := &netlink.Addr{IPNet: &net.IPNet{IP: addr.Addr().AsSlice(), Mask: net.CIDRMask(addr.Bits(), 32)}}
	if err := c.nl.AddrAdd(l, a); err != nil {
		return fmt.Errorf("add %s to %s in %s: %w", addr, link, c.name, err)
	}
	return nil
}

func (c *nsConn) up(link string) error {
	l, err := c.nl.LinkByName(link)
	if err != nil {
		return fmt.Errorf("find %s in %s: %w", link, c.name, err)
	}
	if err := c.nl.LinkSetUp(l); err != nil {
		return fmt.Errorf("set %s up in %s: %w", link, c.name, err)
	}
	return nil
}

// addRoute routes dst via gw; an invalid dst means the default route.
func (c *nsConn) addRoute(dst netip.Prefix, gw netip.Addr) error {
	r := &netlink.Route{Gw: gw.AsSlice()}
	if dst.IsValid() {
		r.Dst = &net.IPNet{IP: dst.Addr().AsSlice(), Mask: net.CIDRMask(dst.Bits(), 32)}
	}
	if err := c.nl.RouteAdd(r); err != nil {
		return fmt.Errorf("route %v via %s in %s: %w", dst, gw, c.name, err)
	}
	return nil
}

// sysctl writes a per-namespace sysctl such as net/ipv4/ip_forward: /proc/sys/net
// shows the namespace of the thread that opens it.
func sysctl(nsName, key, value string) error {
	h, err := netns.Open(netnsPath(nsName))
	if err != nil {
		return err
	}
	defer h.Close()
	err = h.Do(func() error {
		return os.WriteFile(filepath.Join("/proc/sys", key), []byte(value), 0o644)
	})
	if err != nil {
		return fmt.Errorf("sysctl %s in %s: %w", key, nsName, err)
	}
	return nil
}
