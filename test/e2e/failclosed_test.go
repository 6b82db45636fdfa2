package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/agent/datapath"
	"github.com/ferrymesh/ferry/agent/netns"
	"github.com/ferrymesh/ferry/api/admin"
	"github.com/ferrymesh/ferry/bpf"
	"github.com/ferrymesh/ferry/lab"
	"golang.org/x/sys/unix"
)

// The fail-closed lab: node1 has pod a and node2 pod c, both enrolled, fed from state
// files. Its pods are in 10.109.0.0/16, apart from the other labs.
const (
	foPrefix = "fo"
	foPodNet = 109
)

// TestSecondAgentChangesNothing: a second agent started for node1 while the first
// runs (same command line, in the node's namespace and cgroup) exits non-zero naming
// the first, and changes nothing the first owns: map entries, links and their
// programs, pins, the files and sockets of its state folder, the in-pod listeners.
// Meanwhile a→c keeps going, through mTLS only: every flow node2 records is mtls, and
// no payload crosses the fabric in the clear. The same holds for a second agent with
// a state folder of its own: the pin folder's lock stops it.
func TestSecondAgentChangesNothing(t *testing.T) {
	e := newFailClosedLab(t)
	caddr := e.addr("c", echoPort)
	pcap := filepath.Join(t.TempDir(), "fabric.pcap")
	stopCapture := e.capture(t, pcap)
	release := e.hold(t, "a", caddr) // a long-lived connection across everything
	tr := e.keepConnecting(t, "a", caddr)
	tr.waitOK(t, 3)

	first := e.lab.AgentPID("node1")
	before := e.owned(t, "node1", true)
	t.Logf("node1's agent owns %d enrollments, %d links, %d pins, %d files in its state folder, %d in-pod listeners",
		len(before.Enrolled), len(before.Programs), len(before.Pins), len(before.Files), len(before.Listeners))

	// A new connection every 50 ms for as long as the second agents come and go.
	probe := make(chan scenarioResult, 1)
	go func() {
		res, err := e.run(t, "a", "probe", caddr, "6")
		if err != nil {
			t.Errorf("probe a→c: %v", err)
		}
		probe <- res
	}()
	duringFrom := tr.ok()
	other := t.TempDir()
	for range 3 {
		out, err := e.secondAgent(t, "node1")
		checkRefused(t, out, err, first, "agent.lock")

		// Another state folder: the pin folder's lock stops it, before it binds the
		// health port (in use) or opens a socket.
		out, err = e.secondAgent(t, "node1", "--admin-socket", filepath.Join(other, "agent.sock"))
		checkRefused(t, out, err, first, e.lab.Config().Prefix+"-node1")
		if entries, _ := os.ReadDir(other); len(entries) != 1 || entries[0].Name() != "agent.lock" {
			t.Errorf("the refused agent left %v in its own state folder, want only its lock", entries)
		}
		time.Sleep(time.Second)
	}
	probed := (<-probe).Bytes / 64
	if during := tr.ok() - duringFrom; during == 0 || probed == 0 {
		t.Errorf("a→c while the second agents ran: %d echo connections, %d probes ok", during, probed)
	}

	after := e.owned(t, "node1", true)
	if diff := before.diff(after); diff != "" {
		t.Errorf("the second agents changed what the first owns:\n%s", diff)
	}
	if pid := e.lab.AgentPID("node1"); pid != first {
		t.Fatalf("node1's agent is pid %d now, want %d still running", pid, first)
	}
	if c, err := net.Dial("unix", e.lab.ObserverSocket("node1")); err != nil {
		t.Errorf("first agent's observer socket: %v", err)
	} else {
		c.Close()
	}

	ok := tr.waitOK(t, tr.ok()+3) // and after
	if failed := tr.stop(); len(failed) > 0 {
		t.Errorf("%d of %d connections a→c failed while the second agents ran: %v", len(failed), ok+len(failed), failed)
	}
	if err := release(); err != nil {
		t.Errorf("long-lived connection a→c: %v", err)
	}
	stopCapture()
	e.checkMTLSOnly(t, "node2", "a", ok+int(probed))
	e.checkOutboundOK(t, "node1", "a", "c", ok+int(probed))
	if captured(t, pcap, Marker) {
		t.Error("a→c payload crossed the fabric in plaintext")
	}
	t.Logf("a→c: %d echo connections, %d probes and one long-lived connection, all mTLS, none failed", ok, probed)
}

// TestFailedStartLeavesKernelAsFound: node1's agent stops (its pins keep a captured),
// and a new agent starts and fails after taking the lock: the health port is taken by
// something else, or the cgroup flag names no cgroup. Each time the kernel is as it
// was (map entries, links, programs, pins), a stays enrolled, and a's connections are
// refused rather than sent in plaintext. The lab restarts the agent as a supervisor
// would and a→c is mTLS again.
func TestFailedStartLeavesKernelAsFound(t *testing.T) {
	e := newFailClosedLab(t)
	caddr := e.addr("c", echoPort)
	pcap := filepath.Join(t.TempDir(), "fabric.pcap")
	stopCapture := e.capture(t, pcap)
	if err := e.lab.StopAgent("node1", syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	found := e.owned(t, "node1", false)
	if !slices.ContainsFunc(found.Enrolled, func(n datapath.EnrolledNetns) bool { return n.Pod == "default/a" }) {
		t.Fatalf("a not enrolled after the agent stopped: %v", found.Enrolled)
	}

	netnsPath, err := e.lab.NetnsPath("node1")
	if err != nil {
		t.Fatal(err)
	}
	squatter := exec.Command("nsenter", "--net="+netnsPath, "--", filepath.Join(e.bin, "ferry"), "lab", "echo-server", "--listen", ":15021")
	if err := squatter.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		squatter.Process.Kill()
		squatter.Wait()
	}()
	waitListening(t, netnsPath, 15021)
	cgroupMount, err := datapath.Cgroup2Mount()
	if err != nil {
		t.Fatal(err)
	}

	for _, c := range []struct {
		what, log string
		args      []string
	}{
		{"health port taken", "address already in use", nil},
		{"no such cgroup", "cgroup", []string{"--health-addr=", "--cgroup", filepath.Join(cgroupMount, "fo-no-such-cgroup")}},
	} {
		logged := logSize(t, e.lab.AgentLog("node1"))
		if err := e.lab.StartAgent("node1", c.args...); err != nil {
			t.Fatal(err)
		}
		waitExited(t, e.lab, "node1")
		log := readFrom(t, e.lab.AgentLog("node1"), logged)
		if !strings.Contains(log, c.log) {
			t.Errorf("%s: the agent's log does not say %q:\n%s", c.what, c.log, log)
		}
		if diff := found.diff(e.owned(t, "node1", false)); diff != "" {
			t.Errorf("%s: the failed start changed the kernel:\n%s", c.what, diff)
		}
		// Captured and not served: refused, never around the mesh.
		if _, err := e.run(t, "a", "refused", caddr); err != nil {
			t.Errorf("%s: a→c with no agent on node1: %v", c.what, err)
		}
	}

	squatter.Process.Kill()
	squatter.Wait()
	r, err := e.lab.RestartAgent(context.Background(), "node1", syscall.SIGTERM)
	if err != nil {
		t.Fatal(err)
	}
	if r.OldPID != 0 || r.NewPID == 0 || len(r.Args) != 0 {
		t.Errorf("restart of a stopped agent: %+v", r)
	}
	e.mustRun(t, "a", "echo", caddr, "65536")

	// A supervisor's crash restart, with the flags the agent had: the same pins.
	pid := e.lab.AgentPID("node1")
	r, err = e.lab.RestartAgent(context.Background(), "node1", syscall.SIGKILL)
	if err != nil {
		t.Fatal(err)
	}
	if r.OldPID != pid || r.NewPID == pid || r.NewPID == 0 {
		t.Errorf("crash restart: %+v (old pid %d)", r, pid)
	}
	t.Logf("crash restart: stopped in %s, ready %s after the signal", r.Stopped, r.Ready)
	e.mustRun(t, "a", "echo", caddr, "65536")
	stopCapture()
	e.checkMTLSOnly(t, "node2", "a", 2)
	if captured(t, pcap, Marker) {
		t.Error("a→c payload crossed the fabric in plaintext")
	}
}

// newFailClosedLab brings up the fail-closed lab with an echo server on c, taken down
// when the test ends.
func newFailClosedLab(t *testing.T) *env {
	t.Helper()
	return newEchoLab(t, "fail-closed lab", foPrefix, foPodNet)
}

// owned is what a node's agent owns, as the kernel and the file system show it.
type owned struct {
	Enrolled []datapath.EnrolledNetns // enrolled_netns, through the pins
	// BPFTool is bpftool's view of the maps whose entries only enrollment changes,
	// and of the links: every entry, and every map, link and program ID.
	BPFTool  []string
	Inbound  []bpf.InboundListener
	Excluded []uint16
	Programs []datapath.ProgramInfo // links pinned under the pin folder, with their programs
	Pins     []string               // every pin, with its inode
	// Files are the agent's state folder (without the lab's agent.log): name,
	// inode, size and modification time; the sockets and the lock among them.
	Files []string
	// Listeners are the in-pod listeners (15001, 15006, 15008) of the node's pods,
	// with their socket inodes.
	Listeners []string
}

// owned takes the snapshot; files says whether to include the state folder and the
// in-pod listeners (which only a running agent has).
func (e *env) owned(t *testing.T, node string, files bool) owned {
	t.Helper()
	pinDir := filepath.Join(lab.BPFRoot, e.lab.Config().Prefix+"-"+node)
	var o owned
	d, err := datapath.DumpMaps(pinDir)
	if err != nil {
		t.Fatal(err)
	}
	o.Enrolled, o.Inbound, o.Excluded = d.Enrolled, d.InboundListeners, d.ExcludedPorts
	if o.Programs, err = datapath.Programs(pinDir); err != nil {
		t.Fatal(err)
	}
	for _, m := range []string{bpf.MapEnrolledNetns, bpf.MapExcludedPorts} {
		o.BPFTool = append(o.BPFTool, m+": "+bpftool(t, "map", "dump", "pinned", filepath.Join(pinDir, m)))
	}
	for _, m := range bpf.MapNames() {
		if p := filepath.Join(pinDir, m); pinned(p) {
			o.BPFTool = append(o.BPFTool, m+" map: "+jsonField(t, bpftool(t, "map", "show", "pinned", p), "id"))
		}
	}
	for _, p := range o.Programs {
		o.BPFTool = append(o.BPFTool, p.Pin+" link: "+jsonField(t, bpftool(t, "link", "show", "pinned", p.Pin), "id")+
			" prog "+jsonField(t, bpftool(t, "link", "show", "pinned", p.Pin), "prog_id"))
	}
	o.Pins = tree(t, pinDir, nil)
	if files {
		stateFile, err := e.lab.StateFile(node)
		if err != nil {
			t.Fatal(err)
		}
		o.Files = tree(t, filepath.Dir(stateFile), func(name string) bool { return name != "agent.log" })
		for _, p := range e.lab.Pods() {
			if p.Node == node && p.Enrolled {
				o.Listeners = append(o.Listeners, meshListeners(t, p)...)
			}
		}
	}
	return o
}

// diff describes how o and p differ, field by field; "" when they are the same.
func (o owned) diff(p owned) string {
	a, _ := json.MarshalIndent(o, "", " ")
	b, _ := json.MarshalIndent(p, "", " ")
	if bytes.Equal(a, b) {
		return ""
	}
	al, bl := strings.Split(string(a), "\n"), strings.Split(string(b), "\n")
	var out strings.Builder
	for _, l := range al {
		if !slices.Contains(bl, l) {
			fmt.Fprintf(&out, "- %s\n", l)
		}
	}
	for _, l := range bl {
		if !slices.Contains(al, l) {
			fmt.Fprintf(&out, "+ %s\n", l)
		}
	}
	return out.String()
}

func bpftool(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("bpftool", append([]string{"-j"}, args...)...).Output()
	if err != nil {
		t.Fatalf("bpftool %v: %v", args, err)
	}
	return strings.TrimSpace(string(out))
}

// jsonField is one top-level field of a JSON object, as text.
func jsonField(t *testing.T, obj, field string) string {
	t.Helper()
	var m map[string]json.RawMessage
	if err := json.Unmarshal([]byte(obj), &m); err != nil {
		t.Fatalf("bpftool output %q: %v", obj, err)
	}
	return string(m[field])
}

func pinned(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// tree lists the files under dir (those keep accepts, or all) with inode, size and
// modification time.
func tree(t *testing.T, dir string, keep func(name string) bool) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(dir, func(path string, _ os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if keep != nil && !keep(filepath.Base(path)) {
			return nil
		}
		var st unix.Stat_t
		if err := unix.Lstat(path, &st); err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, path)
		out = append(out, fmt.Sprintf("%s ino %d size %d mtime %d.%09d", rel, st.Ino, st.Size, st.Mtim.Sec, st.Mtim.Nsec))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// meshListeners are the agent's listening sockets in the pod, with their inodes.
func meshListeners(t *testing.T, p lab.PodInfo) []string {
	t.Helper()
	var ls []string
	for _, l := range listening(t, p.Netns) {
		if l.port == 15001 || l.port == 15006 || l.port == 15008 {
			ls = append(ls, fmt.Sprintf("%s %s:%d ino %s", p.Name, l.addr, l.port, l.inode))
		}
	}
	if len(ls) < 3 {
		t.Fatalf("pod %s has mesh listeners %v, want 15001, 15006 and 15008", p.Name, ls)
	}
	slices.Sort(ls)
	return ls
}

// tcpListener is a listening TCP socket as /proc/net/tcp{,6} lists it.
type tcpListener struct {
	addr  string // hex, as the kernel writes it
	port  int
	inode string
}

// listening lists the listening TCP sockets of the network namespace at path, read
// from /proc/thread-self/net/tcp{,6} on a thread inside it.
func listening(t *testing.T, path string) []tcpListener {
	t.Helper()
	h, err := netns.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	var out []tcpListener
	err = h.Do(func() error {
		for _, f := range []string{"/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"} {
			b, err := os.ReadFile(f)
			if err != nil {
				return err
			}
			for _, line := range strings.Split(string(b), "\n")[1:] {
				// sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
				fs := strings.Fields(line)
				if len(fs) < 10 || fs[3] != "0A" { // 0A: TCP_LISTEN
					continue
				}
				addr, port, ok := strings.Cut(fs[1], ":")
				if !ok {
					continue
				}
				n, err := strconv.ParseUint(port, 16, 16)
				if err != nil {
					continue
				}
				out = append(out, tcpListener{addr: addr, port: int(n), inode: fs[9]})
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("listeners in %s: %v", path, err)
	}
	return out
}

// secondAgent runs node's agent a second time: the running one's command line (plus
// extra), in the node's network namespace and cgroup. It returns the output and the
// exit error.
func (e *env) secondAgent(t *testing.T, node string, extra ...string) (string, error) {
	t.Helper()
	pid := e.lab.AgentPID(node)
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		t.Fatal(err)
	}
	argv := strings.Split(strings.TrimSuffix(string(raw), "\x00"), "\x00")
	netnsPath, err := e.lab.NetnsPath(node)
	if err != nil {
		t.Fatal(err)
	}
	cgroup, err := e.lab.NodeCgroup(node)
	if err != nil {
		t.Fatal(err)
	}
	cg, err := unix.Open(cgroup, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(cg)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "nsenter", append(append([]string{"--net=" + netnsPath, "--"}, argv...), extra...)...)
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: cg}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// checkRefused: the second agent exited non-zero, saying the lock (whose path holds
// where) is held by pid.
func checkRefused(t *testing.T, out string, err error, pid int, where string) {
	t.Helper()
	if err == nil {
		t.Fatalf("the second agent ran:\n%s", out)
	}
	if _, ok := err.(*exec.ExitError); !ok {
		t.Fatalf("second agent: %v\n%s", err, out)
	}
	for _, s := range []string{"held by another agent", "pid " + strconv.Itoa(pid), where} {
		if !strings.Contains(out, s) {
			t.Errorf("the second agent's error does not say %q:\n%s", s, out)
		}
	}
	t.Logf("second agent: %v: %s", err, strings.TrimSpace(out))
}

// checkMTLSOnly: node recorded at least n inbound connections from pod, every one
// mTLS.
func (e *env) checkMTLSOnly(t *testing.T, node, pod string, n int) {
	t.Helper()
	cs, err := e.admin(node).Connections(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	ip, seen := e.pod(pod).IP, 0
	for _, c := range append(cs.Live, cs.Ended...) {
		if c.Direction != admin.Inbound || c.Src.Addr() != ip {
			continue
		}
		seen++
		if c.Security != admin.MTLS {
			t.Errorf("%s recorded a %s connection from %s: %+v", node, c.Security, pod, c)
		}
	}
	if seen < n {
		t.Errorf("%s recorded %d connections from %s, want at least %d", node, seen, pod, n)
	}
}

// checkOutboundOK: node's agent carried at least n connections from pod to dst, and
// every one went out over mTLS and was forwarded without an error; none was refused
// or went plaintext.
func (e *env) checkOutboundOK(t *testing.T, node, pod, dst string, n int) {
	t.Helper()
	cs, err := e.admin(node).Connections(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	src, to, seen := e.pod(pod).IP, e.pod(dst).IP, 0
	for _, c := range cs.Ended {
		if c.Direction != admin.Outbound || c.Src.Addr() != src || c.Dst.Addr() != to {
			continue
		}
		seen++
		if c.Security != admin.MTLS || c.Verdict != admin.VerdictForwarded || c.Error != "" {
			t.Errorf("%s carried %s→%s as %s, %s: %s", node, pod, dst, c.Security, c.Verdict, c.Error)
		}
	}
	if seen < n {
		t.Errorf("%s carried %d connections %s→%s, want at least %d", node, seen, pod, dst, n)
	}
}

// traffic is a client opening one new connection after another, each echoing 4 KiB.
type traffic struct {
	mu     sync.Mutex
	okN    int
	failed []string
	quit   chan struct{}
	done   chan struct{}
}

func (e *env) keepConnecting(t *testing.T, from, to string) *traffic {
	tr := &traffic{quit: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(tr.done)
		for {
			select {
			case <-tr.quit:
				return
			default:
			}
			_, err := e.run(t, from, "echo", to, "4096")
			tr.mu.Lock()
			if err != nil {
				tr.failed = append(tr.failed, err.Error())
			} else {
				tr.okN++
			}
			tr.mu.Unlock()
		}
	}()
	t.Cleanup(func() { tr.stop() })
	return tr
}

func (tr *traffic) ok() int {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return tr.okN
}

// waitOK waits until n connections have succeeded and returns how many have.
func (tr *traffic) waitOK(t *testing.T, n int) int {
	t.Helper()
	deadline := time.Now().Add(carryWait)
	for tr.ok() < n {
		if time.Now().After(deadline) {
			t.Fatalf("%d connections ok in %s, want %d; failed: %v", tr.ok(), carryWait, n, tr.stop())
		}
		time.Sleep(50 * time.Millisecond)
	}
	return tr.ok()
}

// stop ends the client and returns the connections that failed.
func (tr *traffic) stop() []string {
	select {
	case <-tr.quit:
	default:
		close(tr.quit)
	}
	<-tr.done
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return slices.Clone(tr.failed)
}

// waitListening waits until something listens on port in the namespace at path.
func waitListening(t *testing.T, path string, port int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if slices.ContainsFunc(listening(t, path), func(l tcpListener) bool { return l.port == port }) {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("nothing listens on %d in %s", port, path)
}

// waitExited waits until node's agent has exited.
func waitExited(t *testing.T, l *lab.Lab, node string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for l.AgentPID(node) != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the agent on %s still runs; end of its log:\n%s", node, tailFile(l.AgentLog(node), 20))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func logSize(t *testing.T, path string) int64 {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Size()
}

// readFrom is the file from offset on.
func readFrom(t *testing.T, path string, offset int64) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b[offset:])
}
