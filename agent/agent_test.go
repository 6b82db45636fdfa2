package agent

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/ferrymesh/ferry/agent/datapath"
	"github.com/ferrymesh/ferry/agent/identity/identitytest"
	"github.com/ferrymesh/ferry/agent/netns"
	"github.com/ferrymesh/ferry/agent/proxy"
	"github.com/ferrymesh/ferry/api/ferryv1"
	"github.com/ferrymesh/ferry/api/spiffe"
	"github.com/ferrymesh/ferry/bpf"
	"google.golang.org/protobuf/encoding/protojson"
)

// These tests run the agent's enrollment and lifecycle as an ordinary user: the
// capture, the proxy's pods and the namespace lookup are fakes (the "namespaces" are
// handles to the test's own), so nothing touches the kernel.

// events is the ordered record of what the fakes were asked to do.
type events struct {
	mu  sync.Mutex
	log []string
}

func (e *events) add(s string) {
	e.mu.Lock()
	e.log = append(e.log, s)
	e.mu.Unlock()
}

func (e *events) all() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return slices.Clone(e.log)
}

// fakeCapture enrolls pods by name, giving each enrollment a new cookie.
type fakeCapture struct {
	ev       *events
	startErr error
	mu       sync.Mutex
	next     uint64
	enrolled map[uint64]string // live enrollments
	pinned   map[uint64]string // what "a previous run" left
	kept     map[uint64]bool   // the keep set of the last Prune
	strict   []bpf.StrictPort  // the last SetStrictPorts
	// strictErr fails SetStrictPorts (a full map).
	strictErr error
}

func (f *fakeCapture) SetStrictPorts(ps []bpf.StrictPort) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.strictErr != nil {
		return f.strictErr
	}
	f.strict = slices.Clone(ps)
	if len(ps) > 0 { // only STRICT states leave a mark, so other tests' sequences stay
		f.ev.add("strict " + strconv.Itoa(len(ps)))
	}
	return nil
}

func newFakeCapture(ev *events) *fakeCapture {
	return &fakeCapture{ev: ev, next: 1, enrolled: map[uint64]string{}, pinned: map[uint64]string{}}
}

func (f *fakeCapture) Start(context.Context) error {
	f.ev.add("capture start")
	return f.startErr
}

func (f *fakeCapture) Stop(context.Context) error {
	f.ev.add("capture stop")
	return nil
}

// The fake's pins are its own maps, which no other agent shares: nothing to lock.
func (*fakeCapture) Lock() error   { return nil }
func (*fakeCapture) Unlock() error { return nil }

// Enroll adopts the enrollment a previous run pinned for the pod, if any.
func (f *fakeCapture) Enroll(_ *netns.Handle, pod string) (uint64, bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for c, p := range f.pinned {
		if p == pod {
			f.enrolled[c] = pod
			f.ev.add("adopt " + pod)
			return c, true, nil
		}
	}
	c := f.next
	f.next++
	f.enrolled[c] = pod
	f.ev.add("enroll " + pod)
	return c, false, nil
}

func (f *fakeCapture) Release(_ *netns.Handle, cookie uint64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.ev.add("release " + f.enrolled[cookie])
	delete(f.enrolled, cookie)
	delete(f.pinned, cookie)
	return nil
}

func (f *fakeCapture) Leave(_ *netns.Handle, cookie uint64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.ev.add("leave " + f.enrolled[cookie])
	return nil
}

func (f *fakeCapture) Prune(keep map[uint64]bool) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.kept = keep
	for c, pod := range f.pinned {
		if !keep[c] {
			f.ev.add("prune " + pod)
			delete(f.pinned, c)
		}
	}
	return nil
}

func (f *fakeCapture) pods() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for _, p := range f.enrolled {
		out = append(out, p)
	}
	slices.Sort(out)
	return out
}

func (*fakeCapture) InboundAddr(ip netip.Addr) netip.Addr              { return ip }
func (*fakeCapture) SetInboundListener(netip.Addr, syscall.Conn) error { return nil }
func (*fakeCapture) InboundDst(*net.TCPConn) (netip.AddrPort, error)   { return netip.AddrPort{}, nil }
func (*fakeCapture) Sockhash() bool                                    { return false }
func (*fakeCapture) OutboundDst(uint64, *net.TCPConn) (netip.AddrPort, error) {
	return netip.AddrPort{}, errors.New("fake capture: no traffic")
}

// fakePods is the proxy's pod table; a pod named in fail cannot be served (its
// listeners would not open).
type fakePods struct {
	ev   *events
	mu   sync.Mutex
	pods map[string]proxy.Workload
	fail map[string]error
}

func (f *fakePods) SetMesh([]proxy.Workload) {}

func (f *fakePods) SetServices([]proxy.Service) {}

func (f *fakePods) SetAuthorization([]proxy.AuthzPolicy) {}

func (f *fakePods) AddPod(w proxy.Workload, _ proxy.Netns, _ uint64) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.fail[w.Name]; err != nil {
		f.ev.add("serve failed " + w.Name)
		return err
	}
	f.pods[w.UID] = w
	f.ev.add("serve " + w.Name)
	return nil
}

func (f *fakePods) RemovePod(uid string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.ev.add("unserve " + f.pods[uid].Name)
	delete(f.pods, uid)
}

// fakeNetns finds the namespaces of the IPs it has been told exist; each is a
// handle to the test's own namespace.
type fakeNetns struct {
	mu  sync.Mutex
	ips map[netip.Addr]bool
}

func (f *fakeNetns) add(ip string) {
	f.mu.Lock()
	f.ips[netip.MustParseAddr(ip)] = true
	f.mu.Unlock()
}

func (f *fakeNetns) find(ip netip.Addr) (*netns.Handle, error) {
	f.mu.Lock()
	ok := f.ips[ip]
	f.mu.Unlock()
	if !ok {
		return nil, errors.New("no network namespace holds " + ip.String())
	}
	return netns.Open("/proc/self/ns/net")
}

// testAgent is an agent on node1 fed from a state file.
type testAgent struct {
	*Agent
	ev      *events
	capture *fakeCapture
	pods    *fakePods
	netns   *fakeNetns
	ca      *identitytest.CA
	path    string
}

func newTestAgent(t *testing.T) *testAgent {
	t.Helper()
	return newTestAgentWith(t, func(*Config) {})
}

type pod struct{ uid, name, node, ip, sa string }

// state is a NodeState for node1 with certificates for every pod's identity.
func (ta *testAgent) state(t *testing.T, version uint64, pods ...pod) *ferryv1.NodeState {
	t.Helper()
	st := &ferryv1.NodeState{Node: "node1", Version: version, TrustBundlePem: ta.ca.RootPEM}
	for _, p := range pods {
		id := spiffe.ID("cluster.local", "default", p.sa)
		st.Workloads = append(st.Workloads, &ferryv1.Workload{Uid: p.uid, Name: p.name, Namespace: "default", Node: p.node, Identity: id, Ips: []string{p.ip}})
		c := ta.ca.Valid(t, id)
		st.Certificates = append(st.Certificates, &ferryv1.Certificate{Identity: id, CertChainPem: c.Chain, PrivateKeyPem: c.Key})
	}
	return st
}

func (ta *testAgent) writeState(t *testing.T, st *ferryv1.NodeState) {
	t.Helper()
	b, err := protojson.Marshal(st)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(ta.path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func (ta *testAgent) enrolledNames() []string {
	ta.mu.Lock()
	defer ta.mu.Unlock()
	var out []string
	for _, p := range ta.enrolled {
		out = append(out, p.w.Name)
	}
	slices.Sort(out)
	return out
}

func (ta *testAgent) servedNames() []string {
	ta.pods.mu.Lock()
	defer ta.pods.mu.Unlock()
	var out []string
	for _, w := range ta.pods.pods {
		out = append(out, w.Name)
	}
	slices.Sort(out)
	return out
}

var (
	podA = pod{"ua", "a", "node1", "10.1.1.10", "a"}
	podB = pod{"ub", "b", "node1", "10.1.1.11", "b"}
	podC = pod{"uc", "c", "node2", "10.1.2.10", "c"} // another node's: never enrolled here
)

// TestReconcile follows pods through the agent: they come (one before its namespace
// exists, so it is retried), change identity (enrolled again), go (released), and an
// enrollment a previous run left is removed.
func TestReconcile(t *testing.T) {
	ta := newTestAgent(t)
	ta.capture.pinned[99] = "default/gone" // left by a previous run
	ta.netns.add(podA.ip)
	ta.writeState(t, ta.state(t, 1, podA, podB, podC))
	if err := ta.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	defer ta.Stop(context.Background())

	want := []string{"default/a"}
	if got := ta.enrolledNames(); !slices.Equal(got, want) {
		t.Fatalf("enrolled %v, want %v (b has no namespace yet, c is on node2)", got, want)
	}
	if got := ta.servedNames(); !slices.Equal(got, want) {
		t.Errorf("proxy serves %v, want %v", got, want)
	}
	ta.mu.Lock()
	failing := ta.failing["ub"]
	ta.mu.Unlock()
	if failing == "" {
		t.Error("b not reported as failing")
	}
	if len(ta.capture.pinned) != 0 || len(ta.capture.kept) != 1 {
		t.Errorf("stale enrollment not pruned: pinned %v, kept %v", ta.capture.pinned, ta.capture.kept)
	}

	// b's namespace appears (the CNI ran): the next reconcile enrolls it.
	ta.netns.add(podB.ip)
	ta.reconcile()
	want = []string{"default/a", "default/b"}
	if got := ta.enrolledNames(); !slices.Equal(got, want) {
		t.Fatalf("after b's netns appeared: enrolled %v, want %v", got, want)
	}
	ta.mu.Lock()
	_, still := ta.failing["ub"]
	ta.mu.Unlock()
	if still {
		t.Error("b still reported as failing")
	}

	// a changes identity and b goes away.
	before := len(ta.ev.all())
	a2 := podA
	a2.sa = "a-v2"
	if err := ta.Apply(ta.state(t, 2, a2, podC)); err != nil {
		t.Fatal(err)
	}
	got := ta.ev.all()[before:]
	for _, e := range []string{"release default/a", "unserve default/a", "enroll default/a", "serve default/a", "release default/b", "unserve default/b"} {
		if !slices.Contains(got, e) {
			t.Errorf("apply v2: no %q in %v", e, got)
		}
	}
	if got := ta.capture.pods(); !slices.Equal(got, []string{"default/a"}) {
		t.Errorf("captured %v, want only a", got)
	}
	ta.mu.Lock()
	id := ta.enrolled["ua"].w.Identity
	ta.mu.Unlock()
	if id != spiffe.ID("cluster.local", "default", "a-v2") {
		t.Errorf("a enrolled as %s", id)
	}

	// An older state is refused whole and changes nothing.
	if err := ta.Apply(ta.state(t, 1, podA, podB)); err == nil {
		t.Error("older state applied")
	}
	if got := ta.enrolledNames(); !slices.Equal(got, []string{"default/a"}) {
		t.Errorf("after a refused state: enrolled %v", got)
	}
}

// TestPodWithoutCertificateWaits: a pod whose identity has no certificate yet is not
// enrolled (its traffic would have no identity to carry), and is once it has one.
func TestPodWithoutCertificateWaits(t *testing.T) {
	ta := newTestAgent(t)
	ta.netns.add(podA.ip)
	st := ta.state(t, 1, podA)
	st.Certificates = nil
	ta.writeState(t, st)
	if err := ta.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	defer ta.Stop(context.Background())
	if got := ta.enrolledNames(); len(got) != 0 {
		t.Fatalf("enrolled %v without a certificate", got)
	}
	if err := ta.Apply(ta.state(t, 2, podA)); err != nil {
		t.Fatal(err)
	}
	if got := ta.enrolledNames(); !slices.Equal(got, []string{"default/a"}) {
		t.Fatalf("enrolled %v once the certificate came", got)
	}
}

// TestLifecycleOrder: the capture starts before any pod is enrolled into it, and on
// Stop every enrolled pod leaves the capture before the capture itself stops.
func TestLifecycleOrder(t *testing.T) {
	ta := newTestAgent(t)
	ta.netns.add(podA.ip)
	ta.writeState(t, ta.state(t, 1, podA))
	if err := ta.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	if err := ta.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}
	got := ta.ev.all()
	want := []string{"capture start", "enroll default/a", "serve default/a", "leave default/a", "capture stop"}
	if !slices.Equal(got, want) {
		t.Fatalf("events %v, want %v", got, want)
	}
	if n := len(ta.enrolledNames()); n != 0 {
		t.Errorf("%d pods still enrolled after Stop", n)
	}
}

// TestStartFailureStopsWhatStarted: a part that fails to start stops the ones before
// it, and the error names the part. A state file the agent cannot use fails the
// start before the capture is touched.
func TestStartFailureStopsWhatStarted(t *testing.T) {
	ta := newTestAgent(t)
	ta.writeState(t, &ferryv1.NodeState{Node: "node2"}) // another node's state: refused
	err := ta.Start(t.Context())
	if err == nil {
		t.Fatal("started with another node's state")
	}
	if got := ta.ev.all(); len(got) != 0 {
		t.Errorf("events %v: the capture was touched for a state that cannot apply", got)
	}
	ta2 := newTestAgent(t)
	ta2.writeState(t, ta2.state(t, 1))
	ta2.capture.startErr = errors.New("no bpffs")
	if err := ta2.Start(t.Context()); err == nil || !errors.Is(err, ta2.capture.startErr) {
		t.Fatalf("start: %v", err)
	}
	if got := ta2.ev.all(); !slices.Equal(got, []string{"capture start"}) {
		t.Errorf("events %v: a capture that failed to start is not stopped", got)
	}
}

// TestSecondAgentChangesNothing: a second agent for the node (same state folder)
// fails on the lock, naming the first, before any part of it starts; the first's
// sockets are the same files after.
func TestSecondAgentChangesNothing(t *testing.T) {
	dir := t.TempDir()
	first := newTestAgentIn(t, dir)
	first.netns.add(podA.ip)
	first.writeState(t, first.state(t, 1, podA))
	if err := first.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	defer first.Stop(context.Background())
	sockets := []string{filepath.Join(dir, "agent.sock"), filepath.Join(dir, "observer.sock")}
	before := inodes(t, sockets...)

	second := newTestAgentIn(t, dir)
	second.netns.add(podA.ip)
	second.writeState(t, second.state(t, 1, podA))
	err := second.Start(t.Context())
	if !errors.Is(err, datapath.ErrLocked) {
		t.Fatalf("second agent: %v, want the lock held", err)
	}
	if !strings.Contains(err.Error(), "pid "+strconv.Itoa(os.Getpid())) {
		t.Errorf("error %q does not name the running agent's pid", err)
	}
	if got := second.ev.all(); len(got) != 0 {
		t.Errorf("second agent did %v", got)
	}
	if after := inodes(t, sockets...); !slices.Equal(after, before) {
		t.Errorf("the first agent's sockets changed: %v → %v", before, after)
	}
	if got := first.capture.pods(); !slices.Equal(got, []string{"default/a"}) {
		t.Errorf("first agent's capture now %v", got)
	}
}

// TestAdoptedPodFailsClosed: a pod a previous run captured whose listeners cannot be
// opened stays captured (its traffic is refused, never plaintext) and is not pruned
// as stale; once it can be served, it is.
func TestAdoptedPodFailsClosed(t *testing.T) {
	ta := newTestAgent(t)
	ta.capture.pinned[7] = "default/a"
	ta.pods.fail["default/a"] = errors.New("outbound listener: bind: address already in use")
	ta.netns.add(podA.ip)
	ta.writeState(t, ta.state(t, 1, podA))
	if err := ta.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	defer ta.Stop(context.Background())
	for _, e := range ta.ev.all() {
		if strings.HasPrefix(e, "release") || strings.HasPrefix(e, "prune") {
			t.Fatalf("adopted pod uncaptured: %v", ta.ev.all())
		}
	}
	if got := ta.capture.pods(); !slices.Equal(got, []string{"default/a"}) {
		t.Fatalf("captured %v, want a kept", got)
	}
	if ta.capture.pinned[7] != "default/a" || !ta.capture.kept[7] {
		t.Errorf("adopted enrollment not kept by the prune: pinned %v, kept %v", ta.capture.pinned, ta.capture.kept)
	}
	ta.pods.mu.Lock()
	delete(ta.pods.fail, "default/a")
	ta.pods.mu.Unlock()
	ta.reconcile()
	if got := ta.servedNames(); !slices.Equal(got, []string{"default/a"}) {
		t.Fatalf("served %v once the listeners could open", got)
	}
	ta.mu.Lock()
	adopted := ta.enrolled["ua"].adopted
	ta.mu.Unlock()
	if !adopted {
		t.Error("a not recorded as adopted")
	}
}

// TestNewPodNotServedIsReleased: a pod this agent captured itself but cannot serve is
// released again, as before the agent came.
func TestNewPodNotServedIsReleased(t *testing.T) {
	ta := newTestAgent(t)
	ta.pods.fail["default/b"] = errors.New("inbound listener: bind: address already in use")
	ta.netns.add(podB.ip)
	ta.writeState(t, ta.state(t, 1, podB))
	if err := ta.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	defer ta.Stop(context.Background())
	if got := ta.capture.pods(); len(got) != 0 {
		t.Fatalf("captured %v, want b released", got)
	}
}

// TestFailedStartLeavesKernelAsFound: a start that fails after pods were enrolled
// releases the pods it enrolled itself and leaves the adopted ones captured.
func TestFailedStartLeavesKernelAsFound(t *testing.T) {
	ta := newTestAgent(t)
	ta.capture.pinned[7] = "default/a"
	ta.netns.add(podA.ip)
	ta.netns.add(podB.ip)
	ta.writeState(t, ta.state(t, 1, podA, podB))
	late := errors.New("late part failed")
	ta.parts = append(ta.parts, part{"late", hooks{start: func(context.Context) error { return late }}})
	if err := ta.Start(t.Context()); !errors.Is(err, late) {
		t.Fatalf("start: %v", err)
	}
	ev := ta.ev.all()
	if !slices.Contains(ev, "release default/b") || slices.Contains(ev, "release default/a") {
		t.Errorf("events %v: want b (enrolled by this run) released, a (adopted) left", ev)
	}
	if ta.capture.pinned[7] != "default/a" {
		t.Errorf("adopted enrollment gone: %v", ta.capture.pinned)
	}
	if got := ta.capture.pods(); !slices.Equal(got, []string{"default/a"}) {
		t.Errorf("captured after the failed start %v, want only a as found", got)
	}
}

// newTestAgentIn is newTestAgent with its admin and observer sockets (and so its
// lock) in dir.
func newTestAgentIn(t *testing.T, dir string) *testAgent {
	t.Helper()
	return newTestAgentWith(t, func(c *Config) { c.AdminSocket = filepath.Join(dir, "agent.sock") })
}

// newTestAgentWith is an agent on node1 fed from a state file, its config changed by
// set.
func newTestAgentWith(t *testing.T, set func(*Config)) *testAgent {
	t.Helper()
	ev := &events{}
	ta := &testAgent{ev: ev, capture: newFakeCapture(ev), pods: &fakePods{ev: ev, pods: map[string]proxy.Workload{}, fail: map[string]error{}},
		netns: &fakeNetns{ips: map[netip.Addr]bool{}}, ca: identitytest.NewCA(t), path: filepath.Join(t.TempDir(), "state.json")}
	cfg := Config{Node: "node1", StatePath: ta.path, Datapath: datapath.DefaultConfig()}
	cfg.Datapath.PinDir = t.TempDir() // nothing pinned: the strict drops reader has nothing to read
	set(&cfg)
	a, err := newAgent(cfg, slog.New(slog.DiscardHandler), ta.capture, ta.netns.find)
	if err != nil {
		t.Fatal(err)
	}
	a.pods = ta.pods
	ta.Agent = a
	return ta
}

// inodes are the inode numbers of the files at paths.
func inodes(t *testing.T, paths ...string) []uint64 {
	t.Helper()
	var out []uint64
	for _, p := range paths {
		var st syscall.Stat_t
		if err := syscall.Stat(p, &st); err != nil {
			t.Fatal(err)
		}
		out = append(out, st.Ino)
	}
	return out
}

// The lock lives in the agent's state folder: the flag's path, else beside the admin
// socket, else beside the operator mode's state cache.
func TestLockPath(t *testing.T) {
	for _, c := range []struct {
		cfg  Config
		want string
	}{
		{Config{LockFile: "/x/l", AdminSocket: "/run/ferry/agent.sock"}, "/x/l"},
		{Config{AdminSocket: "/run/ferry/agent.sock", StateCache: "/var/ferry/state.cache", Operator: "op:1"}, "/run/ferry/agent.lock"},
		{Config{StateCache: "/var/ferry/state.cache", Operator: "op:1"}, "/var/ferry/agent.lock"},
		{Config{StateCache: "/var/ferry/state.cache", StatePath: "/s.json"}, ""}, // no cache without an operator
	} {
		if got := c.cfg.lockPath(); got != c.want {
			t.Errorf("%+v: lock at %q, want %q", c.cfg, got, c.want)
		}
	}
}
