// This file restarts a node's agent the way a supervisor (the kubelet, systemd) does:
// stop it with a signal and start the same command again at once, in the same network
// namespace and cgroup.

package lab

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"syscall"
	"time"
)

// Restarted says what RestartAgent did and how long the node went without an agent.
type Restarted struct {
	Node   string `json:"node"`
	OldPID int    `json:"oldPID"` // 0: no agent was running
	NewPID int    `json:"newPID"`
	// Args are the agent's flags after the lab's own, kept from the old agent's
	// command line (what StartAgent's extraArgs were).
	Args []string `json:"args,omitempty"`
	// Stopped is the time from the signal to the old agent's exit; Ready from the
	// signal to the new agent answering on its admin socket.
	Stopped time.Duration `json:"stopped"`
	Ready   time.Duration `json:"ready"`
}

// RestartAgent sends sig (SIGTERM for a rolling restart, SIGKILL for a crash) to the
// node's agent and starts it again with the same command line, in the node's
// network namespace and cgroup, then waits (until ctx ends) for it to be ready. For
// SIGKILL it kills the old agent and waits for its exit first; for SIGTERM it starts
// the new one first, which takes the old one's listeners over (UpgradeAgent), then
// signals the old one and waits for it to drain and exit (Stopped is 0 if it still
// drains when ctx ends). A node whose agent is not running has it started.
func (l *Lab) RestartAgent(ctx context.Context, node string, sig syscall.Signal) (Restarted, error) {
	r := Restarted{Node: node, OldPID: l.AgentPID(node)}
	if r.OldPID != 0 {
		args, err := l.agentExtraArgs(node, r.OldPID)
		if err != nil {
			return r, fmt.Errorf("restart agent on %s: %w", node, err)
		}
		r.Args = args
	}
	if r.OldPID != 0 && sig == syscall.SIGTERM {
		// A restart is an upgrade to the same binary: the new agent starts beside
		// the old one and takes its listeners over; then the old one is told to
		// stop, and drains and exits.
		u, err := l.UpgradeAgent(ctx, node, sig, true)
		r.NewPID, r.Ready, r.Stopped = u.NewPID, u.Serving, u.Exited
		if err != nil {
			return r, fmt.Errorf("restart agent on %s: %w", node, err)
		}
		l.log.Info("agent restarted", "node", node, "signal", sig.String(), "old_pid", r.OldPID, "new_pid", r.NewPID,
			"stopped", r.Stopped, "ready", r.Ready)
		return r, nil
	}
	start := time.Now()
	if r.OldPID != 0 {
		if err := l.StopAgent(node, sig); err != nil {
			return r, fmt.Errorf("restart agent on %s: %w", node, err)
		}
	}
	r.Stopped = time.Since(start)
	if err := l.StartAgent(node, r.Args...); err != nil {
		return r, fmt.Errorf("restart agent on %s: %w", node, err)
	}
	r.NewPID = l.AgentPID(node)
	if err := l.WaitAgentReady(ctx, node); err != nil {
		return r, fmt.Errorf("restart agent on %s: %w", node, err)
	}
	r.Ready = time.Since(start)
	l.log.Info("agent restarted", "node", node, "signal", sig.String(), "old_pid", r.OldPID, "new_pid", r.NewPID,
		"stopped", r.Stopped, "ready", r.Ready)
	return r, nil
}

// agentExtraArgs are the flags the running agent pid was started with beyond the
// lab's own and its AgentArgs: its command line (/proc/PID/cmdline, the agent's
// once nsenter has exec'd it) less the prefix StartAgent always gives.
func (l *Lab) agentExtraArgs(node string, pid int) ([]string, error) {
	l.mu.Lock()
	n, err := l.node(node)
	var base []string
	if err == nil {
		// nsenter --net=NETNS -- BINARY FLAGS...: the agent's argv starts at BINARY.
		base = l.agentCommand(n, l.desc.Config.AgentArgs...).Args[3:]
	}
	l.mu.Unlock()
	if err != nil {
		return nil, err
	}
	raw, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "cmdline"))
	if err != nil {
		return nil, fmt.Errorf("command line of pid %d: %w", pid, err)
	}
	var argv []string
	for _, a := range bytes.Split(bytes.TrimSuffix(raw, []byte{0}), []byte{0}) {
		argv = append(argv, string(a))
	}
	// The flags, not argv[0]: a wrapper the lab runs as its agent binary (setpriv,
	// say) may exec the agent under another name.
	if len(argv) < len(base) || !slices.Equal(argv[1:len(base)], base[1:]) {
		return nil, fmt.Errorf("pid %d runs %q, not the lab's agent command %q", pid, argv, base)
	}
	return argv[len(base):], nil
}
