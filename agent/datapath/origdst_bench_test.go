package datapath_test

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"testing"

	"github.com/ferrymesh/ferry/agent/datapath"
	"github.com/ferrymesh/ferry/agent/netns"
	"github.com/ferrymesh/ferry/api/mesh"
	"github.com/ferrymesh/ferry/bpf"
	"github.com/ferrymesh/ferry/internal/listener"
	"github.com/ferrymesh/ferry/internal/privileged"
	"golang.org/x/sys/unix"
)

// BenchmarkOrigDst is the proxy's per-connection lookup of where a captured
// connection was going. ebpf: TakeOrigDst (one BPF_MAP_LOOKUP_AND_DELETE_ELEM) on
// entries written beforehand, as sockops writes them on established; iptables:
// getsockopt(SO_ORIGINAL_DST) on a socket REDIRECTed by the nat table (a conntrack
// lookup).
func BenchmarkOrigDst(b *testing.B) {
	privileged.Require(b)
	b.Run("ebpf", func(b *testing.B) {
		objs, err := bpf.Load(bpf.Config{AgentMark: mesh.DefaultMark, Ports: mesh.DefaultPorts(), MaxPods: 16}, "")
		if err != nil {
			b.Fatal(err)
		}
		defer objs.Close()
		dst := bpf.Dst{Port: 8080, Family: unix.AF_INET}
		dst.Addr = netip.MustParseAddr("10.1.2.3").As16()
		const batch = 4096 // well under the map's size, so nothing is evicted
		keys := make([]bpf.OrigKey, batch)
		vals := make([]bpf.Dst, batch)
		for i := range keys {
			keys[i] = bpf.OrigKey{NetnsCookie: 7, ClientPort: uint16(10000 + i)}
			vals[i] = dst
		}
		b.ReportAllocs()
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			j := i % batch
			if j == 0 {
				b.StopTimer()
				if _, err := objs.OrigDst.BatchUpdate(keys, vals, nil); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
			if _, err := objs.TakeOrigDst(7, uint16(10000+j)); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("iptables", func(b *testing.B) {
		if _, err := exec.LookPath("iptables"); err != nil {
			b.Fatalf("iptables is not installed (make deps): %v", err)
		}
		anon := privileged.NewNetns(b)
		// nsenter (in IPTablesCapture) needs a path that names this namespace from
		// another process.
		h, err := netns.Open(fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), anon.FD()))
		if err != nil {
			b.Fatal(err)
		}
		defer h.Close()
		if out, err := exec.Command("nsenter", "--net="+h.Path(), "ip", "addr", "add", "10.1.2.3/32", "dev", "lo").CombinedOutput(); err != nil {
			b.Fatalf("ip addr: %v: %s", err, out)
		}
		ipt := datapath.IPTablesCapture{Mark: mesh.DefaultMark, Ports: mesh.DefaultPorts()}
		if err := ipt.Install(h); err != nil {
			b.Fatal(err)
		}
		var ln net.Listener
		var client net.Conn
		if err := h.Do(func() error {
			lc := listener.Config()
			if ln, err = lc.Listen(context.Background(), "tcp", "127.0.0.1:15001"); err != nil {
				return err
			}
			var d net.Dialer
			d.SetMultipathTCP(false)
			client, err = d.Dial("tcp", "10.1.2.3:80")
			return err
		}); err != nil {
			b.Fatal(err)
		}
		defer ln.Close()
		defer client.Close()
		c, err := ln.Accept()
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		want := netip.MustParseAddrPort("10.1.2.3:80")
		b.ReportAllocs()
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			got, err := datapath.SocketOrigDst(c.(*net.TCPConn))
			if err != nil || got != want {
				b.Fatalf("SocketOrigDst = %v, %v; want %v", got, err, want)
			}
		}
	})
}
