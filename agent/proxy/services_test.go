package proxy

import (
	"errors"
	"net/netip"
	"syscall"
	"testing"

	"github.com/ferrymesh/ferry/api/admin"
)

var (
	vip     = netip.MustParseAddr("10.96.0.50")
	outside = netip.MustParseAddr("10.1.3.7") // a pod outside the mesh
	web     = Service{Name: "default/web", VIPs: []netip.Addr{vip}, Ports: []ServicePort{{Port: 80}, {Port: 9000}},
		Backends: []Backend{
			{IPs: wb.IPs, Ready: true, Ports: []uint16{8080, 9001}},                // same node
			{IPs: wc.IPs, Ready: true, Ports: []uint16{8081, 0}},                   // other node; no port for 9000
			{IPs: []netip.Addr{outside}, Ready: true, Ports: []uint16{8082, 9003}}, // outside the mesh
			{IPs: []netip.Addr{netip.MustParseAddr("10.1.2.99")}, Ready: false, Ports: []uint16{8083, 9004}},
		}}
)

// A Service address goes to one ready endpoint per connection, on the pod port its
// Service port maps to, and the endpoint is reached the way a connection to it
// directly would be: same node, tunnel, or plaintext outside the mesh.
func TestServiceBalancesOverReadyEndpoints(t *testing.T) {
	tp := newTestProxy(t)
	tp.SetServices([]Service{web})
	seen := map[netip.AddrPort]admin.Security{}
	for range 6 {
		reply, err, rec := tp.outbound(t, tp.a, netip.AddrPortFrom(vip, 80), "ping")
		if err != nil || reply != "ping" {
			t.Fatalf("through the service: %q, %v", reply, err)
		}
		if rec.Service != netip.AddrPortFrom(vip, 80) || rec.Verdict != admin.VerdictForwarded {
			t.Fatalf("record %+v: want service 10.96.0.50:80, forwarded", rec)
		}
		seen[rec.Dst] = rec.Security
	}
	want := map[netip.AddrPort]admin.Security{
		netip.AddrPortFrom(wb.IPs[0], 8080): admin.SameNode,
		netip.AddrPortFrom(wc.IPs[0], 8081): admin.MTLS,
		netip.AddrPortFrom(outside, 8082):   admin.Plaintext,
	}
	if len(seen) != len(want) {
		t.Fatalf("endpoints used %v, want the three ready ones %v", seen, want)
	}
	for ep, sec := range want {
		if seen[ep] != sec {
			t.Errorf("endpoint %s carried %q, want %q", ep, seen[ep], sec)
		}
	}
	// The tunnel was asked for c's identity and c's pod port, never the VIP.
	for _, d := range tp.tunnels.log {
		if d.id != wc.Identity || d.to != netip.AddrPortFrom(wc.IPs[0], 8081) {
			t.Errorf("tunnel dial %+v, want c's identity to %s:8081", d, wc.IPs[0])
		}
	}
}

// A port whose endpoints do not serve it maps only to those that do.
func TestServicePortSkipsEndpointsWithoutIt(t *testing.T) {
	tp := newTestProxy(t)
	tp.SetServices([]Service{web})
	for range 4 {
		_, err, rec := tp.outbound(t, tp.a, netip.AddrPortFrom(vip, 9000), "x")
		if err != nil {
			t.Fatal(err)
		}
		if rec.Dst == netip.AddrPortFrom(wc.IPs[0], 0) || rec.Dst.Addr() == wc.IPs[0] {
			t.Fatalf("port 9000 went to c, which has no port for it: %+v", rec)
		}
	}
}

// No ready endpoint, or a port the Service does not have: the client is reset at
// once and the record says why; nothing is dialled.
func TestServiceWithoutEndpointRefused(t *testing.T) {
	tp := newTestProxy(t)
	empty := Service{Name: "default/empty", VIPs: []netip.Addr{netip.MustParseAddr("10.96.0.51")}, Ports: []ServicePort{{Port: 80}},
		Backends: []Backend{{IPs: wc.IPs, Ready: false, Ports: []uint16{8080}}}}
	tp.SetServices([]Service{web, empty})
	for _, dst := range []netip.AddrPort{netip.MustParseAddrPort("10.96.0.51:80"), netip.AddrPortFrom(vip, 81)} {
		_, err, rec := tp.outbound(t, tp.a, dst, "x")
		if !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, syscall.EPIPE) {
			t.Errorf("%s: client saw %v, want a reset", dst, err)
		}
		if rec.Verdict != admin.VerdictError || rec.Reason != admin.ReasonNoEndpoints || rec.Service != dst || rec.Dst != dst {
			t.Errorf("%s: record %+v, want error/no_endpoints for the service address", dst, rec)
		}
	}
	if n := len(tp.netA.dials()) + len(tp.tunnels.log); n != 0 {
		t.Errorf("%d dials for connections that had no endpoint", n)
	}
}

// An IPv6 cluster IP balances over the pods' IPv6 addresses.
func TestServiceFamilies(t *testing.T) {
	v6 := netip.MustParseAddr("fd00:10:96::50")
	tb := buildServices([]Service{{Name: "default/dual", VIPs: []netip.Addr{vip, v6}, Ports: []ServicePort{{Port: 80}}, Backends: []Backend{
		{IPs: []netip.Addr{netip.MustParseAddr("10.1.1.20"), netip.MustParseAddr("fd00:1::20")}, Ready: true, Ports: []uint16{8080}},
		{IPs: []netip.Addr{netip.MustParseAddr("10.1.1.21")}, Ready: true, Ports: []uint16{8080}}, // IPv4 only
	}}}, nil)
	for range 3 {
		v, _, isSvc := tb.lookup(netip.AddrPortFrom(v6, 80))
		if !isSvc || v == nil {
			t.Fatalf("IPv6 service address: %v, %v", v, isSvc)
		}
		if ep, ok := v.pick(); !ok || ep != netip.MustParseAddrPort("[fd00:1::20]:8080") {
			t.Fatalf("IPv6 service address went to %s (%v), want [fd00:1::20]:8080", ep, ok)
		}
	}
	if _, _, isSvc := tb.lookup(netip.MustParseAddrPort("10.96.0.99:80")); isSvc {
		t.Error("an address no Service has was taken for a Service")
	}
}
