package lab

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"github.com/ferrymesh/ferry/agent/datapath"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/listener"
	"github.com/ferrymesh/ferry/internal/privileged"
)

// The test binary doubles as a stand-in agent, so these tests run before the real
// ferry-agent exists: with FERRY_LAB_FAKE_AGENT=1 it takes the agent's flags, serves
// GET /status on the admin socket, and records --cleanup runs.
func TestMain(m *testing.M) {
	if os.Getenv("FERRY_LAB_FAKE_AGENT") == "1" {
		if err := fakeAgent(os.Args[1:]); err != nil {
			fmt.Fprintln(os.Stderr, "fake agent:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

type fakeStatus struct {
	Node   string   `json:"node"`
	Cgroup string   `json:"cgroup"`
	Addrs  []string `json:"addrs"`
	Args   []string `json:"args"`
}

func fakeAgent(args []string) error {
	fs := flag.NewFlagSet("fake-agent", flag.ContinueOnError)
	node := fs.String("node", "", "")
	fs.String("state", "", "")
	pins := fs.String("bpf-pin-dir", "", "")
	cg := fs.String("cgroup", "", "")
	sock := fs.String("admin-socket", "", "")
	cleanup := fs.Bool("cleanup", false, "")
	fs.String("extra", "", "")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *cleanup {
		f, err := os.OpenFile(os.Getenv("FERRY_LAB_FAKE_RECORD"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			return err
		}
		defer f.Close()
		_, err = fmt.Fprintf(f, "cleanup %s %s\n", *pins, *cg)
		return err
	}
	self, _ := os.ReadFile("/proc/self/cgroup")
	var addrs []string
	ifaddrs, _ := net.InterfaceAddrs()
	for _, a := range ifaddrs {
		addrs = append(addrs, a.String())
	}
	st := fakeStatus{Node: *node, Cgroup: string(self), Addrs: addrs, Args: args}
	// As the real agent does: a predecessor's socket is replaced (an upgrade runs
	// the new agent beside the old one), and only its own is removed on close.
	ln, err := listener.Unix(context.Background(), *sock)
	if err != nil {
		return err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(st)
	})
	srv := &http.Server{Handler: mux}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

func TestAgents(t *testing.T) {
	privileged.Require(t)
	t.Parallel()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	record := filepath.Join(dir, "record")
	// A wrapper sets the fake agent's environment without touching this process's.
	wrapper := filepath.Join(dir, "ferry-agent")
	script := fmt.Sprintf("#!/bin/sh\nFERRY_LAB_FAKE_AGENT=1 FERRY_LAB_FAKE_RECORD=%s exec %s \"$@\"\n", record, self)
	if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}

	cfg := testConfig(t, "a")
	cfg.AgentBinary = wrapper
	cfg.AgentArgs = []string{"--extra=yes"}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	l, err := Up(ctx, cfg, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = Clean(cfg.Prefix, cfg.StateDir, nil) })

	status := func(node string) fakeStatus {
		t.Helper()
		if err := l.WaitAgentReady(ctx, node); err != nil {
			t.Fatal(err)
		}
		resp, err := l.AgentClient(node).Get("http://agent/status")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var st fakeStatus
		if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
			t.Fatal(err)
		}
		return st
	}
	mnt, _ := datapath.Cgroup2Mount()
	for i, node := range []string{"node1", "node2"} {
		st := status(node)
		cg, _ := l.NodeCgroup(node)
		if !strings.Contains(st.Cgroup, "0::"+strings.TrimPrefix(cg, mnt)+"\n") {
			t.Errorf("agent on %s not in its cgroup: %s", node, st.Cgroup)
		}
		if want := fmt.Sprintf("10.99.0.%d/24", i+1); !strings.Contains(strings.Join(st.Addrs, " "), want) {
			t.Errorf("agent on %s not in its netns: addrs %v", node, st.Addrs)
		}
		if st.Node != node || st.Args[len(st.Args)-1] != "--extra=yes" {
			t.Errorf("agent on %s: args %v", node, st.Args)
		}
		if l.AgentPID(node) == 0 {
			t.Errorf("agent on %s: no pid", node)
		}
	}

	// A crash (SIGKILL) and a restart.
	old := l.AgentPID("node2")
	if err := l.StopAgent("node2", syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if l.AgentPID("node2") != 0 {
		t.Error("killed agent still reported running")
	}
	if st := l.Status(); st.Nodes[1].AgentAlive || !st.Nodes[0].AgentAlive {
		t.Errorf("status after kill: %+v", st.Nodes)
	}
	if err := l.StartAgent("node2"); err != nil {
		t.Fatal(err)
	}
	if pid := l.AgentPID("node2"); pid == 0 || pid == old {
		t.Errorf("restarted agent pid %d (old %d)", pid, old)
	}
	status("node2")
	if err := l.StartAgent("node2"); err == nil {
		t.Error("second StartAgent on a running node: no error")
	}

	// Another process sees the same agents.
	other, err := LoadDir(cfg.StateDir)
	if err != nil {
		t.Fatal(err)
	}
	if other.AgentPID("node1") != l.AgentPID("node1") || other.AgentPID("node2") != l.AgentPID("node2") {
		t.Errorf("loaded lab sees agents %d %d, want %d %d", other.AgentPID("node1"), other.AgentPID("node2"), l.AgentPID("node1"), l.AgentPID("node2"))
	}

	// Down from the other process: agents stopped, cleanup run per node.
	pids := []int{l.AgentPID("node1"), l.AgentPID("node2")}
	if err := other.Down(); err != nil {
		t.Fatal(err)
	}
	for _, pid := range pids {
		if pidAlive(pid, 0) {
			t.Errorf("agent pid %d survives down", pid)
		}
	}
	rec, _ := os.ReadFile(record)
	for _, node := range []string{"node1", "node2"} {
		want := fmt.Sprintf("cleanup %s %s", filepath.Join(BPFRoot, cfg.Prefix+"-"+node), filepath.Join(mnt, cfg.Prefix, node))
		if !strings.Contains(string(rec), want) {
			t.Errorf("no %q in cleanup record:\n%s", want, rec)
		}
	}
	if got := leftovers(t, cfg.Prefix, filepath.Join(mnt, cfg.Prefix)); len(got) != 0 {
		t.Errorf("after down: %v", got)
	}
}
