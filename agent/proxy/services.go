package proxy

import (
	"net/netip"
	"strings"
	"sync/atomic"

	"github.com/ferrymesh/ferry/api/admin"
)

// Service is a Kubernetes Service as the proxy balances it: the cluster IPs clients
// dial and the pods behind them.
type Service struct {
	Name     string // namespace/name
	VIPs     []netip.Addr
	Ports    []ServicePort // the Service's ports, in order
	Backends []Backend
	// LoadBalancer picks each request's endpoint at L7; "" is P2CEWMA.
	LoadBalancer LoadBalancer
	// Routes are the Service's compiled HTTPRoutes and GRPCRoutes (routes.go).
	Routes []RouteTable
	// Policy is what its TrafficPolicy enforces (policy.go).
	Policy Policy
}

// ServicePort is one port of a Service and what it says of its protocol.
type ServicePort struct {
	Port uint16
	// Name and AppProtocol are the Service port's; they declare its protocol
	// (declaredProtocol), or leave it to detection.
	Name        string
	AppProtocol string
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
	service string
	// protocol is what the port declares; "" means detect it from the client's bytes.
	protocol  admin.Protocol
	endpoints []*endpoint
	balancer  balancer      // per request, at L7
	next      atomic.Uint64 // round robin over endpoints, per connection at L4
	// routes holds the port's route tables by client namespace, "" the producer
	// routes; nil when no route attaches to the port.
	routes map[string]*RouteTable
	// policy is the Service's TrafficPolicy and what enforcing it counts across
	// the node (resilience.go).
	policy *serviceState
}

// reachable reports whether a connection to the port may be carried: it has a
// ready endpoint, or routes that may send its requests to other Services (a GAMMA
// frontend often selects no pod of its own).
func (v *vipPort) reachable() bool {
	return len(v.endpoints) > 0 || (v.routes != nil && v.protocol != admin.TCP)
}

// table is the route table a client in namespace ns sees: its namespace's consumer
// routes, else the producer routes (GAMMA); nil when neither exists and requests
// go to the Service's own endpoints.
func (v *vipPort) table(ns string) *RouteTable {
	if t, ok := v.routes[ns]; ok {
		return t
	}
	return v.routes[""]
}

// pick chooses the endpoint for a new connection; false when there is none.
func (v *vipPort) pick() (netip.AddrPort, bool) {
	if len(v.endpoints) == 0 {
		return netip.AddrPort{}, false
	}
	return v.endpoints[(v.next.Add(1)-1)%uint64(len(v.endpoints))].addr, true
}

// serviceTable maps what clients dial to Services: every cluster IP (so a port the
// Service lacks is refused, not sent to the cluster IP in plaintext) and every
// (cluster IP, port); and every Service port by name, where a route rule sends
// requests.
type serviceTable struct {
	vips   map[netip.Addr]string
	ports  map[netip.AddrPort]*vipPort
	byName map[servicePort]*vipPort
	// endpoints holds each endpoint's load and latency estimate, kept from one
	// table to the next so that a new state does not forget what was measured.
	endpoints map[netip.AddrPort]*endpoint
	// states holds each Service's policy state by name, and buckets the rate limit
	// of each pod a policy limits (by podKey); both kept from one table to the next
	// as the estimates are.
	states  map[string]*serviceState
	buckets map[netip.Addr]*tokenBucket
}

// servicePort names a Service port in one IP family: a route's backend is reached
// in the family of the cluster IP the client dialled.
type servicePort struct {
	service string
	port    uint16
	is4     bool
}

// buildServices indexes svcs, reusing the endpoint estimates and policy state of
// prev (nil: none). An endpoint is reached at its address of the cluster IP's
// family, so an IPv6 cluster IP balances over the pods' IPv6 addresses. Each
// Service port has one vipPort per family, shared by its cluster IPs of that
// family and found by name too, so that a headless Service can still be a route's
// backend. The Services' route tables are used as they are: svcs must not change
// afterwards.
func buildServices(svcs []Service, prev *serviceTable) serviceTable {
	if prev == nil {
		prev = &serviceTable{}
	}
	t := serviceTable{vips: map[netip.Addr]string{}, ports: map[netip.AddrPort]*vipPort{}, byName: map[servicePort]*vipPort{},
		endpoints: map[netip.AddrPort]*endpoint{}, states: map[string]*serviceState{}, buckets: map[netip.Addr]*tokenBucket{}}
	endpointAt := func(a netip.AddrPort) *endpoint {
		if e := t.endpoints[a]; e != nil {
			return e
		}
		e := prev.endpoints[a]
		if e == nil {
			e = &endpoint{addr: a}
		}
		t.endpoints[a] = e
		return e
	}
	for _, s := range svcs {
		st := prev.states[s.Name]
		if st == nil {
			st = newServiceState(s.Name)
		}
		pol := s.Policy
		st.policy.Store(&pol)
		t.states[s.Name] = st
		if rl := s.Policy.RateLimit; rl != nil {
			for _, b := range s.Backends {
				if len(b.IPs) == 0 {
					continue
				}
				// One bucket per pod (under each of its IPs), the strictest limit of
				// the Services that reach it, kept while that limit stays the same.
				if cur := t.buckets[b.IPs[0].Unmap()]; cur != nil && cur.limit.PerSecond <= rl.PerSecond {
					continue
				}
				bucket := newTokenBucket(*rl)
				if old := prev.buckets[b.IPs[0].Unmap()]; old != nil && old.limit == bucket.limit {
					bucket = old
				}
				for _, ip := range b.IPs {
					t.buckets[ip.Unmap()] = bucket
				}
			}
		}
		var all []*endpoint // of every port and family, for the share ejected
		seen := map[*endpoint]bool{}
		for i, port := range s.Ports {
			var routes map[string]*RouteTable
			for k := range s.Routes {
				if rt := &s.Routes[k]; rt.Port == port.Port {
					if routes == nil {
						routes = map[string]*RouteTable{}
					}
					routes[rt.ClientNamespace] = rt
				}
			}
			for _, is4 := range []bool{true, false} {
				v := &vipPort{service: s.Name, protocol: declaredProtocol(port.AppProtocol, port.Name), routes: routes, policy: st}
				for _, b := range s.Backends {
					if !b.Ready || i >= len(b.Ports) || b.Ports[i] == 0 {
						continue
					}
					for _, ip := range b.IPs {
						if ip.Unmap().Is4() == is4 {
							v.endpoints = append(v.endpoints, endpointAt(netip.AddrPortFrom(ip.Unmap(), b.Ports[i])))
							break
						}
					}
				}
				for _, e := range v.endpoints {
					if !seen[e] {
						seen[e] = true
						all = append(all, e)
					}
				}
				v.balancer = newBalancer(s.LoadBalancer, v.endpoints)
				t.byName[servicePort{s.Name, port.Port, is4}] = v
				for _, vip := range s.VIPs {
					if vip = vip.Unmap(); vip.Is4() == is4 {
						t.ports[netip.AddrPortFrom(vip, port.Port)] = v
					}
				}
			}
		}
		st.endpoints.Store(&all)
		for _, vip := range s.VIPs {
			t.vips[vip.Unmap()] = s.Name
		}
	}
	return t
}

// backend finds the Service port a route rule names, in the family of the cluster
// IP the client dialled; nil when the state has no such port.
func (t serviceTable) backend(b WeightedBackend, is4 bool) *vipPort {
	return t.byName[servicePort{b.Service, b.Port, is4}]
}

// lookup finds the Service port dst names: isService when dst is a cluster IP, and
// v nil when the Service has no such port.
func (t serviceTable) lookup(dst netip.AddrPort) (v *vipPort, service string, isService bool) {
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	name, isVIP := t.vips[dst.Addr()]
	if !isVIP {
		return nil, "", false
	}
	return t.ports[dst], name, true
}

// declaredProtocol is what a Service port says it speaks, from its appProtocol or,
// without one, its name's prefix (Istio's convention); "" leaves it to detection.
// Any other declared protocol (https, mysql, kubernetes.io/wss...) is opaque TCP:
// the proxy must not look into it.
func declaredProtocol(appProtocol, name string) admin.Protocol {
	switch strings.ToLower(appProtocol) {
	case "":
	case "http", "kubernetes.io/ws":
		return admin.HTTP1
	case "http2", "kubernetes.io/h2c":
		return admin.HTTP2
	case "grpc", "grpc-web":
		return admin.GRPC
	default:
		return admin.TCP
	}
	prefix, _, _ := strings.Cut(strings.ToLower(name), "-")
	switch prefix {
	case "http":
		return admin.HTTP1
	case "http2":
		return admin.HTTP2
	case "grpc":
		return admin.GRPC
	case "tcp", "https", "tls", "mongo", "mysql", "redis":
		return admin.TCP
	}
	return ""
}

// SetServices replaces the Services the proxy balances connections and requests to.
func (p *Proxy) SetServices(svcs []Service) {
	p.mu.Lock()
	p.services = buildServices(svcs, &p.services)
	p.mu.Unlock()
}
