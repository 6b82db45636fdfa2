package local

import (
	"cmp"
	"errors"
	"fmt"
	"hash/fnv"
	"math/big"
	"net/netip"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
)

// DefaultServiceCIDR is the range local mode gives cluster IPs from to Services that
// do not set one, as the API server's --service-cluster-ip-range does (kubeadm's
// default range, shortened to a /16).
const DefaultServiceCIDR = "10.96.0.0/16"

// assignClusterIPs does for the Services in want what the API server does on create:
// a spec.clusterIP the manifest sets is kept (and must be an address of the range,
// used by no other Service), a missing one is allocated, and spec.clusterIPs and
// spec.ipFamilies are filled to match. An allocated address stays the Service's for
// as long as it exists, and is derived from its name, so a restarted operator gives
// the same one. A Service whose address cannot be kept is left out, with an error
// naming its file and field.
func (l *Loader) assignClusterIPs(want map[key]any, owner map[key]string) []*ManifestError {
	var keys []key
	for k, o := range want {
		if _, ok := o.(*corev1.Service); ok {
			keys = append(keys, k)
		}
	}
	slices.SortFunc(keys, func(a, b key) int {
		return cmp.Or(strings.Compare(a.namespace, b.namespace), strings.Compare(a.name, b.name))
	})
	var errs []*ManifestError
	fail := func(k key, field string, err error) {
		errs = append(errs, &ManifestError{File: owner[k], Object: describe(k), Field: field, Err: err})
		delete(want, k)
	}
	used := map[netip.Addr]key{}
	var missing []key
	// Addresses the manifests set come first, so an allocation never takes one.
	for _, k := range keys {
		s := want[k].(*corev1.Service).DeepCopy()
		want[k] = s
		if s.Spec.Type == corev1.ServiceTypeExternalName {
			continue
		}
		if s.Spec.ClusterIP == "" && len(s.Spec.ClusterIPs) == 0 {
			missing = append(missing, k)
			continue
		}
		if s.Spec.ClusterIP == "" {
			s.Spec.ClusterIP = s.Spec.ClusterIPs[0]
		}
		if len(s.Spec.ClusterIPs) == 0 {
			s.Spec.ClusterIPs = []string{s.Spec.ClusterIP}
		}
		if s.Spec.ClusterIPs[0] != s.Spec.ClusterIP {
			fail(k, "spec.clusterIPs", fmt.Errorf("first entry %s must equal spec.clusterIP %s", s.Spec.ClusterIPs[0], s.Spec.ClusterIP))
			continue
		}
		if s.Spec.ClusterIP == corev1.ClusterIPNone {
			continue // headless
		}
		var families []corev1.IPFamily
		var bad bool
		for i, text := range s.Spec.ClusterIPs {
			field := fmt.Sprintf("spec.clusterIPs[%d]", i)
			if i == 0 {
				field = "spec.clusterIP"
			}
			ip, err := netip.ParseAddr(text)
			if err != nil {
				fail(k, field, fmt.Errorf("%q is not an IP address", text))
				bad = true
				break
			}
			ip = ip.Unmap()
			if family(ip) == family(l.serviceCIDR.Addr()) && !l.serviceCIDR.Contains(ip) {
				fail(k, field, fmt.Errorf("%s is not in the service range %s", ip, l.serviceCIDR))
				bad = true
				break
			}
			if other, taken := used[ip]; taken {
				fail(k, field, fmt.Errorf("%s is already the address of %s", ip, describe(other)))
				bad = true
				break
			}
			used[ip] = k
			families = append(families, family(ip))
		}
		if !bad {
			s.Spec.IPFamilies = families
		}
	}
	kept := map[key]netip.Addr{}
	for _, k := range missing {
		s := want[k].(*corev1.Service)
		ip, err := l.allocate(k, used)
		if err != nil {
			fail(k, "spec.clusterIP", err)
			continue
		}
		used[ip] = k
		kept[k] = ip
		s.Spec.ClusterIP = ip.String()
		s.Spec.ClusterIPs = []string{ip.String()}
		s.Spec.IPFamilies = []corev1.IPFamily{family(ip)}
	}
	l.allocated = kept
	return errs
}

// allocate picks a free address of the range for k: the one it had, else the first
// free one from a start derived from its namespace and name. The network address and
// the first host address (the API server gives it to the kubernetes Service) are
// never given.
func (l *Loader) allocate(k key, used map[netip.Addr]key) (netip.Addr, error) {
	if ip, ok := l.allocated[k]; ok {
		if _, taken := used[ip]; !taken {
			return ip, nil
		}
	}
	p := l.serviceCIDR.Masked()
	bits := p.Addr().BitLen() - p.Bits()
	size := new(big.Int).Lsh(big.NewInt(1), uint(bits))
	if size.Cmp(big.NewInt(4)) < 0 {
		return netip.Addr{}, fmt.Errorf("service range %s is too small", p)
	}
	hosts := new(big.Int).Sub(size, big.NewInt(2)) // offsets 2 .. size-1
	h := fnv.New64a()
	h.Write([]byte(k.namespace + "/" + k.name))
	start := new(big.Int).Mod(new(big.Int).SetUint64(h.Sum64()), hosts)
	base := new(big.Int).SetBytes(p.Addr().AsSlice())
	limit := int64(1 << 20) // probe at most this many addresses
	if hosts.IsInt64() && hosts.Int64() < limit {
		limit = hosts.Int64()
	}
	for i := int64(0); i < limit; i++ {
		off := new(big.Int).Add(start, big.NewInt(i))
		off.Mod(off, hosts).Add(off, big.NewInt(2))
		ip := addrFromInt(new(big.Int).Add(base, off), p.Addr().BitLen())
		if _, taken := used[ip]; !taken {
			return ip, nil
		}
	}
	return netip.Addr{}, errors.New("no free address left in the service range " + p.String())
}

// SetServiceCIDR sets the range cluster IPs are allocated from (DefaultServiceCIDR
// until then); call it before the first Load.
func (l *Loader) SetServiceCIDR(p netip.Prefix) error {
	if !p.IsValid() || p.Addr().BitLen()-p.Bits() < 2 {
		return fmt.Errorf("service range %s: need a valid prefix with at least 4 addresses", p)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.serviceCIDR = p.Masked()
	return nil
}

func addrFromInt(n *big.Int, bitLen int) netip.Addr {
	b := make([]byte, bitLen/8)
	n.FillBytes(b)
	ip, _ := netip.AddrFromSlice(b)
	return ip
}

func family(ip netip.Addr) corev1.IPFamily {
	if ip.Is4() {
		return corev1.IPv4Protocol
	}
	return corev1.IPv6Protocol
}
