package lab

import (
	"bufio"
	"context"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"github.com/ferrymesh/ferry/agent/datapath"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/api/ferryv1"
	"github.com/ferrymesh/ferry/internal/listener"
	"github.com/ferrymesh/ferry/internal/privileged"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/encoding/protojson"
)

// testPrefix is unique per test and per run, so that tests of this and other packages
// can run side by side.
func testPrefix(t *testing.T, tag string) string {
	return fmt.Sprintf("t%s%d", tag, os.Getpid()%100000)
}

func testConfig(t *testing.T, tag string) Config {
	cfg := DefaultConfig()
	cfg.Prefix = testPrefix(t, tag)
	cfg.StateDir = filepath.Join(t.TempDir(), "state")
	return cfg
}

func testLog(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func up(t *testing.T, cfg Config) *Lab {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	l, err := Up(ctx, cfg, testLog(t))
	if err != nil {
		t.Fatalf("up: %v", err)
	}
	t.Cleanup(func() {
		if err := l.Down(); err != nil {
			t.Errorf("down: %v", err)
		}
	})
	return l
}

// listen opens a TCP listener in the pod's namespace, without MPTCP like every
// listener Ferry opens, and answers each connection with the pod's name.
func listen(t *testing.T, l *Lab, pod string, port int) {
	t.Helper()
	h, err := l.Netns(pod)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	var ln net.Listener
	err = h.Do(func() error {
		lc := listener.Config()
		var err error
		ln, err = lc.Listen(context.Background(), "tcp", fmt.Sprintf(":%d", port))
		return err
	})
	if err != nil {
		t.Fatalf("listen in %s: %v", pod, err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			fmt.Fprintf(c, "%s %s\n", pod, c.RemoteAddr())
			c.Close()
		}
	}()
}

// dial connects from the pod's namespace and returns the first line the server sent.
func dial(l *Lab, from string, to netip.AddrPort) (string, error) {
	h, err := l.Netns(from)
	if err != nil {
		return "", err
	}
	defer h.Close()
	var c net.Conn
	err = h.Do(func() error {
		d := net.Dialer{Timeout: 3 * time.Second}
		var err error
		c, err = d.Dial("tcp", to.String())
		return err
	})
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	return strings.TrimSpace(line), err
}

func TestUpConnectivity(t *testing.T) {
	privileged.Require(t)
	t.Parallel()
	l := up(t, testConfig(t, "c"))
	a, _ := l.Pod("a")
	b, _ := l.Pod("b")
	c, _ := l.Pod("c")
	d, _ := l.Pod("d")
	if a.IP != netip.MustParseAddr("10.100.1.10") || b.IP != netip.MustParseAddr("10.100.1.11") ||
		d.IP != netip.MustParseAddr("10.100.1.12") || c.IP != netip.MustParseAddr("10.100.2.10") {
		t.Fatalf("pod IPs: a=%s b=%s c=%s d=%s", a.IP, b.IP, c.IP, d.IP)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, dst := range []PodInfo{b, c, d} {
		if err := l.Ping(ctx, "a", dst.IP); err != nil {
			t.Errorf("ping a -> %s: %v", dst.Name, err)
		}
	}
	if err := l.Ping(ctx, "c", a.IP); err != nil {
		t.Errorf("ping c -> a: %v", err)
	}

	listen(t, l, "c", 8080)
	listen(t, l, "b", 8080)
	for _, tc := range []struct{ from, to string }{{"a", "c"}, {"a", "b"}, {"d", "c"}} {
		dst, _ := l.Pod(tc.to)
		src, _ := l.Pod(tc.from)
		got, err := dial(l, tc.from, netip.AddrPortFrom(dst.IP, 8080))
		if err != nil {
			t.Errorf("tcp %s -> %s: %v", tc.from, tc.to, err)
			continue
		}
		// No NAT anywhere: the server sees the client pod's own address.
		if want := tc.to + " " + src.IP.String() + ":"; !strings.HasPrefix(got, want) {
			t.Errorf("tcp %s -> %s: server said %q, want %q...", tc.from, tc.to, got, want)
		}
	}
	// Nothing listens on 9: the connection is refused, not timed out.
	if _, err := dial(l, "a", netip.AddrPortFrom(c.IP, 9)); err == nil || !strings.Contains(err.Error(), "refused") {
		t.Errorf("tcp a -> c:9: %v, want connection refused", err)
	}
}

func TestCommandRunsInPodAndCgroup(t *testing.T) {
	privileged.Require(t)
	t.Parallel()
	l := up(t, testConfig(t, "x"))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := l.Command(ctx, "c", "sh", "-c", "cat /proc/self/cgroup; cat /proc/net/fib_trie; echo pod=$FERRY_LAB_POD").CombinedOutput()
	if err != nil {
		t.Fatalf("command: %v: %s", err, out)
	}
	s := string(out)
	mnt, _ := datapath.Cgroup2Mount()
	cg, _ := l.NodeCgroup("node2")
	rel := strings.TrimPrefix(cg, mnt)
	if !strings.Contains(s, "0::"+rel+"\n") {
		t.Errorf("process not in cgroup %s:\n%s", rel, s)
	}
	if !strings.Contains(s, "10.100.2.10") || strings.Contains(s, "10.99.0.") {
		t.Errorf("process not in c's namespace:\n%s", s)
	}
	if !strings.Contains(s, "pod=c") {
		t.Errorf("FERRY_LAB_POD not set:\n%s", s)
	}
	if err := l.Command(ctx, "nope", "true").Run(); err == nil {
		t.Error("command in unknown pod: no error")
	}
}

func TestRootNamespaceUntouched(t *testing.T) {
	privileged.Require(t)
	t.Parallel()
	l := up(t, testConfig(t, "r"))
	all, err := netlink.RouteList(nil, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range all {
		if r.Dst == nil {
			continue
		}
		ip, _ := netip.AddrFromSlice(r.Dst.IP)
		if FabricCIDR().Contains(ip.Unmap()) || PodCIDRs().Contains(ip.Unmap()) {
			t.Errorf("root namespace has a lab route: %s", r)
		}
	}
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range addrs {
		ip, _ := netip.AddrFromSlice(a.IP)
		if FabricCIDR().Contains(ip.Unmap()) || PodCIDRs().Contains(ip.Unmap()) {
			t.Errorf("root namespace has a lab address: %s", a)
		}
	}
	_ = l
}

func TestStateFiles(t *testing.T) {
	privileged.Require(t)
	t.Parallel()
	cfg := testConfig(t, "s")
	l := up(t, cfg)
	read := func(node string) *ferryv1.NodeState {
		p, err := l.StateFile(node)
		if err != nil {
			t.Fatal(err)
		}
		data, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		var st ferryv1.NodeState
		if err := protojson.Unmarshal(data, &st); err != nil {
			t.Fatal(err)
		}
		return &st
	}
	n1, n2 := read("node1"), read("node2")
	for _, st := range []*ferryv1.NodeState{n1, n2} {
		if st.Version != 1 || st.TrustDomain != "cluster.local" || len(st.TrustBundlePem) == 0 {
			t.Errorf("%s: version %d, trust domain %q, bundle %d bytes", st.Node, st.Version, st.TrustDomain, len(st.TrustBundlePem))
		}
		var names []string
		for _, w := range st.Workloads {
			names = append(names, w.Name)
		}
		if strings.Join(names, ",") != "a,b,c" {
			t.Errorf("%s: workloads %v, want a,b,c (d is not enrolled)", st.Node, names)
		}
	}
	if w := n1.Workloads[2]; w.Identity != "spiffe://cluster.local/ns/default/sa/c" || w.Node != "node2" || w.Ips[0] != "10.100.2.10" || w.Uid == "" {
		t.Errorf("workload c: %v", w)
	}
	if len(n1.Certificates) != 2 || len(n2.Certificates) != 1 {
		t.Fatalf("certificates: node1 %d, node2 %d; want 2 and 1", len(n1.Certificates), len(n2.Certificates))
	}
	// Each certificate chains to the bundle and carries its SPIFFE ID.
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(n2.TrustBundlePem)
	c := n2.Certificates[0]
	blk, _ := pem.Decode(c.CertChainPem)
	cert, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cert.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		t.Errorf("certificate of c: %v", err)
	}
	if len(cert.URIs) != 1 || cert.URIs[0].String() != c.Identity || c.Identity != "spiffe://cluster.local/ns/default/sa/c" {
		t.Errorf("certificate of c: URIs %v, identity %s", cert.URIs, c.Identity)
	}
	if blk, _ := pem.Decode(c.PrivateKeyPem); blk == nil || blk.Type != "PRIVATE KEY" {
		t.Errorf("private key of c is not PKCS#8 PEM")
	}

	// Another process reattaches from the description.
	l2, err := LoadDir(cfg.StateDir)
	if err != nil {
		t.Fatal(err)
	}
	if p, ok := l2.Pod("c"); !ok || p.IP.String() != "10.100.2.10" || p.Node != "node2" {
		t.Errorf("loaded pod c: %+v", p)
	}
	if st := l2.Status(); len(st.Nodes) != 2 || len(st.Pods) != 4 || st.Nodes[0].AgentAlive {
		t.Errorf("status: %+v", st)
	}
}

// leftovers lists what exists of a lab with this prefix.
func leftovers(t *testing.T, prefix, cgroupRoot string) []string {
	var out []string
	for _, n := range listNetns(prefix) {
		out = append(out, "netns "+n)
	}
	if _, err := os.Stat(cgroupRoot); err == nil {
		out = append(out, "cgroup "+cgroupRoot)
	}
	pins, _ := filepath.Glob(filepath.Join(BPFRoot, prefix+"-*"))
	for _, p := range pins {
		out = append(out, "pins "+p)
	}
	return out
}

func TestDownRemovesEverything(t *testing.T) {
	privileged.Require(t)
	t.Parallel()
	cfg := testConfig(t, "d")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	l, err := Up(ctx, cfg, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	// Removes the lab if the test stops before its own Down.
	t.Cleanup(func() { _ = Clean(cfg.Prefix, cfg.StateDir, nil) })
	mnt, _ := datapath.Cgroup2Mount()
	cgRoot := filepath.Join(mnt, cfg.Prefix)
	if got := leftovers(t, cfg.Prefix, cgRoot); len(got) != 8 {
		t.Fatalf("after up: %v, want 7 netns and the cgroup", got)
	}
	// A process left running in a pod must not keep anything alive.
	sleeper := l.Command(context.Background(), "a", "sleep", "300")
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	waited := make(chan error, 1)
	go func() { waited <- sleeper.Wait() }()
	if err := l.Down(); err != nil {
		t.Fatalf("down: %v", err)
	}
	select {
	case <-waited:
	case <-time.After(5 * time.Second):
		t.Error("down left the pod's process running")
	}
	if got := leftovers(t, cfg.Prefix, cgRoot); len(got) != 0 {
		t.Errorf("after down: %v", got)
	}
	if _, err := os.Stat(cfg.StateDir); !os.IsNotExist(err) {
		t.Errorf("state dir after down: %v", err)
	}
	// Down again, or Clean with nothing there, succeeds.
	if err := Clean(cfg.Prefix, cfg.StateDir, nil); err != nil {
		t.Errorf("clean of nothing: %v", err)
	}
}

func TestUpAfterCrash(t *testing.T) {
	privileged.Require(t)
	t.Parallel()
	cfg := testConfig(t, "k")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	first, err := Up(ctx, cfg, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	first.Close() // the "crashed" run never calls Down
	// Leftovers a crashed agent could have: a pin folder.
	pin := filepath.Join(BPFRoot, cfg.Prefix+"-node1")
	if err := os.MkdirAll(pin, 0o755); err != nil {
		t.Logf("cannot simulate a pin folder (%v); going on without", err)
	}
	l := up(t, cfg)
	if _, err := os.Stat(pin); err == nil {
		t.Errorf("pin folder %s survived up", pin)
	}
	listen(t, l, "c", 8081)
	c, _ := l.Pod("c")
	if _, err := dial(l, "a", netip.AddrPortFrom(c.IP, 8081)); err != nil {
		t.Errorf("tcp a -> c after second up: %v", err)
	}
}

func TestConfigValidation(t *testing.T) {
	for _, tc := range []struct {
		name string
		edit func(*Config)
	}{
		{"dash in prefix", func(c *Config) { c.Prefix = "f-y" }},
		{"no nodes", func(c *Config) { c.Nodes = nil }},
		{"duplicate pod", func(c *Config) { c.Nodes[1].Pods[0].Name = "a" }},
		{"pod named like node", func(c *Config) { c.Nodes[1].Pods[0].Name = "node1" }},
		{"bad node name", func(c *Config) { c.Nodes[0].Name = "Node_1" }},
		{"fabric node", func(c *Config) { c.Nodes[0].Name = "fabric" }},
	} {
		cfg := DefaultConfig()
		tc.edit(&cfg)
		if _, err := cfg.withDefaults(); err == nil {
			t.Errorf("%s: no error", tc.name)
		}
	}
	cfg, err := DefaultConfig().withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	if p := cfg.Nodes[0].Pods[0]; p.Namespace != "default" || p.ServiceAccount != "a" {
		t.Errorf("defaults: %+v", p)
	}
	if cfg.StateDir != "/run/ferry-lab/fy" {
		t.Errorf("state dir %s", cfg.StateDir)
	}
}

func TestParseStat(t *testing.T) {
	line := "123 (a) b) (c) S 1 123 123 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10"
	state, start, ok := parseStat([]byte(line))
	if !ok || state != "S" || start != 987654 {
		t.Errorf("parseStat: %q %d %v", state, start, ok)
	}
}

func TestRemovePinDirUnmountsBPFFS(t *testing.T) {
	privileged.Require(t)
	t.Parallel()
	// An agent may mount bpffs on its pin folder; Down must unmount it, not fail on it.
	dir := filepath.Join(t.TempDir(), "tp-node1")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("bpf", dir, "bpf", 0, ""); err != nil {
		t.Fatalf("mount bpffs: %v", err)
	}
	if err := os.Mkdir(filepath.Join(dir, "links"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := removePinDir(dir); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("pin folder still there: %v", err)
	}
	if mps := mountPointsUnder(dir); len(mps) != 0 {
		t.Errorf("still mounted: %v", mps)
	}
}
