package bench

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/api/admin"
	"github.com/ferrymesh/ferry/internal/privileged"
	"github.com/ferrymesh/ferry/lab"
)

// TestIPTablesCapture runs the agents with --capture=iptables in a lab of its own and
// checks what a user would see: bytes arrive through the proxy across nodes (mTLS)
// and on the same node, the agent saw the original destinations, the eBPF capture
// does not apply to the pods, and the rules go when the agent stops.
func TestIPTablesCapture(t *testing.T) {
	privileged.Require(t)
	if _, err := exec.LookPath("iptables"); err != nil {
		t.Fatalf("iptables is not installed (run make deps): %v", err)
	}
	bin := t.TempDir()
	build := exec.Command("go", "build", "-o", bin+"/", "github.com/ferrymesh/ferry/cmd/ferry", "github.com/ferrymesh/ferry/cmd/ferry-agent")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	cfg := lab.Config{
		Prefix: "bnipt",
		PodNet: LabPodNet,
		// Two empty nodes first, so this lab's pods (10.104.3.x, 10.104.4.x) never share
		// an address with the benchmark lab's (10.104.1.x, 10.104.2.x): agents find pods
		// by IP, and the two may be up at once.
		Nodes: []lab.NodeConfig{
			{Name: "spare1"}, {Name: "spare2"},
			{Name: "node1", Pods: []lab.PodConfig{{Name: "a", Enrolled: true}, {Name: "b", Enrolled: true}}},
			{Name: "node2", Pods: []lab.PodConfig{{Name: "c", Enrolled: true}}},
		},
		AgentBinary: filepath.Join(bin, "ferry-agent"),
		AgentArgs:   []string{"--capture=iptables"},
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	l, err := lab.Up(ctx, cfg, slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := l.Down(); err != nil {
			t.Errorf("lab down: %v", err)
		}
	})
	for _, n := range l.Nodes() {
		if err := l.WaitAgentReady(ctx, n); err != nil {
			t.Fatal(err)
		}
	}
	ferry := filepath.Join(bin, "ferry")
	for _, pod := range []string{"b", "c"} {
		srv := l.Command(ctx, pod, ferry, "lab", "echo-server", "--listen", ":8080")
		if err := srv.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { srv.Process.Kill(); srv.Wait() })
	}
	a, _ := l.Pod("a")
	for _, tc := range []struct {
		dst  string
		node string // where the destination's agent runs
		sec  admin.Security
	}{{"c", "node2", admin.MTLS}, {"b", "node1", admin.SameNode}} {
		dst, _ := l.Pod(tc.dst)
		to := fmt.Sprintf("%s:8080", dst.IP)
		var out []byte
		var attempt time.Time
		// The echo server may still be starting: retry the first connection briefly.
		for try := 0; ; try++ {
			attempt = time.Now()
			out, err = l.Command(ctx, "a", ferry, "lab", "echo-client", "--to", to, "--bytes", "1MiB", "--conns", "2").CombinedOutput()
			if err == nil || try == 20 {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if err != nil {
			t.Fatalf("a → %s: %v\n%s", tc.dst, err, out)
		}
		// The source agent's outbound record: the original destination, carried as tc.sec.
		conns, err := admin.NewClient(l.AgentSocket("node1")).Connections(ctx)
		if err != nil {
			t.Fatal(err)
		}
		found := 0
		for _, c := range conns.Ended {
			// Attempts made before the echo server listened end refused, and an
			// attempt whose other connection was refused is made again: count the
			// last attempt's connections only.
			if !c.Start.Before(attempt) && c.Direction == admin.Outbound && c.Dst.String() == to && c.Src.Addr() == a.IP && c.Verdict == admin.VerdictForwarded && c.Reason == admin.ReasonNone {
				found++
				if c.Security != tc.sec || c.DstIdentity != dst.Identity || c.BytesSent != 1<<20 {
					t.Errorf("a → %s: %+v; want security %s, identity %s, 1 MiB sent", tc.dst, c, tc.sec, dst.Identity)
				}
			}
		}
		if found != 2 {
			t.Errorf("a → %s: the agent on node1 recorded %d successful outbound connections to %s, want 2:\n%+v", tc.dst, found, to, conns.Ended)
		}
	}
	// A plaintext client outside the mesh (the node itself) is captured inbound by
	// PREROUTING, and the agent sees the pod's port, not 15006.
	out, err := exec.CommandContext(ctx, "nsenter", "--net="+nodeNetns(t, l, "node2"), ferry, "lab", "echo-client", "--to", mustPod(t, l, "c").IP.String()+":8080", "--bytes", "64KiB").CombinedOutput()
	if err != nil {
		t.Fatalf("node2 → c: %v\n%s", err, out)
	}
	conns, err := admin.NewClient(l.AgentSocket("node2")).Connections(ctx)
	if err != nil {
		t.Fatal(err)
	}
	inbound := false
	for _, c := range conns.Ended {
		if c.Direction == admin.Inbound && c.Security == admin.Plaintext && c.Dst.Port() == 8080 {
			inbound = true
		}
	}
	if !inbound {
		t.Errorf("node2 agent recorded no plaintext inbound connection to port 8080: %+v", conns.Ended)
	}
	// The pods are captured by iptables only: nothing in the eBPF enrollment map.
	bpfOut, err := exec.CommandContext(ctx, ferry, "bpf", "maps", "--pin-dir", "/sys/fs/bpf/bnipt-node1").CombinedOutput()
	if err != nil {
		t.Fatalf("ferry bpf maps: %v\n%s", err, bpfOut)
	}
	if strings.Contains(string(bpfOut), "default/a") {
		t.Errorf("pod a is enrolled in the eBPF map under iptables capture:\n%s", bpfOut)
	}
	rules := iptablesSave(t, mustPod(t, l, "a").Netns)
	for _, want := range []string{"FERRY_OUTPUT", "FERRY_PREROUTING", "--to-ports 15001", "--to-ports 15006"} {
		if !strings.Contains(rules, want) {
			t.Errorf("pod a's nat table lacks %q:\n%s", want, rules)
		}
	}
	if err := l.StopAgent("node1", syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if rules := iptablesSave(t, mustPod(t, l, "a").Netns); strings.Contains(rules, "FERRY") {
		t.Errorf("the stopped agent left its rules in pod a:\n%s", rules)
	}
	// A killed agent leaves its rules; ferry-agent --cleanup with the state removes them.
	if err := l.StopAgent("node2", syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	cNetns := mustPod(t, l, "c").Netns
	if rules := iptablesSave(t, cNetns); !strings.Contains(rules, "FERRY_OUTPUT") {
		t.Fatalf("pod c lost its rules before cleanup:\n%s", rules)
	}
	stateFile, err := l.StateFile("node2")
	if err != nil {
		t.Fatal(err)
	}
	cg, err := l.NodeCgroup("node2")
	if err != nil {
		t.Fatal(err)
	}
	out, err = exec.CommandContext(ctx, cfg.AgentBinary, "--cleanup", "--node", "node2", "--state", stateFile,
		"--bpf-pin-dir", "/sys/fs/bpf/bnipt-node2", "--cgroup", cg).CombinedOutput()
	if err != nil {
		t.Fatalf("ferry-agent --cleanup: %v\n%s", err, out)
	}
	if rules := iptablesSave(t, cNetns); strings.Contains(rules, "FERRY") {
		t.Errorf("ferry-agent --cleanup left the rules in pod c:\n%s", rules)
	}
}

func mustPod(t *testing.T, l *lab.Lab, name string) lab.PodInfo {
	t.Helper()
	p, ok := l.Pod(name)
	if !ok {
		t.Fatalf("no pod %s", name)
	}
	return p
}

func nodeNetns(t *testing.T, l *lab.Lab, node string) string {
	t.Helper()
	p, err := l.NetnsPath(node)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func iptablesSave(t *testing.T, netnsPath string) string {
	t.Helper()
	out, err := exec.Command("nsenter", "--net="+netnsPath, "iptables-save", "-t", "nat").CombinedOutput()
	if err != nil {
		t.Fatalf("iptables-save: %v\n%s", err, out)
	}
	return string(out)
}
