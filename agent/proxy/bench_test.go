package proxy

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"testing"

	"github.com/ferrymesh/ferry/agent/identity"
	"github.com/ferrymesh/ferry/agent/netns"
	"github.com/ferrymesh/ferry/api/mesh"
	"github.com/ferrymesh/ferry/internal/listener"
	"github.com/ferrymesh/ferry/internal/privileged"
	"github.com/vishvananda/netlink"
)

// BenchmarkConnSetup is one connection through the node proxy on the same-node path:
// the client connects to pod a's outbound listener (as capture would make it), the
// proxy looks up the original destination, dials pod b's app from 127.0.0.6 inside
// b's namespace, and pipes one byte there and back; then both ends close. Pods a and
// b are two network namespaces.
func BenchmarkConnSetup(b *testing.B) {
	privileged.Require(b)
	nsA, nsB := privileged.NewNetns(b), privileged.NewNetns(b)
	ipA, ipB := netip.MustParseAddr("10.1.2.3"), netip.MustParseAddr("10.1.2.4")
	addLoAddr(b, nsA, ipA)
	addLoAddr(b, nsB, ipB)
	app := netip.AddrPortFrom(ipB, 8080)
	var appLn net.Listener
	if err := nsB.Do(func() error {
		lc := listener.Config()
		var err error
		appLn, err = lc.Listen(context.Background(), "tcp", app.String())
		return err
	}); err != nil {
		b.Fatal(err)
	}
	defer appLn.Close()
	go func() {
		for {
			c, err := appLn.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	}()
	p, err := New(Config{Node: "n1", Mark: mesh.DefaultMark, Ports: mesh.DefaultPorts(), Capture: &fakeCapture{dst: app},
		Identities: identity.NewStore(), Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		b.Fatal(err)
	}
	if err := p.Start(b.Context()); err != nil {
		b.Fatal(err)
	}
	defer p.Stop(context.Background())
	wa := Workload{UID: "a", Name: "default/a", Identity: "spiffe://cluster.local/ns/default/sa/a", Node: "n1", IPs: []netip.Addr{ipA}}
	wb := Workload{UID: "b", Name: "default/b", Identity: "spiffe://cluster.local/ns/default/sa/b", Node: "n1", IPs: []netip.Addr{ipB}}
	p.SetMesh([]Workload{wa, wb})
	if err := p.AddPod(wa, nsA, 1); err != nil {
		b.Fatal(err)
	}
	if err := p.AddPod(wb, nsB, 2); err != nil {
		b.Fatal(err)
	}
	one, buf := []byte{1}, make([]byte, 1)
	b.ReportAllocs()
	b.ResetTimer()
	// The whole loop runs on one thread inside pod a's namespace, so each dial is
	// an ordinary connect from the pod.
	err = nsA.Do(func() error {
		var d net.Dialer
		d.SetMultipathTCP(false)
		for i := 0; i < b.N; i++ {
			c, err := d.Dial("tcp", "127.0.0.1:15001")
			if err != nil {
				return err
			}
			if _, err := c.Write(one); err != nil {
				return err
			}
			if _, err := io.ReadFull(c, buf); err != nil {
				return err
			}
			c.Close()
		}
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
}

func addLoAddr(b *testing.B, ns *netns.Handle, ip netip.Addr) {
	b.Helper()
	if err := ns.Do(func() error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		return netlink.AddrAdd(lo, &netlink.Addr{IPNet: netipPrefix(ip)})
	}); err != nil {
		b.Fatalf("address %s: %v", ip, err)
	}
}

func netipPrefix(ip netip.Addr) *net.IPNet {
	return &net.IPNet{IP: ip.AsSlice(), Mask: net.CIDRMask(32, 32)}
}
