package bpf

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/ferrymesh/ferry/agent/netns"
	"github.com/ferrymesh/ferry/api/mesh"
	"github.com/ferrymesh/ferry/internal/listener"
	"github.com/ferrymesh/ferry/internal/privileged"
	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

const (
	testMark  = int(mesh.DefaultMark)
	childEnv  = "FERRY_BPF_TEST_CHILD"
	pairBytes = 10 << 20
)

func TestMain(m *testing.M) {
	if mode := os.Getenv(childEnv); mode != "" {
		if err := child(mode, os.Args[len(os.Args)-1]); err != nil {
			fmt.Println("error", err)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func TestLoadVerifier(t *testing.T) {
	privileged.Require(t)
	for _, fast := range []bool{false, true} {
		t.Run(fmt.Sprintf("fast_path=%v", fast), func(t *testing.T) {
			objs, err := Load(Config{AgentMark: mesh.DefaultMark, Ports: mesh.DefaultPorts(), FastPath: fast, MaxPods: 110}, "")
			if err != nil {
				t.Fatal(err)
			}
			defer objs.Close()
			progs := map[string]*ebpf.Program{
				ProgConnect4: objs.FerryConnect4, ProgConnect6: objs.FerryConnect6,
				ProgSockops: objs.FerrySockops, ProgSkMsg: objs.FerrySkMsg, ProgSkLookup: objs.FerrySkLookup,
			}
			for name, p := range progs {
				info, err := p.Info()
				if err != nil {
					t.Fatalf("%s info: %v", name, err)
				}
				if info.Name != name {
					t.Errorf("program name %q, want %q", info.Name, name)
				}
			}
			sizes := MapSizes(110)
			if got := objs.EnrolledNetns.MaxEntries(); got != sizes[MapEnrolledNetns] || got != 110 {
				t.Errorf("enrolled_netns max_entries %d, want 110", got)
			}
			if got := objs.OrigDst.MaxEntries(); got != 110*1024 {
				t.Errorf("orig_dst max_entries %d, want %d", got, 110*1024)
			}
		})
	}
}

func TestMapSizesFloor(t *testing.T) {
	s := MapSizes(1)
	if s[MapOrigDst] != 16384 || s[MapLocalSocks] != 16384 || s[MapExcludedPorts] != 64 || s[MapEnrolledNetns] != 1 {
		t.Fatalf("MapSizes(1) = %v", s)
	}
}

func TestPodInfoRoundTrip(t *testing.T) {
	if got := NewPodInfo("default/web-0").String(); got != "default/web-0" {
		t.Fatalf("got %q", got)
	}
	long := strings.Repeat("x", 100)
	if got := NewPodInfo(long).String(); got != long[:PodNameLen-1] {
		t.Fatalf("long name not truncated to %d: %q", PodNameLen-1, got)
	}
}

// env is one test setup: loaded objects and a cgroup with the capture programs.
type env struct {
	objs *Objects
	cg   *os.File
}

func newEnv(t *testing.T, fast bool) *env {
	t.Helper()
	privileged.Require(t)
	objs, err := Load(Config{AgentMark: mesh.DefaultMark, Ports: mesh.DefaultPorts(), FastPath: fast, MaxPods: 8}, "")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { objs.Close() })

	dir := filepath.Join(cgroup2Mount(t), fmt.Sprintf("ferry-test-%d-%d", os.Getpid(), rand.Int()))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(dir) })
	cg, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cg.Close() })
	for _, a := range []struct {
		prog   *ebpf.Program
		attach ebpf.AttachType
	}{
		{objs.FerryConnect4, ebpf.AttachCGroupInet4Connect},
		{objs.FerryConnect6, ebpf.AttachCGroupInet6Connect},
		{objs.FerrySockops, ebpf.AttachCGroupSockOps},
	} {
		l, err := link.AttachCgroup(link.CgroupOptions{Path: dir, Attach: a.attach, Program: a.prog})
		if err != nil {
			t.Fatalf("attach %v: %v", a.attach, err)
		}
		t.Cleanup(func() { l.Close() })
	}
	if fast {
		l, err := link.AttachRawLink(link.RawLinkOptions{Target: objs.LocalSocks.FD(), Program: objs.FerrySkMsg, Attach: ebpf.AttachSkMsgVerdict})
		if err != nil {
			t.Fatalf("attach sk_msg: %v", err)
		}
		t.Cleanup(func() { l.Close() })
	}
	return &env{objs: objs, cg: cg}
}

func cgroup2Mount(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		pre, post, ok := strings.Cut(line, " - ")
		if ok && strings.HasPrefix(post, "cgroup2 ") {
			return strings.Fields(pre)[4]
		}
	}
	t.Fatal("no cgroup2 mount in /proc/self/mountinfo")
	return ""
}

func cookie(t *testing.T, h *netns.Handle) uint64 {
	t.Helper()
	c, err := h.Cookie()
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func addAddr(t *testing.T, h *netns.Handle, cidr string) {
	t.Helper()
	nl, err := netlink.NewHandleAt(vnetns.NsHandle(h.FD()))
	if err != nil {
		t.Fatal(err)
	}
	defer nl.Close()
	lo, err := nl.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	a, err := netlink.ParseAddr(cidr)
	if err != nil {
		t.Fatal(err)
	}
	if err := nl.AddrAdd(lo, a); err != nil {
		t.Fatalf("add %s: %v", cidr, err)
	}
}

// listen opens a TCP listener inside h, with Multipath TCP off as every Ferry listener.
func listen(t *testing.T, h *netns.Handle, network, addr string) *net.TCPListener {
	t.Helper()
	var ln net.Listener
	err := h.Do(func() error {
		lc := listener.Config()
		var err error
		ln, err = lc.Listen(context.Background(), network, addr)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln.(*net.TCPListener)
}

// proc is a child process running inside a netns and the test cgroup.
type proc struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	out   *bufio.Reader
}

func startChild(t *testing.T, e *env, h *netns.Handle, mode, arg string) *proc {
	t.Helper()
	cmd := exec.Command("/proc/self/exe", "-test.run=^$", arg)
	cmd.Env = append(os.Environ(), childEnv+"="+mode)
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(e.cg.Fd())}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	// The fork happens on the thread Do locked inside h, so the child starts there.
	if err := h.Do(cmd.Start); err != nil {
		t.Fatal(err)
	}
	p := &proc{cmd: cmd, stdin: stdin, out: bufio.NewReader(stdout)}
	t.Cleanup(func() {
		stdin.Close()
		cmd.Wait()
	})
	return p
}

func (p *proc) line(t *testing.T) []string {
	t.Helper()
	s, err := p.out.ReadString('\n')
	if err != nil {
		t.Fatalf("read child: %v", err)
	}
	f := strings.Fields(s)
	if len(f) == 0 || f[0] == "error" {
		t.Fatalf("child: %s", s)
	}
	return f
}

// dial runs a child that connects to addr (with SO_MARK mark unless 0) and returns
// the child's local address; the connection stays open until the test ends.
func dial(t *testing.T, e *env, h *netns.Handle, addr string, mark int) netip.AddrPort {
	t.Helper()
	p := startChild(t, e, h, fmt.Sprintf("dial:%d", mark), addr)
	f := p.line(t)
	return netip.MustParseAddrPort(f[1])
}

// expectAccept accepts one connection on ln and checks it comes from client.
func expectAccept(t *testing.T, ln *net.TCPListener, client netip.AddrPort) *net.TCPConn {
	t.Helper()
	ln.SetDeadline(time.Now().Add(5 * time.Second))
	c, err := ln.AcceptTCP()
	if err != nil {
		t.Fatalf("accept on %s: %v", ln.Addr(), err)
	}
	t.Cleanup(func() { c.Close() })
	if got := c.RemoteAddr().(*net.TCPAddr).AddrPort(); got.Port() != client.Port() {
		t.Fatalf("listener %s accepted %s, want the client %s", ln.Addr(), got, client)
	}
	return c
}

func TestConnectCapture(t *testing.T) {
	e := newEnv(t, false)
	enrolled := privileged.NewNetns(t)
	other := privileged.NewNetns(t)
	cookieA := cookie(t, enrolled)
	if err := e.objs.Enroll(cookieA, "default/client"); err != nil {
		t.Fatal(err)
	}
	if err := e.objs.SetExcludedPorts([]uint16{8080}); err != nil {
		t.Fatal(err)
	}

	type lns struct{ capture, capture6, orig, orig6, excluded *net.TCPListener }
	setup := func(h *netns.Handle) lns {
		addAddr(t, h, "10.1.2.3/32")
		addAddr(t, h, "fd00::3/128")
		return lns{
			capture:  listen(t, h, "tcp4", "127.0.0.1:15001"),
			capture6: listen(t, h, "tcp6", "[::1]:15001"),
			orig:     listen(t, h, "tcp4", "0.0.0.0:80"),
			orig6:    listen(t, h, "tcp6", "[::]:80"),
			excluded: listen(t, h, "tcp4", "0.0.0.0:8080"),
		}
	}
	a := setup(enrolled)
	b := setup(other)

	t.Run("enrolled connect4 is captured", func(t *testing.T) {
		client := dial(t, e, enrolled, "10.1.2.3:80", 0)
		expectAccept(t, a.capture, client)
		got, err := e.objs.TakeOrigDst(cookieA, client.Port())
		if err != nil {
			t.Fatal(err)
		}
		if want := netip.MustParseAddrPort("10.1.2.3:80"); got != want {
			t.Fatalf("orig dst %s, want %s", got, want)
		}
		if _, err := e.objs.TakeOrigDst(cookieA, client.Port()); !errors.Is(err, ErrNoOrigDst) {
			t.Fatalf("second take: %v, want ErrNoOrigDst", err)
		}
		pending, err := e.objs.PendingOrigDsts()
		if err != nil || len(pending) != 0 {
			t.Fatalf("sock_orig_dst not emptied on established: %v %v", pending, err)
		}
	})
	t.Run("enrolled connect6 is captured", func(t *testing.T) {
		client := dial(t, e, enrolled, "[fd00::3]:80", 0)
		expectAccept(t, a.capture6, client)
		got, err := e.objs.TakeOrigDst(cookieA, client.Port())
		if err != nil {
			t.Fatal(err)
		}
		if want := netip.MustParseAddrPort("[fd00::3]:80"); got != want {
			t.Fatalf("orig dst %s, want %s", got, want)
		}
	})
	t.Run("agent mark is not captured", func(t *testing.T) {
		client := dial(t, e, enrolled, "10.1.2.3:80", testMark)
		expectAccept(t, a.orig, client)
	})
	t.Run("not enrolled is not captured", func(t *testing.T) {
		client := dial(t, e, other, "10.1.2.3:80", 0)
		expectAccept(t, b.orig, client)
		client6 := dial(t, e, other, "[fd00::3]:80", 0)
		expectAccept(t, b.orig6, client6)
	})
	t.Run("loopback is not captured", func(t *testing.T) {
		client := dial(t, e, enrolled, "127.0.0.1:80", 0)
		expectAccept(t, a.orig, client)
		client6 := dial(t, e, enrolled, "[::1]:80", 0)
		expectAccept(t, a.orig6, client6)
	})
	t.Run("excluded port is not captured", func(t *testing.T) {
		client := dial(t, e, enrolled, "10.1.2.3:8080", 0)
		expectAccept(t, a.excluded, client)
	})
}

// inboundListener opens a 15006 listener in pod and puts it in inbound_listeners
// under podIP.
func inboundListener(t *testing.T, objs *Objects, pod *netns.Handle, podIP netip.Addr) *net.TCPListener {
	t.Helper()
	ln := listen(t, pod, "tcp4", "127.0.0.1:15006")
	raw, err := ln.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var setErr error
	if err := raw.Control(func(fd uintptr) { setErr = objs.SetInboundListener(podIP, int(fd)) }); err != nil {
		t.Fatal(err)
	}
	if setErr != nil {
		t.Fatal(setErr)
	}
	return ln
}

func TestSkLookupSteersInbound(t *testing.T) {
	privileged.Require(t)
	objs, err := Load(Config{AgentMark: mesh.DefaultMark, Ports: mesh.DefaultPorts(), MaxPods: 8}, "")
	if err != nil {
		t.Fatal(err)
	}
	defer objs.Close()
	pod := privileged.NewNetns(t)
	addAddr(t, pod, "10.1.2.4/32")
	inbound := inboundListener(t, objs, pod, netip.MustParseAddr("10.1.2.4"))
	ls, err := objs.ListInboundListeners()
	if err != nil || len(ls) != 1 || ls[0].PodIP != netip.MustParseAddr("10.1.2.4") {
		t.Fatalf("inbound_listeners = %v, %v", ls, err)
	}
	l, err := link.AttachNetNs(pod.FD(), objs.FerrySkLookup)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()

	dialFrom := func(src, dst string) (net.Conn, error) {
		var c net.Conn
		err := pod.Do(func() error {
			d := net.Dialer{Timeout: 2 * time.Second}
			if src != "" {
				d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(src)}
			}
			var err error
			c, err = d.Dial("tcp4", dst)
			return err
		})
		return c, err
	}

	c, err := dialFrom("", "10.1.2.4:9999")
	if err != nil {
		t.Fatalf("dial pod IP: %v", err)
	}
	defer c.Close()
	inbound.SetDeadline(time.Now().Add(5 * time.Second))
	s, err := inbound.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if got := s.LocalAddr().String(); got != "10.1.2.4:9999" {
		t.Fatalf("steered connection's local address %s, want the original 10.1.2.4:9999", got)
	}
	if got := s.RemoteAddr().String(); got != c.LocalAddr().String() {
		t.Fatalf("steered connection from %s, want %s", got, c.LocalAddr())
	}

	if c, err := dialFrom("127.0.0.6", "10.1.2.4:9999"); err == nil {
		c.Close()
		t.Fatal("connection from 127.0.0.6 was steered, want refused")
	} else if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("from 127.0.0.6: %v, want connection refused", err)
	}
	if c, err := dialFrom("", "10.1.2.4:15008"); err == nil {
		c.Close()
		t.Fatal("connection to the tunnel port was steered, want refused")
	}

	// The pod's listener gone (its agent restarting): a connection to the
	// app's port is refused, never let through to the app past the policies.
	app := listen(t, pod, "tcp4", "10.1.2.4:9998")
	inbound.Close()
	if c, err := dialFrom("", "10.1.2.4:9998"); err == nil {
		c.Close()
		t.Fatal("with no inbound listener, a connection reached the app, want refused")
	}
	app.SetDeadline(time.Now().Add(100 * time.Millisecond))
	if s, err := app.Accept(); err == nil {
		s.Close()
		t.Fatal("the app accepted a connection while the pod had no inbound listener")
	}
}

func TestFastPathLocalPair(t *testing.T) {
	e := newEnv(t, true)
	h := privileged.NewNetns(t)
	c := cookie(t, h)
	if err := e.objs.Enroll(c, "default/pair"); err != nil {
		t.Fatal(err)
	}
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		t.Fatal(err)
	}
	defer stats.Close()

	p := startChild(t, e, h, "pair", "-")
	f := p.line(t) // pair CLIENT SERVER
	client, server := netip.MustParseAddrPort(f[1]), netip.MustParseAddrPort(f[2])
	socks, err := e.objs.LocalSockets()
	if err != nil {
		t.Fatal(err)
	}
	want := map[[2]netip.AddrPort]bool{{client, server}: true, {server, client}: true}
	for _, s := range socks {
		if s.NetnsCookie == c && want[[2]netip.AddrPort{s.Local, s.Remote}] {
			delete(want, [2]netip.AddrPort{s.Local, s.Remote})
		}
	}
	if len(want) != 0 {
		t.Fatalf("local_socks %v lacks %v", socks, want)
	}

	if _, err := io.WriteString(p.stdin, "go\n"); err != nil {
		t.Fatal(err)
	}
	f = p.line(t) // sum SENT RECEIVED N
	if f[1] != f[2] || f[3] != fmt.Sprint(pairBytes) {
		t.Fatalf("sent sha256 %s, received %s, %s bytes; want equal and %d", f[1], f[2], f[3], pairBytes)
	}
	st, err := e.objs.FerrySkMsg.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if st.RunCount == 0 {
		t.Fatal("sk_msg never ran: the pair's data did not take the fast path")
	}
}

// A sender much faster than its reader, on a pair in the fast path: 256 MiB arrive
// intact and the write never fails (with an unbounded sk_msg ingress redirect it
// failed with ENOMEM, or the kernel held all of it for the sleeping reader); while
// the reader sleeps, the sender is held back: the kernel buffers a few MiB for it,
// as for plain TCP, not the whole stream. The same with the fast path off, for the
// figures side by side.
func TestFastPathBulkBackPressure(t *testing.T) {
	const n = 256 << 20
	for _, fast := range []bool{true, false} {
		t.Run(fmt.Sprintf("fast_path=%v", fast), func(t *testing.T) {
			e, p := startPairChild(t, fast, "bulk", fmt.Sprintf("pair:%d:%s", n, time.Second))
			f := p.line(t) // sum SENT RECEIVED N AHEAD SECONDS
			if len(f) != 6 || f[1] != f[2] || f[3] != fmt.Sprint(n) {
				t.Fatalf("child: %v; want equal sums and %d bytes", f, n)
			}
			ahead, _ := strconv.ParseInt(f[4], 10, 64)
			secs, _ := strconv.ParseFloat(f[5], 64)
			// TCP buffers at most its send buffer (tcp_wmem max 4 MiB here) plus the
			// receiver's window; the fast path adds at most its queue bound.
			if ahead > 32<<20 {
				t.Fatalf("the sender got %d MiB ahead of a sleeping reader: no back-pressure", ahead>>20)
			}
			st, err := e.objs.FerrySkMsg.Stats()
			if err != nil {
				t.Fatal(err)
			}
			if fast && st.RunCount == 0 {
				t.Fatal("sk_msg never ran: the pair was not in the fast path")
			}
			t.Logf("fast path %v: 256 MiB intact, sender %.1f MiB ahead of the sleeping reader, %.0f MiB/s (including the 1 s sleep), sk_msg ran %d times",
				fast, float64(ahead)/(1<<20), float64(n)/(1<<20)/secs, st.RunCount)
		})
	}
}

// startPairChild starts a child in mode in a fresh enrolled netns (pod name) with
// BPF run statistics on, waits for its "pair" line and tells it to go.
func startPairChild(t *testing.T, fast bool, pod, mode string) (*env, *proc) {
	t.Helper()
	e := newEnv(t, fast)
	h := privileged.NewNetns(t)
	if err := e.objs.Enroll(cookie(t, h), "default/"+pod); err != nil {
		t.Fatal(err)
	}
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stats.Close() })
	p := startChild(t, e, h, mode, "-")
	p.line(t) // pair CLIENT SERVER
	if _, err := io.WriteString(p.stdin, "go\n"); err != nil {
		t.Fatal(err)
	}
	return e, p
}

// Request/response on a pair with the fast path on and off: every response is the
// right one (the child checks each byte), with the latency logged for comparison.
func TestFastPathRequestResponse(t *testing.T) {
	for _, fast := range []bool{true, false} {
		t.Run(fmt.Sprintf("fast_path=%v", fast), func(t *testing.T) {
			e, p := startPairChild(t, fast, "rr", "rr:20000")
			f := p.line(t) // rr N P50 P99
			if len(f) != 4 || f[1] != "20000" {
				t.Fatalf("child: %v", f)
			}
			st, err := e.objs.FerrySkMsg.Stats()
			if err != nil {
				t.Fatal(err)
			}
			if fast && st.RunCount < 20000 {
				t.Fatalf("sk_msg ran %d times for 40000 messages: the pair was not in the fast path", st.RunCount)
			}
			t.Logf("fast path %v: 20000 exchanges correct, p50 %s µs, p99 %s µs, sk_msg ran %d times", fast, f[2], f[3], st.RunCount)
		})
	}
}

// child runs in a test's netns and cgroup; it reports on stdout, one line per event.
func child(mode, arg string) error {
	switch {
	case strings.HasPrefix(mode, "dial:"):
		var mark int
		fmt.Sscan(strings.TrimPrefix(mode, "dial:"), &mark)
		d := net.Dialer{Timeout: 3 * time.Second}
		if mark != 0 {
			d.Control = func(_, _ string, c syscall.RawConn) error {
				var serr error
				err := c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, mark) })
				return errors.Join(err, serr)
			}
		}
		c, err := d.Dial("tcp", arg)
		if err != nil {
			return err
		}
		defer c.Close()
		fmt.Println("local", c.LocalAddr())
		io.Copy(io.Discard, os.Stdin)
		return nil
	case mode == "pair":
		return childPair(pairBytes, 0)
	case strings.HasPrefix(mode, "pair:"): // pair:BYTES:PAUSE
		f := strings.Split(mode, ":")
		if len(f) != 3 {
			return fmt.Errorf("mode %q: want pair:BYTES:PAUSE", mode)
		}
		n, err := strconv.Atoi(f[1])
		if err != nil {
			return fmt.Errorf("mode %q: %w", mode, err)
		}
		pause, err := time.ParseDuration(f[2])
		if err != nil {
			return fmt.Errorf("mode %q: %w", mode, err)
		}
		return childPair(n, pause)
	case strings.HasPrefix(mode, "rr:"):
		var n int
		if _, err := fmt.Sscanf(mode, "rr:%d", &n); err != nil {
			return fmt.Errorf("mode %q: %w", mode, err)
		}
		return childRR(n)
	}
	return fmt.Errorf("unknown child mode %q", mode)
}

// pairConns opens a loopback connection inside the child's netns (and cgroup, so
// sockops sees it), prints "pair CLIENT SERVER" and waits for "go" on stdin.
func pairConns() (c, s net.Conn, in *bufio.Reader, closeAll func(), err error) {
	lc := listener.Config()
	ln, err := lc.Listen(context.Background(), "tcp4", "127.0.0.1:0")
	if err != nil {
		return nil, nil, nil, nil, err
	}
	c, err = net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		ln.Close()
		return nil, nil, nil, nil, err
	}
	s, err = ln.Accept()
	if err != nil {
		ln.Close()
		c.Close()
		return nil, nil, nil, nil, err
	}
	closeAll = func() { s.Close(); c.Close(); ln.Close() }
	fmt.Println("pair", c.LocalAddr(), s.LocalAddr())
	in = bufio.NewReader(os.Stdin)
	if _, err := in.ReadString('\n'); err != nil {
		closeAll()
		return nil, nil, nil, nil, err
	}
	return c, s, in, closeAll, nil
}

// childPair sends n random bytes from the client to the server end after "go" on
// stdin; the reader first sleeps pause, to let a fast sender get ahead. It prints
// "sum SENT RECEIVED N AHEAD SECONDS": AHEAD is how many bytes the sender had
// written when the reader woke (what the kernel buffered for it), SECONDS the time
// from the first write to the last byte read.
func childPair(n int, pause time.Duration) error {
	c, s, in, closeAll, err := pairConns()
	if err != nil {
		return err
	}
	defer closeAll()

	data := make([]byte, n)
	rng := rand.NewChaCha8([32]byte{1})
	rng.Read(data)
	sent := sha256.Sum256(data)
	var written atomic.Int64
	errc := make(chan error, 1)
	start := time.Now()
	go func() {
		// Plain Write, never io.Copy between TCPConns: splice can read 0 bytes from
		// sockets whose data sk_msg redirects. 1 MiB writes, so the progress shows.
		for off := 0; off < n; {
			m, err := c.Write(data[off:min(off+1<<20, n)])
			off += m
			written.Store(int64(off))
			if err != nil {
				errc <- fmt.Errorf("write after %d bytes: %w", off, err)
				return
			}
		}
		errc <- nil
	}()
	time.Sleep(pause)
	ahead := written.Load()
	h := sha256.New()
	buf := make([]byte, 64<<10)
	got := 0
	s.SetReadDeadline(time.Now().Add(60 * time.Second))
	for got < n {
		m, err := s.Read(buf)
		h.Write(buf[:m])
		got += m
		if err != nil {
			return fmt.Errorf("read after %d bytes: %w", got, err)
		}
	}
	secs := time.Since(start).Seconds()
	if err := <-errc; err != nil {
		return err
	}
	fmt.Println("sum", hex.EncodeToString(sent[:]), hex.EncodeToString(h.Sum(nil)), got, ahead, secs)
	io.Copy(io.Discard, in)
	return nil
}

// childRR runs n request/response exchanges over a pair after "go" on stdin: a
// numbered 64-byte request, answered with 1 KiB that repeats its number, checked by
// the client. It prints "rr N P50_US P99_US".
func childRR(n int) error {
	c, s, in, closeAll, err := pairConns()
	if err != nil {
		return err
	}
	defer closeAll()
	errc := make(chan error, 1)
	go func() {
		req := make([]byte, 64)
		resp := make([]byte, 1024)
		for range n {
			if _, err := io.ReadFull(s, req); err != nil {
				errc <- fmt.Errorf("server read: %w", err)
				return
			}
			for i := range resp {
				resp[i] = req[i%8]
			}
			if _, err := s.Write(resp); err != nil {
				errc <- fmt.Errorf("server write: %w", err)
				return
			}
		}
		errc <- nil
	}()
	req := make([]byte, 64)
	resp := make([]byte, 1024)
	lat := make([]time.Duration, 0, n)
	c.SetDeadline(time.Now().Add(60 * time.Second))
	for i := range n {
		binary.BigEndian.PutUint64(req, uint64(i))
		t0 := time.Now()
		if _, err := c.Write(req); err != nil {
			return fmt.Errorf("request %d: %w", i, err)
		}
		if _, err := io.ReadFull(c, resp); err != nil {
			return fmt.Errorf("response %d: %w", i, err)
		}
		lat = append(lat, time.Since(t0))
		for j := range resp {
			if resp[j] != req[j%8] {
				return fmt.Errorf("response %d: byte %d is %#x, want %#x", i, j, resp[j], req[j%8])
			}
		}
	}
	if err := <-errc; err != nil {
		return err
	}
	slices.Sort(lat)
	fmt.Println("rr", n, lat[n/2].Microseconds(), lat[n*99/100].Microseconds())
	io.Copy(io.Discard, in)
	return nil
}
