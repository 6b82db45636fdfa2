package bpf

import (
	"bufio"
	"context"
	"crypto/sha256"
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
	"strings"
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
		return childPair()
	}
	return fmt.Errorf("unknown child mode %q", mode)
}

func childPair() error {
	lc := listener.Config()
	ln, err := lc.Listen(context.Background(), "tcp4", "127.0.0.1:0")
	if err != nil {
		return err
	}
	defer ln.Close()
	c, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		return err
	}
	defer c.Close()
	s, err := ln.Accept()
	if err != nil {
		return err
	}
	defer s.Close()
	fmt.Println("pair", c.LocalAddr(), s.LocalAddr())
	in := bufio.NewReader(os.Stdin)
	if _, err := in.ReadString('\n'); err != nil {
		return err
	}

	data := make([]byte, pairBytes)
	rng := rand.NewChaCha8([32]byte{1})
	rng.Read(data)
	sent := sha256.Sum256(data)
	errc := make(chan error, 1)
	go func() {
		// Plain Write, never io.Copy between TCPConns: splice can read 0 bytes from
		// sockets whose data sk_msg redirects.
		_, err := c.Write(data)
		errc <- err
	}()
	h := sha256.New()
	buf := make([]byte, 64<<10)
	n := 0
	s.SetReadDeadline(time.Now().Add(20 * time.Second))
	for n < pairBytes {
		m, err := s.Read(buf)
		h.Write(buf[:m])
		n += m
		if err != nil {
			return fmt.Errorf("read after %d bytes: %w", n, err)
		}
	}
	if err := <-errc; err != nil {
		return err
	}
	fmt.Println("sum", hex.EncodeToString(sent[:]), hex.EncodeToString(h.Sum(nil)), n)
	io.Copy(io.Discard, in)
	return nil
}
