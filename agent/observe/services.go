package observe

import (
	"net/netip"
	"sort"
	"strconv"

	"github.com/ferrymesh/ferry/api/admin"
	"github.com/ferrymesh/ferry/api/ferryv1"
)

// service is a destination's service in flows ("namespace/name") and in the metrics
// (Istio's "name.namespace.svc.cluster.local", and its name and namespace apart).
type service struct{ flow, metric, name, namespace string }

// serviceIndex indexes the state's services by the addresses that reach them: each
// cluster IP and port, and each endpoint pod's IP and numeric target port. When two
// services select the same pod port, the first by namespace and name wins.
func serviceIndex(st *ferryv1.NodeState) *map[netip.AddrPort]service {
	ips := map[string][]netip.Addr{}
	for _, w := range st.GetWorkloads() {
		for _, s := range w.GetIps() {
			if ip, err := netip.ParseAddr(s); err == nil {
				ips[w.GetUid()] = append(ips[w.GetUid()], ip.Unmap())
			}
		}
	}
	svcs := append([]*ferryv1.Service(nil), st.GetServices()...)
	sort.Slice(svcs, func(i, j int) bool {
		return svcs[i].GetNamespace()+"/"+svcs[i].GetName() < svcs[j].GetNamespace()+"/"+svcs[j].GetName()
	})
	idx := map[netip.AddrPort]service{}
	add := func(ip netip.Addr, port uint32, s service) {
		k := netip.AddrPortFrom(ip, uint16(port))
		if _, taken := idx[k]; !taken && port != 0 && port <= 65535 {
			idx[k] = s
		}
	}
	for _, sv := range svcs {
		s := service{flow: sv.GetNamespace() + "/" + sv.GetName(), metric: sv.GetName() + "." + sv.GetNamespace() + ".svc.cluster.local",
			name: sv.GetName(), namespace: sv.GetNamespace()}
		for _, p := range sv.GetPorts() {
			for _, c := range sv.GetClusterIps() {
				if ip, err := netip.ParseAddr(c); err == nil {
					add(ip.Unmap(), p.GetPort(), s)
				}
			}
			target := p.GetPort()
			if tp := p.GetTargetPort(); tp != "" {
				n, err := strconv.ParseUint(tp, 10, 16)
				if err != nil {
					continue // a named container port: the state does not say which number
				}
				target = uint32(n)
			}
			for _, uid := range sv.GetEndpoints() {
				for _, ip := range ips[uid] {
					add(ip, target, s)
				}
			}
		}
		// Backends carry their ports resolved, named target ports too.
		for _, b := range sv.GetBackends() {
			for _, port := range b.GetPorts() {
				for _, text := range b.GetIps() {
					if ip, err := netip.ParseAddr(text); err == nil {
						add(ip.Unmap(), port, s)
					}
				}
			}
		}
	}
	return &idx
}

// serviceOf names the Service of c: the one the client dialled, else the one whose
// endpoint the destination is.
func (o *Observer) serviceOf(c admin.Conn) service {
	if c.Service.IsValid() {
		if s := o.service(c.Service); s.flow != "" {
			return s
		}
	}
	return o.service(c.Dst)
}

// service returns the service behind dst, if the state names one.
func (o *Observer) service(dst netip.AddrPort) service {
	if idx := o.services.Load(); idx != nil {
		return (*idx)[netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())]
	}
	return service{}
}
