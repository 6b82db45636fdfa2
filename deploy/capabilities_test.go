package deploy_test

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/deploy"
	"github.com/ferrymesh/ferry/internal/privileged"
	"github.com/ferrymesh/ferry/lab"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// capBits are the capability numbers of linux/capability.h that the agent
// may be given.
var capBits = map[string]uint{
	"DAC_READ_SEARCH": 2, "NET_ADMIN": 12, "NET_RAW": 13, "SYS_PTRACE": 19,
	"SYS_ADMIN": 21, "SYS_RESOURCE": 24, "PERFMON": 38, "BPF": 39,
}

// daemonSetCapabilities returns the capabilities the agent container adds.
func daemonSetCapabilities(t *testing.T) []string {
	t.Helper()
	objs, err := deploy.Render(deploy.Options{})
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range objs {
		if o.GetKind() != "DaemonSet" {
			continue
		}
		containers, _, _ := unstructured.NestedSlice(o.Object, "spec", "template", "spec", "containers")
		for _, c := range containers {
			c := c.(map[string]any)
			if c["name"] != "agent" {
				continue
			}
			add, _, _ := unstructured.NestedStringSlice(c, "securityContext", "capabilities", "add")
			drop, _, _ := unstructured.NestedStringSlice(c, "securityContext", "capabilities", "drop")
			if len(drop) != 1 || drop[0] != "ALL" {
				t.Fatalf("agent container drops %v, want ALL", drop)
			}
			return add
		}
	}
	t.Fatal("no agent container in the DaemonSet")
	return nil
}

// runLabWithCapabilities brings up the default two-node lab with agents that
// run as root but with only caps in their bounding (and so effective) set, as
// the DaemonSet's container would, sends the demo's traffic and returns the
// table of what the agents carried and the agents' logs.
func runLabWithCapabilities(t *testing.T, prefix string, podNet uint8, caps []string) (table, logs string, err error) {
	t.Helper()
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		t.Fatalf("setpriv (util-linux) is needed to drop capabilities: %v", err)
	}
	bin := t.TempDir()
	build := exec.CommandContext(t.Context(), "go", "build", "-o", bin+"/", "github.com/ferrymesh/ferry/cmd/ferry", "github.com/ferrymesh/ferry/cmd/ferry-agent")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	set := "-all"
	var want uint64
	for _, c := range caps {
		set += ",+" + strings.ToLower(c)
		want |= 1 << capBits[c]
	}
	wrapper := filepath.Join(bin, "agent-with-caps")
	script := fmt.Sprintf("#!/bin/sh\nexec %s --bounding-set=%s --inh-caps=-all -- %s \"$@\"\n", setpriv, set, filepath.Join(bin, "ferry-agent"))
	if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}

	cfg := lab.DefaultConfig()
	cfg.Prefix, cfg.PodNet, cfg.AgentBinary = prefix, podNet, wrapper
	cfg.StateDir = filepath.Join(t.TempDir(), "state")
	log := slog.New(slog.NewTextHandler(&bytes.Buffer{}, nil))
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	l, err := lab.Up(ctx, cfg, log)
	if err != nil {
		t.Fatalf("lab up: %v", err)
	}
	defer func() {
		if err := l.Down(); err != nil {
			t.Errorf("lab down: %v", err)
		}
	}()

	agentLogs := func() string {
		var b strings.Builder
		for _, n := range l.Nodes() {
			data, _ := os.ReadFile(l.AgentLog(n))
			fmt.Fprintf(&b, "--- agent on %s:\n%s", n, data)
		}
		return b.String()
	}
	// Read before Down removes the state folder (deferred calls run last first).
	defer func() { logs = agentLogs() }()
	for _, n := range l.Nodes() {
		if err := l.WaitAgentReady(ctx, n); err != nil {
			return "", "", fmt.Errorf("agent on %s: %w", n, err)
		}
		status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", l.AgentPID(n)))
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(string(status), "\n") {
			if hex, ok := strings.CutPrefix(line, "CapEff:\t"); ok {
				got, _ := strconv.ParseUint(strings.TrimSpace(hex), 16, 64)
				if got != want {
					t.Errorf("agent on %s runs with capabilities %#x, want exactly %#x (%v)", n, got, want, caps)
				}
			}
		}
	}
	// The demo's traffic (lab.Demo itself would start its servers from
	// os.Executable, the test binary here).
	ferry := filepath.Join(bin, "ferry")
	for _, p := range l.Pods() {
		srv := l.Command(context.Background(), p.Name, ferry, "lab", "echo-server", "--listen", fmt.Sprintf(":%d", lab.DemoPort))
		sctx, scancel := context.WithTimeout(ctx, 10*time.Second)
		proc, err := l.StartInPod(sctx, p.Name, lab.DemoPort, srv)
		scancel()
		if err != nil {
			t.Fatal(err)
		}
		defer proc.Stop()
	}
	for _, r := range lab.DemoRoutes {
		to, ok := l.Pod(r.To)
		if !ok {
			continue // a route to a Service: this lab has none
		}
		client := l.Command(ctx, r.From, ferry, "lab", "echo-client",
			"--to", netip.AddrPortFrom(to.IP, lab.DemoPort).String(), "--bytes", "1MiB")
		if res, err := client.CombinedOutput(); err != nil {
			return "", "", fmt.Errorf("%s → %s (%s): %w\n%s", r.From, r.To, r.What, err, res)
		}
	}
	var out bytes.Buffer
	if err := l.WriteCarried(ctx, &out); err != nil {
		return "", "", err
	}
	return out.String(), "", nil
}

// carried returns the (from, to, how) rows of lab.WriteCarried's table.
func carried(table string) map[[3]string]bool {
	rows := map[[3]string]bool{}
	for _, line := range strings.Split(table, "\n") {
		f := strings.Fields(line)
		// AGENT DIRECTION FROM TO VIA-SERVICE HOW ...
		if len(f) >= 6 && (f[1] == "inbound" || f[1] == "outbound") {
			rows[[3]string{f[2], f[3], f[5]}] = true
		}
	}
	return rows
}

// TestAgentCapabilities runs the agent in the lab with exactly the
// capabilities the DaemonSet gives it, and checks the mesh works: mTLS across
// nodes, same-node, and plaintext in and out of the mesh. Then it takes away
// the ones the manifest says are needed, one at a time, and checks the mesh
// stops carrying mTLS without each. (BPF and PERFMON are covered by SYS_ADMIN, so they cannot
// be shown necessary while SYS_ADMIN is there; SYS_PTRACE matters for pods whose
// processes run as another user, which lab pods do not.)
func TestAgentCapabilities(t *testing.T) {
	privileged.Require(t)
	caps := daemonSetCapabilities(t)

	t.Run("the DaemonSet's capabilities are enough", func(t *testing.T) {
		out, logs, err := runLabWithCapabilities(t, "dcap", 110, caps)
		t.Logf("agents with %v:\n%s", caps, out)
		if err != nil {
			t.Fatalf("%v\n%s", err, logs)
		}
		rows := carried(out)
		for _, want := range [][3]string{
			{"a", "c", "mtls"}, {"a", "b", "same-node"}, {"d", "c", "plaintext"}, {"a", "d", "plaintext"},
		} {
			if !rows[want] {
				t.Errorf("%s → %s was not carried as %s", want[0], want[1], want[2])
			}
		}
	})

	// What the agents say without each: the kernel's EPERM where the capability is
	// needed, or the outcome it leads to.
	for _, tc := range []struct {
		drop string
		says []string
		// carriesNothing: no pod gets enrolled, so the agents record no connection.
		carriesNothing bool
	}{
		// SO_MARK on the tunnel socket, so the agent's own traffic is not captured.
		{drop: "NET_ADMIN", says: []string{"set SO_MARK: operation not permitted"}},
		// setns into the pods' network namespaces, to find each pod by its IP: the
		// agent says which capability is missing.
		{drop: "SYS_ADMIN", carriesNothing: true, says: []string{
			"pod default/a: no network namespace we could open holds", "pod default/b: no network namespace we could open holds", "pod default/c: no network namespace we could open holds",
			"is CAP_SYS_ADMIN or CAP_SYS_PTRACE missing?",
		}},
	} {
		drop := tc.drop
		t.Run("without "+drop, func(t *testing.T) {
			var fewer []string
			for _, c := range caps {
				if c != drop {
					fewer = append(fewer, c)
				}
			}
			if len(fewer) == len(caps) {
				t.Fatalf("the DaemonSet does not add %s", drop)
			}
			out, logs, err := runLabWithCapabilities(t, "dcap", 110, fewer)
			t.Logf("agents with %v: %v\n%s", fewer, err, out)
			if err == nil && carried(out)[[3]string{"a", "c", "mtls"}] {
				t.Errorf("a → c was carried over mTLS without %s: the DaemonSet need not add it", drop)
			}
			for _, says := range tc.says {
				if !strings.Contains(logs, says) {
					t.Errorf("without %s the agents never say %q", drop, says)
				}
			}
			if rows := carried(out); tc.carriesNothing && (err != nil || len(rows) != 0) {
				t.Errorf("without %s no pod is enrolled, so the traffic passes and no agent records it; got %v, records %v", drop, err, rows)
			}
			if t.Failed() {
				t.Logf("agent logs:\n%s", logs)
			}
		})
	}
}
