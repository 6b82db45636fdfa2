package datapath

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
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
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/ferrymesh/ferry/agent/netns"
	"github.com/ferrymesh/ferry/api/mesh"
	"github.com/ferrymesh/ferry/bpf"
	"github.com/ferrymesh/ferry/internal/listener"
	"github.com/ferrymesh/ferry/internal/privileged"
)

const childEnv = "FERRY_DATAPATH_TEST_CHILD"

func TestMain(m *testing.M) {
	if path := os.Getenv(lockChildEnv); path != "" {
		lockChild(path)
	}
	if addr := os.Getenv(childEnv); addr != "" {
		// Child: connect to addr from the netns and cgroup the test started us in.
		c, err := net.DialTimeout("tcp", addr, 3*time.Second)
		if err != nil {
			fmt.Println("error", err)
			os.Exit(0)
		}
		fmt.Println("local", c.LocalAddr())
		io.Copy(io.Discard, os.Stdin)
		c.Close()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func TestFindCgroup2(t *testing.T) {
	const mi = `31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/un\040ified rw,relatime - cgroup2 cgroup2 rw
`
	got, err := FindCgroup2(strings.NewReader(mi))
	if err != nil || got != "/sys/fs/cgroup/un ified" {
		t.Fatalf("FindCgroup2 = %q, %v", got, err)
	}
	if _, err := FindCgroup2(strings.NewReader("31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n")); err == nil {
		t.Fatal("no cgroup2 line: want an error")
	}
}

// --cgroup names the cgroup v2 folder, or on a hybrid host the /sys/fs/cgroup
// above it (what the DaemonSet mounts at /host/sys/fs/cgroup): both attach to the
// v2 hierarchy; a folder that is neither is refused, named.
func TestResolveCgroup(t *testing.T) {
	mnt, err := Cgroup2Mount()
	if err != nil {
		t.Skipf("no cgroup v2 here: %v", err)
	}
	for _, path := range []string{"", mnt} {
		if got, err := ResolveCgroup(path); err != nil || got != mnt {
			t.Errorf("ResolveCgroup(%q) = %q, %v; want %q", path, got, err, mnt)
		}
	}
	if filepath.Base(mnt) == "unified" {
		if got, err := ResolveCgroup(filepath.Dir(mnt)); err != nil || got != mnt {
			t.Errorf("hybrid host: ResolveCgroup(%q) = %q, %v; want %q", filepath.Dir(mnt), got, err, mnt)
		}
	}
	dir := t.TempDir()
	if _, err := ResolveCgroup(dir); err == nil || !strings.Contains(err.Error(), "not a cgroup v2 filesystem") {
		t.Errorf("ResolveCgroup(%s) = %v, want it refused", dir, err)
	}
}

func TestNewValidates(t *testing.T) {
	d, err := New(Config{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if d.cfg.PinDir != DefaultPinDir || d.cfg.Mark != mesh.DefaultMark || d.cfg.Ports != mesh.DefaultPorts() || d.cfg.MaxPods != DefaultMaxPods {
		t.Fatalf("defaults not applied: %+v", d.cfg)
	}
	if _, err := New(Config{PinDir: "relative"}, nil); err == nil {
		t.Fatal("relative pin folder accepted")
	}
	if _, err := d.Enrolled(); err == nil {
		t.Fatal("Enrolled before Start: want an error")
	}
}

func TestInspectMissingState(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "none")
	_, err := DumpMaps(dir)
	if !errors.Is(err, ErrNoState) || !strings.Contains(err.Error(), "is the agent running?") {
		t.Fatalf("DumpMaps on missing state: %v", err)
	}
	if _, err := Programs(dir); !errors.Is(err, ErrNoState) {
		t.Fatalf("Programs on missing state: %v", err)
	}
}

// fixture is a pin folder and cgroup private to one test.
type fixture struct {
	pinDir, cgroup string
}

func newFixture(t *testing.T) fixture {
	t.Helper()
	privileged.Require(t)
	mnt, err := Cgroup2Mount()
	if err != nil {
		t.Fatal(err)
	}
	suffix := fmt.Sprintf("ferry-test-%d-%d", os.Getpid(), rand.Int())
	f := fixture{pinDir: filepath.Join(bpffsRoot, suffix), cgroup: filepath.Join(mnt, suffix)}
	if err := os.Mkdir(f.cgroup, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		Cleanup(f.pinDir, f.cgroup)
		os.Remove(f.cgroup)
	})
	return f
}

func (f fixture) start(t *testing.T, fast bool) *Datapath {
	t.Helper()
	d, err := New(Config{PinDir: f.pinDir, CgroupPath: f.cgroup, MaxPods: 16, FastPath: fast, ExcludedPorts: []uint16{9090}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	return d
}

func mapID(t *testing.T, m *ebpf.Map) ebpf.MapID {
	t.Helper()
	info, err := m.Info()
	if err != nil {
		t.Fatal(err)
	}
	id, _ := info.ID()
	return id
}

func TestRestartAdoptsPins(t *testing.T) {
	f := newFixture(t)
	pod := privileged.NewNetns(t)

	d1 := f.start(t, true)
	cookie, adopted, err := d1.Enroll(pod, "default/web-0")
	if err != nil {
		t.Fatal(err)
	}
	if adopted {
		t.Error("a first enrollment reported as adopted")
	}
	ids1 := map[string]ebpf.MapID{}
	for name, m := range objMaps(d1) {
		ids1[name] = mapID(t, m)
	}
	links1 := linkIDs(t, f.pinDir)
	if len(links1) != 5 { // connect4, connect6, sockops, sk_msg, sk_lookup_<cookie>
		t.Fatalf("pinned links %v, want 5", links1)
	}
	if err := d1.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}

	// Between the two runs the links live on through their pins alone.
	if got := linkIDs(t, f.pinDir); !equalMaps(got, links1) {
		t.Fatalf("links after Close %v, want %v", got, links1)
	}

	d2 := f.start(t, true)
	defer d2.Stop(context.Background())
	for name, m := range objMaps(d2) {
		if id := mapID(t, m); id != ids1[name] {
			t.Errorf("map %s id %d after restart, want the adopted %d", name, id, ids1[name])
		}
	}
	if got := linkIDs(t, f.pinDir); !equalMaps(got, links1) {
		t.Errorf("links after restart %v, want the adopted %v", got, links1)
	}
	enrolled, err := d2.Enrolled()
	if err != nil {
		t.Fatal(err)
	}
	if enrolled[cookie] != "default/web-0" {
		t.Fatalf("enrolled after restart %v, want %d → default/web-0", enrolled, cookie)
	}
	// Re-enrolling an adopted pod reuses its link.
	if _, adopted, err := d2.Enroll(pod, "default/web-0"); err != nil || !adopted {
		t.Fatalf("re-enroll after restart: adopted %v, %v", adopted, err)
	}
	if got := linkIDs(t, f.pinDir); !equalMaps(got, links1) {
		t.Errorf("links after re-enroll %v, want %v", got, links1)
	}

	if err := d2.Unenroll(cookie); err != nil {
		t.Fatal(err)
	}
	if enrolled, _ := d2.Enrolled(); len(enrolled) != 0 {
		t.Fatalf("enrolled after Unenroll: %v", enrolled)
	}
	if _, err := os.Stat(filepath.Join(f.pinDir, linksDir, fmt.Sprintf("sk_lookup_%d", cookie))); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("sk_lookup pin after Unenroll: %v", err)
	}
}

func TestRestartWithoutFastPathDetachesSkMsg(t *testing.T) {
	f := newFixture(t)
	d := f.start(t, true)
	d.Stop(context.Background())
	d = f.start(t, false)
	defer d.Stop(context.Background())
	if _, ok := linkIDs(t, f.pinDir)[linkSkMsg]; ok {
		t.Fatal("sk_msg link still pinned with the fast path off")
	}
}

func objMaps(d *Datapath) map[string]*ebpf.Map {
	o := d.objs
	return map[string]*ebpf.Map{
		bpf.MapEnrolledNetns: o.EnrolledNetns, bpf.MapExcludedPorts: o.ExcludedPorts,
		bpf.MapInboundListeners: o.InboundListeners, bpf.MapLocalSocks: o.LocalSocks,
		bpf.MapOrigDst: o.OrigDst, bpf.MapSockOrigDst: o.SockOrigDst,
	}
}

// linkIDs returns pin name → link id for the pinned links, via Programs.
func linkIDs(t *testing.T, pinDir string) map[string]uint32 {
	t.Helper()
	progs, err := Programs(pinDir)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]uint32{}
	for _, p := range progs {
		out[filepath.Base(p.Pin)] = p.LinkID
	}
	return out
}

func equalMaps[K comparable, V comparable](a, b map[K]V) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if bv, ok := b[k]; !ok || bv != v {
			return false
		}
	}
	return true
}

func TestOrigDstRoundTrip(t *testing.T) {
	f := newFixture(t)
	d := f.start(t, false)
	defer d.Stop(context.Background())
	pod := privileged.NewNetns(t)
	cookie, _, err := d.Enroll(pod, "default/client")
	if err != nil {
		t.Fatal(err)
	}

	var ln net.Listener
	if err := pod.Do(func() error {
		lc := listener.Config()
		var err error
		ln, err = lc.Listen(context.Background(), "tcp4", "127.0.0.1:15001")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()

	client := dialChild(t, f, pod, "10.1.2.3:80")
	ln.(*net.TCPListener).SetDeadline(time.Now().Add(5 * time.Second))
	c, err := ln.Accept()
	if err != nil {
		t.Fatalf("captured connection not accepted on 15001: %v", err)
	}
	defer c.Close()
	port := uint16(c.RemoteAddr().(*net.TCPAddr).Port)
	if port != client.Port() {
		t.Fatalf("accepted from port %d, want the client's %d", port, client.Port())
	}

	// The CLI's view, before the proxy takes the entry.
	dump, err := DumpMaps(f.pinDir)
	if err != nil {
		t.Fatal(err)
	}
	want := OrigDst{NetnsCookie: cookie, Pod: "default/client", ClientPort: port, Dst: netip.MustParseAddrPort("10.1.2.3:80")}
	if len(dump.OrigDsts) != 1 || dump.OrigDsts[0] != want {
		t.Fatalf("dump orig_dst %+v, want [%+v]", dump.OrigDsts, want)
	}
	var table, js bytes.Buffer
	if err := dump.WriteTable(&table); err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{"default/client", "10.1.2.3:80", "9090", "enrolled_netns"} {
		if !strings.Contains(table.String(), s) {
			t.Errorf("maps table lacks %q:\n%s", s, table.String())
		}
	}
	if err := dump.WriteJSON(&js); err != nil || !json.Valid(js.Bytes()) {
		t.Fatalf("maps json: %v\n%s", err, js.String())
	}
	progs, err := Programs(f.pinDir)
	if err != nil {
		t.Fatal(err)
	}
	var ptable bytes.Buffer
	WriteProgramsTable(&ptable, progs)
	for _, s := range []string{bpf.ProgConnect4, bpf.ProgConnect6, bpf.ProgSockops, bpf.ProgSkLookup, f.cgroup, "default/client"} {
		if !strings.Contains(ptable.String(), s) {
			t.Errorf("programs table lacks %q:\n%s", s, ptable.String())
		}
	}

	t.Logf("ferry bpf progs:\n%s\nferry bpf maps:\n%s", ptable.String(), table.String())

	got, err := d.OrigDst(cookie, port)
	if err != nil {
		t.Fatal(err)
	}
	if got != want.Dst {
		t.Fatalf("OrigDst = %s, want %s", got, want.Dst)
	}
	if _, err := d.OrigDst(cookie, port); !errors.Is(err, bpf.ErrNoOrigDst) {
		t.Fatalf("second OrigDst: %v, want bpf.ErrNoOrigDst", err)
	}
}

func TestSetInboundListener(t *testing.T) {
	f := newFixture(t)
	d := f.start(t, false)
	defer d.Stop(context.Background())
	listen := func(mptcp bool) *net.TCPListener {
		var lc net.ListenConfig
		lc.SetMultipathTCP(mptcp)
		ln, err := lc.Listen(context.Background(), "tcp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		return ln.(*net.TCPListener)
	}
	ip := netip.MustParseAddr("10.9.9.9")
	if err := d.SetInboundListener(ip, listen(false)); err != nil {
		t.Fatal(err)
	}
	dump, err := DumpMaps(f.pinDir)
	if err != nil {
		t.Fatal(err)
	}
	if len(dump.InboundListeners) != 1 || dump.InboundListeners[0].PodIP != ip {
		t.Fatalf("inbound listeners %+v", dump.InboundListeners)
	}
	ln := listen(true)
	if proto, err := socketProtocol(mustRaw(t, ln)); err != nil || proto != 262 {
		privileged.Missing(t, "kernel gave no MPTCP listener (protocol %d, %v)", proto, err)
	}
	err = d.SetInboundListener(ip, ln)
	if err == nil || !strings.Contains(err.Error(), "SetMultipathTCP(false)") {
		t.Fatalf("MPTCP listener: %v, want an error that names the fix", err)
	}
}

func mustRaw(t *testing.T, c syscall.Conn) syscall.RawConn {
	t.Helper()
	raw, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

func TestCleanupLeavesNothing(t *testing.T) {
	f := newFixture(t)
	d := f.start(t, true)
	pod := privileged.NewNetns(t)
	if _, _, err := d.Enroll(pod, "default/web-0"); err != nil {
		t.Fatal(err)
	}
	mine := map[string]bool{} // "prog 12", "map 7", "link 3"
	for _, m := range objMaps(d) {
		mine[fmt.Sprintf("map %d", mapID(t, m))] = true
	}
	progs, err := Programs(f.pinDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range progs {
		mine[fmt.Sprintf("prog %d", p.ID)] = true
		mine[fmt.Sprintf("link %d", p.LinkID)] = true
	}
	if len(mine) != 6+5+5 {
		t.Fatalf("expected 6 maps, 5 programs and 5 links, got %v", mine)
	}
	if err := d.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := Cleanup(f.pinDir, f.cgroup); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(f.pinDir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("pin folder after Cleanup: %v", err)
	}

	// Freeing is asynchronous (RCU): give the kernel a moment.
	deadline := time.Now().Add(5 * time.Second)
	for {
		left := ferryObjects(t)
		var ours []string
		for _, o := range left {
			if mine[o.kindID] {
				ours = append(ours, o.String())
			}
		}
		if len(ours) == 0 {
			// Ferry objects that are not this test's belong to another process (a
			// running agent or a concurrent test binary) and are left alone.
			for _, o := range left {
				t.Logf("not this test's: %s", o)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after Cleanup, bpftool still lists: %v", ours)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

type bpfObject struct {
	kindID string // "prog 12"
	name   string
}

func (o bpfObject) String() string { return o.kindID + " " + o.name }

// ferryObjects lists, with bpftool, the programs, maps and links that carry Ferry's names.
func ferryObjects(t *testing.T) []bpfObject {
	t.Helper()
	names := map[string]bool{}
	for _, n := range bpf.MapNames() {
		names[n[:min(len(n), 15)]] = true
	}
	var out []bpfObject
	for _, kind := range []string{"prog", "map", "link"} {
		b, err := exec.Command("bpftool", "-j", kind, "show").Output()
		if err != nil {
			t.Fatalf("bpftool %s show: %v", kind, err)
		}
		var objs []struct {
			ID     uint32 `json:"id"`
			Name   string `json:"name"`
			ProgID uint32 `json:"prog_id"`
		}
		if err := json.Unmarshal(b, &objs); err != nil {
			t.Fatalf("bpftool %s show: %v\n%s", kind, err, b)
		}
		progNames := map[uint32]string{}
		for _, o := range out {
			var id uint32
			if n, _ := fmt.Sscanf(o.kindID, "prog %d", &id); n == 1 {
				progNames[id] = o.name
			}
		}
		for _, o := range objs {
			name := o.Name
			if kind == "link" {
				name = progNames[o.ProgID]
			}
			if strings.HasPrefix(name, "ferry_") || (kind == "map" && names[name]) {
				out = append(out, bpfObject{kindID: fmt.Sprintf("%s %d", kind, o.ID), name: name})
			}
		}
	}
	return out
}

// dialChild starts a process in the fixture's cgroup and in h that connects to addr,
// and returns its local address; the connection stays open until the test ends.
func dialChild(t *testing.T, f fixture, h *netns.Handle, addr string) netip.AddrPort {
	t.Helper()
	cg, err := os.Open(f.cgroup)
	if err != nil {
		t.Fatal(err)
	}
	defer cg.Close()
	cmd := exec.Command("/proc/self/exe", "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+addr)
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.Fd())}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Do(cmd.Start); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stdin.Close()
		cmd.Wait()
	})
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		t.Fatalf("child: %v", err)
	}
	fields := strings.Fields(line)
	if len(fields) != 2 || fields[0] != "local" {
		t.Fatalf("child: %s", line)
	}
	return netip.MustParseAddrPort(fields[1])
}

// A second data path on the pins of a running one stops on the pin folder's lock
// before it adopts anything: the links, their programs and the enrollments are the
// first one's still; Cleanup refuses too. Once the first stops, the pins are free.
func TestSecondStartLocked(t *testing.T) {
	f := newFixture(t)
	pod := privileged.NewNetns(t)
	d1 := f.start(t, false)
	defer d1.Stop(context.Background())
	cookie, _, err := d1.Enroll(pod, "default/web-0")
	if err != nil {
		t.Fatal(err)
	}
	progs := func() []ProgramInfo {
		ps, err := Programs(f.pinDir)
		if err != nil {
			t.Fatal(err)
		}
		return ps
	}
	before := progs()

	d2, err := New(Config{PinDir: f.pinDir, CgroupPath: f.cgroup, MaxPods: 16, FastPath: true}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := d2.Start(context.Background()); !errors.Is(err, ErrLocked) {
		t.Fatalf("second start: %v, want ErrLocked", err)
	} else if !strings.Contains(err.Error(), fmt.Sprintf("pid %d", os.Getpid())) {
		t.Errorf("error %q does not name the holder", err)
	}
	if err := Cleanup(f.pinDir, f.cgroup); !errors.Is(err, ErrLocked) {
		t.Fatalf("cleanup while running: %v, want ErrLocked", err)
	}
	if after := progs(); !slices.Equal(after, before) {
		t.Errorf("programs and links changed:\n%v\n→\n%v", before, after)
	}
	if enrolled, err := d1.Enrolled(); err != nil || enrolled[cookie] != "default/web-0" {
		t.Errorf("enrolled after the second start %v (%v)", enrolled, err)
	}

	if err := d2.Lock(); !errors.Is(err, ErrLocked) {
		t.Fatalf("second lock: %v, want ErrLocked", err)
	}

	if err := d1.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}
	// An agent locks first and starts after; the lock outlives Stop until Unlock.
	if err := d2.Lock(); err != nil {
		t.Fatalf("lock once the first stopped: %v", err)
	}
	if err := d2.Start(context.Background()); err != nil {
		t.Fatalf("start once the first stopped: %v", err)
	}
	if err := d2.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}
	d3, err := New(Config{PinDir: f.pinDir, CgroupPath: f.cgroup, MaxPods: 16}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := d3.Lock(); !errors.Is(err, ErrLocked) {
		t.Fatalf("lock after Stop, before Unlock: %v, want ErrLocked", err)
	}
	if err := d2.Unlock(); err != nil {
		t.Fatal(err)
	}
	if err := d3.Lock(); err != nil {
		t.Fatalf("lock after Unlock: %v", err)
	}
	d3.Unlock()
}
