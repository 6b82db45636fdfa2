package e2e

import (
	"context"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/lab"
)

// `ferry-agent --cleanup` leaves no Ferry program, map, link or pin: every kernel
// object the agent held (pinned or not, .rodata included) is gone as bpftool sees it. It runs on a lab of its
// own, since other labs' agents keep their own programs loaded meanwhile.
func TestAgentCleanup(t *testing.T) {
	e := setup(t) // for the binaries
	cfg := lab.Config{
		Prefix:      "e2ecln",
		PodNet:      101, // apart from the shared lab, which is up meanwhile
		AgentBinary: filepath.Join(e.bin, "ferry-agent"),
		// With the fast path the agent holds every kind of object: sk_msg and its link too.
		AgentArgs: []string{"--fast-path=true"},
		Nodes:     []lab.NodeConfig{{Name: "node1", Pods: []lab.PodConfig{{Name: "a", Enrolled: true}}}},
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	l, err := lab.Up(ctx, cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Down()
	if err := l.WaitAgentReady(ctx, "node1"); err != nil {
		t.Fatalf("%v\n%s", err, tailFile(l.AgentLog("node1"), 40))
	}
	pinDir := filepath.Join(lab.BPFRoot, cfg.Prefix+"-node1")
	ours := agentObjects(t, pinDir, l.AgentPID("node1"))
	checkObjects(t, ours)
	t.Logf("objects of the agent before cleanup:\n%s", ours)

	if err := l.StopAgent("node1", syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	cgroup, err := l.NodeCgroup("node1")
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(cfg.AgentBinary, "--cleanup", "--bpf-pin-dir", pinDir, "--cgroup", cgroup).CombinedOutput()
	if err != nil {
		t.Fatalf("ferry-agent --cleanup: %v\n%s", err, out)
	}
	if _, err := os.Stat(pinDir); !os.IsNotExist(err) {
		t.Fatalf("pin folder %s still there after cleanup (%v)", pinDir, err)
	}
	if left := waitGone(t, ours.ids); len(left) > 0 {
		t.Fatalf("bpftool still lists after cleanup: %v", left)
	}
}
