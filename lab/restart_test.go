package lab

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/privileged"
)

// RestartAgent stops the agent with the signal asked for and starts it again with the
// flags it ran with, the lab's and the extra ones; a stopped agent is started.
func TestRestartAgent(t *testing.T) {
	privileged.Require(t)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	// The wrapper execs the fake agent under another argv[0], as setpriv would.
	wrapper := filepath.Join(dir, "ferry-agent")
	script := fmt.Sprintf("#!/bin/sh\nFERRY_LAB_FAKE_AGENT=1 FERRY_LAB_FAKE_RECORD=%s exec %s \"$@\"\n", filepath.Join(dir, "record"), self)
	if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	cfg := testConfig(t, "q")
	cfg.AgentBinary = wrapper
	cfg.AgentArgs = []string{"--extra=lab"}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	l, err := Up(ctx, cfg, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = Clean(cfg.Prefix, cfg.StateDir, nil) })
	args := func(node string) []string {
		t.Helper()
		resp, err := l.AgentClient(node).Get("http://agent/status")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var st fakeStatus
		if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
			t.Fatal(err)
		}
		return st.Args
	}
	if err := l.WaitAgentReady(ctx, "node1"); err != nil {
		t.Fatal(err)
	}
	if err := l.StopAgent("node1", syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := l.StartAgent("node1", "--extra=mine"); err != nil {
		t.Fatal(err)
	}
	if err := l.WaitAgentReady(ctx, "node1"); err != nil {
		t.Fatal(err)
	}
	want := args("node1")

	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
		old := l.AgentPID("node1")
		r, err := l.RestartAgent(ctx, "node1", sig)
		if err != nil {
			t.Fatalf("restart with %v: %v", sig, err)
		}
		if r.OldPID != old || r.NewPID == old || r.NewPID != l.AgentPID("node1") {
			t.Errorf("restart with %v: %+v, old pid %d, now %d", sig, r, old, l.AgentPID("node1"))
		}
		if !slices.Equal(r.Args, []string{"--extra=mine"}) {
			t.Errorf("restart with %v kept args %q, want the extra one", sig, r.Args)
		}
		if got := args("node1"); !slices.Equal(got, want) {
			t.Errorf("restart with %v: agent runs with %q, want %q", sig, got, want)
		}
		// After SIGTERM the new agent starts beside the old one, which exits once
		// the new one has taken over; after SIGKILL it starts once the old is gone.
		if sig == syscall.SIGTERM && (r.Stopped == 0 || r.Ready > r.Stopped) {
			t.Errorf("restart with %v: ready after %s, the old one exited after %s; want it to exit after the new one is ready", sig, r.Ready, r.Stopped)
		}
		if sig == syscall.SIGKILL && r.Ready < r.Stopped {
			t.Errorf("restart with %v: ready after %s, before it stopped (%s)", sig, r.Ready, r.Stopped)
		}
	}

	if err := l.StopAgent("node2", syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	r, err := l.RestartAgent(ctx, "node2", syscall.SIGTERM)
	if err != nil {
		t.Fatal(err)
	}
	if r.OldPID != 0 || r.NewPID == 0 || len(r.Args) != 0 {
		t.Errorf("restart of a stopped agent: %+v", r)
	}
	if _, err := l.RestartAgent(ctx, "node9", syscall.SIGTERM); err == nil {
		t.Error("restart of a node that does not exist: no error")
	}
}
