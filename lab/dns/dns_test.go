package dns

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

func testZone(t *testing.T) *Zone {
	t.Helper()
	z, err := NewZone("", []Service{
		{Name: "web", Namespace: "default", IPs: []netip.Addr{netip.MustParseAddr("10.96.0.50"), netip.MustParseAddr("fd00:96::50")}},
		{Name: "api", Namespace: "shop", IPs: []netip.Addr{netip.MustParseAddr("10.96.0.60")}},
	})
	if err != nil {
		t.Fatal(err)
	}
	return z
}

// serve starts a server for the zone on loopback and returns its address.
func serve(t *testing.T, z *Zone) netip.AddrPort {
	t.Helper()
	_, addr := serveZone(t, z)
	return addr
}

// serveZone is serve, with the server.
func serveZone(t *testing.T, z *Zone) (*Server, netip.AddrPort) {
	t.Helper()
	// Port 0 gives UDP and TCP different ports; find one free for both.
	var addr netip.AddrPort
	for range 20 {
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr = pc.LocalAddr().(*net.UDPAddr).AddrPort()
		pc.Close()
		s, err := New(Config{Zone: z, Endpoints: []Endpoint{{Addr: addr}}}, nil)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Start(t.Context()); err != nil {
			continue
		}
		t.Cleanup(s.Stop)
		return s, addr
	}
	t.Fatal("no port free for both UDP and TCP")
	return nil, addr
}

// A zone set while serving answers the next query: a Service created then is found.
func TestSetZone(t *testing.T) {
	s, addr := serveZone(t, testZone(t))
	r := resolver(addr, "udp")
	var de *net.DNSError
	if _, err := r.LookupHost(t.Context(), "new.default.svc.cluster.local"); !errors.As(err, &de) || !de.IsNotFound {
		t.Fatalf("before: want no such host, got %v", err)
	}
	z, err := NewZone("", []Service{{Name: "new", Namespace: "default", IPs: []netip.Addr{netip.MustParseAddr("10.96.0.70")}}})
	if err != nil {
		t.Fatal(err)
	}
	s.SetZone(z)
	got, err := r.LookupHost(t.Context(), "new.default.svc.cluster.local")
	if err != nil || !slices.Equal(got, []string{"10.96.0.70"}) {
		t.Errorf("after SetZone: %v, %v; want [10.96.0.70]", got, err)
	}
}

// resolver is Go's own resolver sending every query to addr: over TCP only when
// network is "tcp", else as the resolver chooses (UDP, TCP after a truncated reply).
func resolver(addr netip.AddrPort, network string) *net.Resolver {
	return &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, asked, _ string) (net.Conn, error) {
		if network == "tcp" {
			asked = "tcp"
		}
		var d net.Dialer
		return d.DialContext(ctx, asked, addr.String())
	}}
}

func TestGoResolverFindsServices(t *testing.T) {
	addr := serve(t, testZone(t))
	for _, network := range []string{"udp", "tcp"} {
		r := resolver(addr, network)
		got, err := r.LookupHost(t.Context(), "web.default.svc.cluster.local")
		if err != nil {
			t.Fatalf("%s: %v", network, err)
		}
		slices.Sort(got)
		if want := []string{"10.96.0.50", "fd00:96::50"}; !slices.Equal(got, want) {
			t.Errorf("%s: web = %v, want %v", network, got, want)
		}
		v4, err := r.LookupNetIP(t.Context(), "ip4", "API.shop.svc.cluster.local.")
		if err != nil || len(v4) != 1 || v4[0] != netip.MustParseAddr("10.96.0.60") {
			t.Errorf("%s: api (ip4, upper case) = %v, %v", network, v4, err)
		}
		// An IPv4-only Service has no AAAA: the name exists (not NXDOMAIN).
		_, err = r.LookupNetIP(t.Context(), "ip6", "api.shop.svc.cluster.local")
		var de *net.DNSError
		if !errors.As(err, &de) || !de.IsNotFound {
			t.Errorf("%s: api ip6: want no such host, got %v", network, err)
		}
		_, err = r.LookupHost(t.Context(), "nope.default.svc.cluster.local")
		if !errors.As(err, &de) || !de.IsNotFound {
			t.Errorf("%s: unknown service: want no such host, got %v", network, err)
		}
		// Outside the zone: refused, which is not "no such host" (nothing was looked up).
		_, err = r.LookupHost(t.Context(), "example.com")
		if !errors.As(err, &de) || de.IsNotFound {
			t.Errorf("%s: example.com: want a server error, got %v", network, err)
		}
	}
}

func query(t *testing.T, name string, typ dnsmessage.Type, edns bool) []byte {
	t.Helper()
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: 7, RecursionDesired: true})
	b.StartQuestions()
	if err := b.Question(dnsmessage.Question{Name: dnsmessage.MustNewName(name), Type: typ, Class: dnsmessage.ClassINET}); err != nil {
		t.Fatal(err)
	}
	if edns {
		b.StartAdditionals()
		var h dnsmessage.ResourceHeader
		if err := h.SetEDNS0(4096, dnsmessage.RCodeSuccess, false); err != nil {
			t.Fatal(err)
		}
		if err := b.OPTResource(h, dnsmessage.OPTResource{}); err != nil {
			t.Fatal(err)
		}
	}
	q, err := b.Finish()
	if err != nil {
		t.Fatal(err)
	}
	return q
}

func answer(t *testing.T, z *Zone, q []byte) dnsmessage.Message {
	t.Helper()
	out, err := z.Answer(q, true)
	if err != nil {
		t.Fatal(err)
	}
	var m dnsmessage.Message
	if err := m.Unpack(out); err != nil {
		t.Fatal(err)
	}
	return m
}

func TestAnswers(t *testing.T) {
	z := testZone(t)
	cases := []struct {
		name    string
		typ     dnsmessage.Type
		rcode   dnsmessage.RCode
		answers int
		soa     bool // SOA in the authority section (negative answer)
	}{
		{"web.default.svc.cluster.local.", dnsmessage.TypeA, dnsmessage.RCodeSuccess, 1, false},
		{"web.default.svc.cluster.local.", dnsmessage.TypeAAAA, dnsmessage.RCodeSuccess, 1, false},
		{"web.default.svc.cluster.local.", dnsmessage.TypeTXT, dnsmessage.RCodeSuccess, 0, true},
		{"default.svc.cluster.local.", dnsmessage.TypeA, dnsmessage.RCodeSuccess, 0, true},
		{"svc.cluster.local.", dnsmessage.TypeA, dnsmessage.RCodeSuccess, 0, true},
		{"cluster.local.", dnsmessage.TypeSOA, dnsmessage.RCodeSuccess, 1, false},
		{"web.default.default.svc.cluster.local.", dnsmessage.TypeA, dnsmessage.RCodeNameError, 0, true},
		{"web.cluster.local.", dnsmessage.TypeA, dnsmessage.RCodeNameError, 0, true},
		{"nocluster.local.", dnsmessage.TypeA, dnsmessage.RCodeRefused, 0, false},
		{"example.com.", dnsmessage.TypeA, dnsmessage.RCodeRefused, 0, false},
		{"50.0.96.10.in-addr.arpa.", dnsmessage.TypePTR, dnsmessage.RCodeRefused, 0, false},
	}
	for _, c := range cases {
		for _, edns := range []bool{false, true} {
			m := answer(t, z, query(t, c.name, c.typ, edns))
			if m.ID != 7 || !m.Response || m.RCode != c.rcode || len(m.Answers) != c.answers {
				t.Errorf("%s %v (edns %v): id %d rcode %v, %d answers; want rcode %v, %d answers", c.name, c.typ, edns, m.ID, m.RCode, len(m.Answers), c.rcode, c.answers)
			}
			gotSOA := len(m.Authorities) == 1 && m.Authorities[0].Header.Type == dnsmessage.TypeSOA
			if gotSOA != c.soa {
				t.Errorf("%s %v: authority %v, want SOA: %v", c.name, c.typ, m.Authorities, c.soa)
			}
			hasOPT := slices.ContainsFunc(m.Additionals, func(r dnsmessage.Resource) bool { return r.Header.Type == dnsmessage.TypeOPT })
			if hasOPT != edns {
				t.Errorf("%s: OPT in reply %v, in query %v", c.name, hasOPT, edns)
			}
			if aa := c.rcode != dnsmessage.RCodeRefused; m.Authoritative != aa {
				t.Errorf("%s: authoritative %v, want %v", c.name, m.Authoritative, aa)
			}
		}
	}
}

// A reply too long for UDP comes back truncated, so the client retries over TCP.
func TestTruncatedOverUDP(t *testing.T) {
	var ips []netip.Addr
	for i := range 40 {
		ips = append(ips, netip.AddrFrom4([4]byte{10, 96, 1, byte(i)}))
	}
	z, err := NewZone("", []Service{{Name: "big", Namespace: "default", IPs: ips}})
	if err != nil {
		t.Fatal(err)
	}
	q := query(t, "big.default.svc.cluster.local.", dnsmessage.TypeA, false)
	if m := answer(t, z, q); !m.Truncated || len(m.Answers) != 0 {
		t.Fatalf("over UDP: truncated %v with %d answers, want TC and none", m.Truncated, len(m.Answers))
	}
	out, err := z.Answer(q, false)
	if err != nil {
		t.Fatal(err)
	}
	var m dnsmessage.Message
	if err := m.Unpack(out); err != nil || m.Truncated || len(m.Answers) != 40 {
		t.Fatalf("over TCP: truncated %v, %d answers, %v; want all 40", m.Truncated, len(m.Answers), err)
	}
	// And Go's resolver, told the truth, gets all of them by retrying over TCP.
	got, err := resolver(serve(t, z), "udp").LookupHost(t.Context(), "big.default.svc.cluster.local")
	if err != nil || len(got) != 40 {
		t.Fatalf("resolver: %d addresses, %v; want 40", len(got), err)
	}
}

func TestZoneErrors(t *testing.T) {
	if _, err := NewZone("", []Service{{Name: "a", Namespace: "x"}, {Name: "A", Namespace: "x"}}); err == nil {
		t.Error("a service defined twice is accepted")
	}
	if _, err := NewZone("", []Service{{Name: "a"}}); err == nil {
		t.Error("a service without namespace is accepted")
	}
	if _, err := New(Config{Zone: testZone(t)}, nil); err == nil {
		t.Error("a server without endpoints is accepted")
	}
	if _, err := testZone(t).Answer([]byte{1, 2, 3}, true); err == nil {
		t.Error("garbage gets a reply")
	}
}

func TestProbe(t *testing.T) {
	if err := Probe(serve(t, testZone(t)), DefaultDomain, time.Second); err != nil {
		t.Fatal(err)
	}
	z, _ := NewZone("other.zone", nil)
	if err := Probe(serve(t, z), DefaultDomain, time.Second); err == nil {
		t.Fatal("a responder for another zone passes the probe")
	}
}
