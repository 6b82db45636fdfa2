package e2e

import (
	"net/netip"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/api/admin"
)

// Services of the shared lab (bringUp): web over b (node1, same node as a), c
// (node2, mesh) and d (node1, outside the mesh); empty over no pod; echo-c and
// banner-c over c's echo and banner servers.
var (
	webVIP     = netip.MustParseAddr("10.96.0.50")
	emptyVIP   = netip.MustParseAddr("10.96.0.51")
	echoCVIP   = netip.MustParseAddr("10.96.0.52")
	bannerCVIP = netip.MustParseAddr("10.96.0.53")
)

const servicePort = 80

// An enrolled pod dials a Service's cluster IP: each connection goes to one ready
// endpoint, in turn, on the Service's target port, and is carried as a connection to
// that pod would be: same node to b, mTLS to c, plaintext to d outside the mesh.
func TestServiceVIP(t *testing.T) {
	e := setup(t)
	since := time.Now()
	svc := netip.AddrPortFrom(webVIP, servicePort)
	const n = 12
	for range n {
		e.mustRun(t, "a", "echo", svc.String(), "65536")
	}
	var recs []connRecord
	deadline := time.Now().Add(carryWait)
	for time.Now().Before(deadline) {
		recs = recs[:0]
		for _, c := range e.conns("node1") {
			if c.Service == svc && !c.Start.Before(since) && !c.End.IsZero() {
				recs = append(recs, c)
			}
		}
		if len(recs) >= n {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if len(recs) != n {
		t.Fatalf("node1 recorded %d connections to %s, want %d", len(recs), svc, n)
	}
	want := map[netip.AddrPort]admin.Security{
		netip.MustParseAddrPort(e.addr("b", echoPort)): admin.SameNode,
		netip.MustParseAddrPort(e.addr("c", echoPort)): admin.MTLS,
		netip.MustParseAddrPort(e.addr("d", echoPort)): admin.Plaintext,
	}
	per := map[netip.AddrPort]int{}
	for _, c := range recs {
		sec, ok := want[c.Dst]
		if !ok {
			t.Fatalf("a connection to %s went to %s, which is not one of its endpoints", svc, c.Dst)
		}
		if c.Security != sec || c.Verdict != admin.VerdictForwarded || c.BytesSent != 65536 || c.BytesRecv != 65536 {
			t.Errorf("to %s: %s %s, %d/%d bytes; want %s, forwarded, 65536 each way", c.Dst, c.Security, c.Verdict, c.BytesSent, c.BytesRecv, sec)
		}
		per[c.Dst]++
	}
	for ep := range want {
		if per[ep] != n/len(want) {
			t.Errorf("endpoint %s took %d of %d connections, want %d (round robin)", ep, per[ep], n, n/len(want))
		}
	}
	// c's agent saw the ones to c arrive through the tunnel with a's identity.
	a, c := e.pod("a"), e.pod("c")
	in := e.findConn(t, "node2", func(r connRecord) bool {
		return r.Direction == admin.Inbound && r.Security == admin.MTLS && r.Src.Addr() == a.IP &&
			r.Dst.String() == e.addr("c", echoPort) && !r.Start.Before(since) && r.BytesSent == 65536
	})
	if in.SrcIdentity != a.Identity || in.DstIdentity != c.Identity {
		t.Errorf("node2 records %s → %s, want %s → %s", in.SrcIdentity, in.DstIdentity, a.Identity, c.Identity)
	}
}

// A Service with no ready endpoint, or a port the Service does not have: the client
// is refused at once, and the agent says why.
func TestServiceWithoutEndpoint(t *testing.T) {
	e := setup(t)
	for _, dst := range []netip.AddrPort{netip.AddrPortFrom(emptyVIP, servicePort), netip.AddrPortFrom(webVIP, servicePort+1)} {
		since := time.Now()
		res := e.mustRun(t, "a", "refused", dst.String())
		t.Logf("%s: the client saw the refusal after %.0f ms", dst, res.Duration)
		rec := e.findConn(t, "node1", func(r connRecord) bool { return r.Service == dst && !r.Start.Before(since) && !r.End.IsZero() })
		if rec.Verdict != admin.VerdictError || rec.Reason != admin.ReasonNoEndpoints {
			t.Errorf("%s: recorded %s/%s, want error/no_endpoints", dst, rec.Verdict, rec.Reason)
		}
	}
}

// The TCP semantics an app relies on hold through a Service address too, each
// connection carried to c through the tunnel.
func TestServiceTCPSemantics(t *testing.T) {
	e := setup(t)
	echo := netip.AddrPortFrom(echoCVIP, servicePort).String()
	for _, tc := range []struct {
		name, vip string
		args      []string
		ok        func(connRecord) bool
	}{
		{"server-speaks-first", netip.AddrPortFrom(bannerCVIP, servicePort).String(), []string{"banner"}, func(c connRecord) bool {
			return c.BytesSent == 0 && c.BytesRecv == int64(len(banner))
		}},
		{"half-close", echo, []string{"halfclose"}, func(c connRecord) bool { return c.BytesSent == 4*mib && c.BytesRecv == 4*mib }},
		{"one-byte-writes", echo, []string{"bytewise"}, func(c connRecord) bool { return c.BytesSent == 5000 && c.BytesRecv == 5000 }},
		{"idle-60s", echo, []string{"idle"}, func(c connRecord) bool {
			return c.BytesSent == 2048 && c.BytesRecv == 2048 && c.End.Sub(c.Start) >= 60*time.Second
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.name == "idle-60s" {
				t.Parallel() // a minute of nothing: let the others go on
			}
			since := time.Now()
			args := append([]string{tc.args[0], tc.vip}, tc.args[1:]...)
			switch tc.name {
			case "half-close":
				args = append(args, "4194304")
			case "one-byte-writes":
				args = append(args, "5000")
			case "idle-60s":
				args = append(args, "60")
			}
			e.mustRun(t, "a", args...)
			rec := e.findConn(t, "node1", func(r connRecord) bool {
				return r.Service.String() == tc.vip && !r.Start.Before(since) && !r.End.IsZero()
			})
			if rec.Security != admin.MTLS || rec.Dst.Addr() != e.pod("c").IP || rec.Verdict != admin.VerdictForwarded || !tc.ok(rec) {
				t.Errorf("recorded %+v, want forwarded over mTLS to c with the bytes of the scenario", rec)
			}
		})
	}
}
