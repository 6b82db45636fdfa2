package bpf

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/ferrymesh/ferry/api/mesh"
	"github.com/ferrymesh/ferry/internal/privileged"
)

// TestSkLookupStrict checks STRICT in the kernel on a real namespace: plaintext to a
// STRICT pod port is refused at once with a reset (ECONNREFUSED, not a timeout),
// neither the app's listener nor the inbound capture listener accepting it, while
// the tunnel port, the agent's hop from 127.0.0.6 and a per-port PERMISSIVE
// override still connect; each refusal is counted and reported on strict_events.
// Plaintext from a node address (node_addrs: kubelet's probes) reaches the inbound
// listener.
func TestSkLookupStrict(t *testing.T) {
	privileged.Require(t)
	objs, err := Load(Config{AgentMark: mesh.DefaultMark, Ports: mesh.DefaultPorts(), MaxPods: 8}, "")
	if err != nil {
		t.Fatal(err)
	}
	defer objs.Close()
	podIP := netip.MustParseAddr("10.1.2.4")
	pod := privileged.NewNetns(t)
	addAddr(t, pod, "10.1.2.4/32")
	inbound := inboundListener(t, objs, pod, podIP)
	app := listen(t, pod, "tcp4", "0.0.0.0:9999")
	tunnel := listen(t, pod, "tcp4", "10.1.2.4:15008")
	l, err := link.AttachNetNs(pod.FD(), objs.FerrySkLookup)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	clone, err := objs.StrictEvents.Clone()
	if err != nil {
		t.Fatal(err)
	}
	events, err := NewStrictEvents(clone)
	if err != nil {
		t.Fatal(err)
	}
	defer events.Close()

	dialFrom := func(src, dst string) (net.Conn, time.Duration, error) {
		var c net.Conn
		start := time.Now()
		err := pod.Do(func() error {
			d := net.Dialer{Timeout: 5 * time.Second}
			if src != "" {
				d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(src)}
			}
			var err error
			c, err = d.Dial("tcp4", dst)
			return err
		})
		return c, time.Since(start), err
	}
	accepts := func(ln *net.TCPListener, dst string) {
		t.Helper()
		c, _, err := dialFrom("", dst)
		if err != nil {
			t.Fatalf("dial %s: %v", dst, err)
		}
		defer c.Close()
		ln.SetDeadline(time.Now().Add(5 * time.Second))
		s, err := ln.Accept()
		if err != nil {
			t.Fatalf("%s: %v", dst, err)
		}
		s.Close()
	}
	refused := func(dst string) {
		t.Helper()
		c, took, err := dialFrom("", dst)
		if err == nil {
			c.Close()
			t.Fatalf("plaintext to %s connected under STRICT", dst)
		}
		if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatalf("plaintext to %s: %v after %s, want connection refused (a reset), not a hang", dst, err, took)
		}
	}

	accepts(inbound, "10.1.2.4:9999") // PERMISSIVE (no entry): steered to the capture
	if err := objs.SetStrictPorts([]StrictPort{{IP: podIP, Mode: MTLSStrict}, {IP: podIP, Port: 8080, Mode: MTLSPermissive}}); err != nil {
		t.Fatal(err)
	}
	before, err := SumCounters(objs.Counters)
	if err != nil {
		t.Fatal(err)
	}
	refused("10.1.2.4:9999")
	refused("10.1.2.4:80")
	accepts(inbound, "10.1.2.4:8080") // the per-port override
	accepts(tunnel, "10.1.2.4:15008") // mTLS arrives here
	if c, _, err := dialFrom("127.0.0.6", "10.1.2.4:9999"); err != nil {
		t.Fatalf("the agent's hop from 127.0.0.6 under STRICT: %v", err)
	} else {
		c.Close()
		app.SetDeadline(time.Now().Add(5 * time.Second))
		s, err := app.Accept()
		if err != nil {
			t.Fatal(err)
		}
		s.Close()
	}
	after, err := SumCounters(objs.Counters)
	if err != nil {
		t.Fatal(err)
	}
	if got := after["strict_refused"] - before["strict_refused"]; got != 2 {
		t.Errorf("strict_refused counted %d for 2 refusals", got)
	}
	if got := after["strict_event_lost"]; got != 0 {
		t.Errorf("strict_event_lost %d with an empty ring buffer", got)
	}
	for _, port := range []uint16{9999, 80} {
		ev, err := events.Read()
		if err != nil {
			t.Fatal(err)
		}
		if ev.Destination() != netip.AddrPortFrom(podIP, port) || ev.Source().Addr() != podIP || ev.Source().Port() == 0 || ev.Family != syscall.AF_INET {
			t.Errorf("event %+v (from %s to %s), want from 10.1.2.4 to port %d", ev, ev.Source(), ev.Destination(), port)
		}
	}
	// No accept anywhere for the refused ones: the app saw only the 127.0.0.6 hop.
	for name, ln := range map[string]*net.TCPListener{"inbound": inbound, "app": app} {
		ln.SetDeadline(time.Now().Add(100 * time.Millisecond))
		if s, err := ln.Accept(); err == nil {
			s.Close()
			t.Errorf("the %s listener accepted a refused connection", name)
		}
	}

	// Plaintext from the node's own address (kubelet's probes) passes STRICT once the
	// address is in node_addrs, to the inbound listener (not the app), and is refused
	// again when it is not.
	addAddr(t, pod, "10.1.2.1/32")
	node := netip.MustParseAddr("10.1.2.1")
	fromNode := func() error {
		c, took, err := dialFrom("10.1.2.1", "10.1.2.4:9999")
		if err != nil {
			if !errors.Is(err, syscall.ECONNREFUSED) {
				t.Fatalf("plaintext from the node: %v after %s, want connection refused or accepted", err, took)
			}
			return err
		}
		defer c.Close()
		inbound.SetDeadline(time.Now().Add(5 * time.Second))
		s, err := inbound.Accept()
		if err != nil {
			t.Fatalf("plaintext from the node connected but the inbound listener did not accept it: %v", err)
		}
		s.Close()
		return nil
	}
	if err := fromNode(); err == nil {
		t.Error("plaintext from 10.1.2.1 passed STRICT before it was a node address")
	}
	if err := objs.SetNodeAddrs([]netip.Addr{node, netip.MustParseAddr("::ffff:10.9.9.9"), {}}); err != nil {
		t.Fatal(err)
	}
	if got, err := objs.NodeAddrEntries(); err != nil || len(got) != 2 || got[0] != node || got[1] != netip.MustParseAddr("10.9.9.9") {
		t.Fatalf("node_addrs = %v, %v; want [10.1.2.1 10.9.9.9]", got, err)
	}
	if err := fromNode(); err != nil {
		t.Errorf("plaintext from the node's address under STRICT: %v", err)
	}
	refused("10.1.2.4:9999") // from the pod's own address: still refused
	if err := objs.SetNodeAddrs(nil); err != nil {
		t.Fatal(err)
	}
	if err := fromNode(); err == nil {
		t.Error("plaintext from 10.1.2.1 passed STRICT after it left node_addrs")
	}

	if err := objs.SetStrictPorts(nil); err != nil {
		t.Fatal(err)
	}
	if got, err := objs.StrictPortEntries(); err != nil || len(got) != 0 {
		t.Fatalf("strict_ports after clearing: %v, %v", got, err)
	}
	accepts(inbound, "10.1.2.4:9999") // PERMISSIVE again
}

// TestSetStrictPortsFull checks that a set larger than strict_ports fails with
// ErrStrictFull and leaves the modes in force as they were.
func TestSetStrictPortsFull(t *testing.T) {
	privileged.Require(t)
	objs, err := Load(Config{AgentMark: mesh.DefaultMark, Ports: mesh.DefaultPorts(), MaxPods: 8}, "")
	if err != nil {
		t.Fatal(err)
	}
	defer objs.Close()
	ip := netip.MustParseAddr("10.1.2.4")
	first := []StrictPort{{IP: ip, Mode: MTLSStrict}}
	if err := objs.SetStrictPorts(first); err != nil {
		t.Fatal(err)
	}
	var big []StrictPort
	for p := range int(objs.StrictPorts.MaxEntries()) + 1 {
		big = append(big, StrictPort{IP: ip, Port: uint16(p + 1), Mode: MTLSPermissive})
	}
	if err := objs.SetStrictPorts(big); !errors.Is(err, ErrStrictFull) {
		t.Fatalf("oversized set: %v, want ErrStrictFull", err)
	}
	got, err := objs.StrictPortEntries()
	if err != nil || len(got) != 1 || got[0] != first[0] {
		t.Fatalf("after a refused set strict_ports holds %v (%v), want %v", got, err, first)
	}
}

// skLookupCtx is struct bpf_sk_lookup as BPF_PROG_RUN takes it (uapi layout,
// addresses and remote_port in network order, local_port in host order).
type skLookupCtx struct {
	Cookie         uint64
	Family         uint32
	Protocol       uint32
	RemoteIP4      uint32
	RemoteIP6      [4]uint32
	RemotePort     uint16
	_              uint16
	LocalIP4       uint32
	LocalIP6       [4]uint32
	LocalPort      uint32
	IngressIfindex uint32
	_              uint32
}

func v4ctx(src netip.AddrPort, dst netip.AddrPort) skLookupCtx {
	s, d := src.Addr().As4(), dst.Addr().As4()
	sp := [2]byte{byte(src.Port() >> 8), byte(src.Port())}
	return skLookupCtx{
		Family: syscall.AF_INET, Protocol: syscall.IPPROTO_TCP,
		RemoteIP4:  binary.LittleEndian.Uint32(s[:]),
		RemotePort: binary.LittleEndian.Uint16(sp[:]),
		LocalIP4:   binary.LittleEndian.Uint32(d[:]),
		LocalPort:  uint32(dst.Port()),
	}
}

// TestSkLookupStrictProgRun runs ferry_sk_lookup with BPF_PROG_RUN on crafted
// lookups: the verdict for each kind of source and port under STRICT and its
// per-port override, without a namespace.
func TestSkLookupStrictProgRun(t *testing.T) {
	privileged.Require(t)
	objs, err := Load(Config{AgentMark: mesh.DefaultMark, Ports: mesh.DefaultPorts(), MaxPods: 8}, "")
	if err != nil {
		t.Fatal(err)
	}
	defer objs.Close()
	pod := netip.MustParseAddr("10.1.2.4")
	if err := objs.SetStrictPorts([]StrictPort{{IP: pod, Mode: MTLSStrict}, {IP: pod, Port: 8081, Mode: MTLSPermissive}}); err != nil {
		t.Fatal(err)
	}
	// No inbound listener is registered here, so plaintext that STRICT lets by is
	// refused too, as for a pod whose agent is not serving it; the counters say
	// which rule refused.
	const skDrop, skPass = 0, 1
	for _, tc := range []struct {
		name     string
		src, dst string
		want     uint32
		counter  string // the counter the lookup adds to, "" for none
	}{
		{"plaintext to a STRICT port", "10.1.9.9:40000", "10.1.2.4:8080", skDrop, "strict_refused"},
		{"the PERMISSIVE override", "10.1.9.9:40000", "10.1.2.4:8081", skDrop, "inbound_no_listener"},
		{"the tunnel port", "10.1.9.9:40000", "10.1.2.4:15008", skPass, ""},
		{"the agent's hop from 127.0.0.6", "127.0.0.6:40000", "10.1.2.4:8080", skPass, ""},
		{"another pod, no entry", "10.1.9.9:40000", "10.1.2.5:8080", skDrop, "inbound_no_listener"},
	} {
		before, err := SumCounters(objs.Counters)
		if err != nil {
			t.Fatal(err)
		}
		ctx := v4ctx(netip.MustParseAddrPort(tc.src), netip.MustParseAddrPort(tc.dst))
		got, err := objs.FerrySkLookup.Run(&ebpf.RunOptions{Context: ctx})
		if err != nil {
			privileged.Missing(t, "BPF_PROG_RUN for sk_lookup: %v", err)
			return
		}
		if got != tc.want {
			t.Errorf("%s (%s -> %s): verdict %d, want %d", tc.name, tc.src, tc.dst, got, tc.want)
		}
		after, err := SumCounters(objs.Counters)
		if err != nil {
			t.Fatal(err)
		}
		for _, name := range []string{"strict_refused", "inbound_no_listener"} {
			want := before[name]
			if name == tc.counter {
				want++
			}
			if after[name] != want {
				t.Errorf("%s: counter %s %d, want %d", tc.name, name, after[name], want)
			}
		}
	}
}
