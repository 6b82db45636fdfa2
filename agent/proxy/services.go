package proxy

import (
	"net/netip"
	"sync/atomic"
)

// Service is a Kubernetes Service as the proxy balances it: the cluster IPs clients
// dial and the pods behind them.
type Service struct {
	Name     string // namespace/name
	VIPs     []netip.Addr
	Ports    []uint16 // the Service's ports, in order
	Backends []Backend
}

// Backend is one pod behind a Service.
type Backend struct {
	IPs   []netip.Addr
	Ready bool
	// Ports holds the pod's port for each of the Service's ports; 0 where the pod
	// does not serve it (a named target port it lacks).
	Ports []uint16
}

// vipPort is one (cluster IP, port) of a Service and the ready endpoints behind it.
type vipPort struct {
	service   string
	endpoints []netip.AddrPort
	next      atomic.Uint64 // round robin over endpoints, per connection
}

// pick chooses the endpoint for a new connection; false when there is none.
func (v *vipPort) pick() (netip.AddrPort, bool) {
	if len(v.endpoints) == 0 {
		return netip.AddrPort{}, false
	}
	return v.endpoints[(v.next.Add(1)-1)%uint64(len(v.endpoints))], true
}

// serviceTable maps what clients dial to Services: every cluster IP (so a port the
// Service lacks is refused, not sent to the cluster IP in plaintext) and every
// (cluster IP, port).
type serviceTable struct {
	vips  map[netip.Addr]string
	ports map[netip.AddrPort]*vipPort
}

// buildServices indexes svcs. An endpoint is reached at its address of the cluster
// IP's family, so an IPv6 cluster IP balances over the pods' IPv6 addresses.
func buildServices(svcs []Service) serviceTable {
	t := serviceTable{vips: map[netip.Addr]string{}, ports: map[netip.AddrPort]*vipPort{}}
	for _, s := range svcs {
		for _, vip := range s.VIPs {
			vip = vip.Unmap()
			t.vips[vip] = s.Name
			for i, port := range s.Ports {
				v := &vipPort{service: s.Name}
				for _, b := range s.Backends {
					if !b.Ready || i >= len(b.Ports) || b.Ports[i] == 0 {
						continue
					}
					for _, ip := range b.IPs {
						if ip.Unmap().Is4() == vip.Is4() {
							v.endpoints = append(v.endpoints, netip.AddrPortFrom(ip.Unmap(), b.Ports[i]))
							break
						}
					}
				}
				t.ports[netip.AddrPortFrom(vip, port)] = v
			}
		}
	}
	return t
}

// resolve says whether dst is a Service address and, if so, which endpoint a new
// connection to it goes to (ok false: no ready endpoint, refuse it).
func (t serviceTable) resolve(dst netip.AddrPort) (endpoint netip.AddrPort, service string, isService, ok bool) {
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	name, isVIP := t.vips[dst.Addr()]
	if !isVIP {
		return netip.AddrPort{}, "", false, false
	}
	v := t.ports[dst]
	if v == nil {
		return netip.AddrPort{}, name, true, false
	}
	ep, ok := v.pick()
	return ep, name, true, ok
}

// SetServices replaces the Services the proxy balances connections to.
func (p *Proxy) SetServices(svcs []Service) {
	t := buildServices(svcs)
	p.mu.Lock()
	p.services = t
	p.mu.Unlock()
}
