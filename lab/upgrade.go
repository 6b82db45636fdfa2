// This file upgrades a node's agent the way a DaemonSet with maxSurge does: a new
// agent starts beside the running one, takes its listeners over (agent/handoff),
// and the old one drains and exits.

package lab

import (
	"context"
	"errors"
	"fmt"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Upgraded says what UpgradeAgent did and how long each step took.
type Upgraded struct {
	Node   string   `json:"node"`
	OldPID int      `json:"oldPID"`
	NewPID int      `json:"newPID"`
	Args   []string `json:"args,omitempty"`
	// Serving is the time from the new agent's start to its answering on the admin
	// socket, which it opens once it serves on the listeners it took over; Exited,
	// to the old agent's exit (0 when it still drained as the wait ended).
	Serving time.Duration `json:"serving"`
	Exited  time.Duration `json:"exited,omitempty"`
}

// drainingAgent is an agent that handed its listeners to a newer one and drains.
type drainingAgent struct {
	PID   int    `json:"pid"`
	Start uint64 `json:"start"`
}

// UpgradeAgent starts a second agent for node with the running one's command line,
// in the node's network namespace and cgroup, beside the running one: it finds the
// old one's lock held and takes over from it. UpgradeAgent waits until it serves
// (until ctx ends), then sends sig (0: none) to the old agent, as a supervisor
// stopping it would, and with waitExit waits until the old agent has drained and
// exited.
func (l *Lab) UpgradeAgent(ctx context.Context, node string, sig syscall.Signal, waitExit bool) (Upgraded, error) {
	u := Upgraded{Node: node, OldPID: l.AgentPID(node)}
	if u.OldPID == 0 {
		return u, fmt.Errorf("upgrade agent on %s: not running", node)
	}
	args, err := l.agentExtraArgs(node, u.OldPID)
	if err != nil {
		return u, fmt.Errorf("upgrade agent on %s: %w", node, err)
	}
	u.Args = args
	l.mu.Lock()
	n, err := l.node(node)
	if err != nil {
		l.mu.Unlock()
		return u, err
	}
	oldProc := l.procs[node]
	oldStart := n.AgentStart
	start := time.Now()
	p, err := l.spawnAgentLocked(n, args)
	if err != nil {
		l.mu.Unlock()
		return u, err
	}
	u.NewPID = p.pid
	// From here the new agent is the node's; the old one drains.
	l.procs[node] = p
	n.AgentPID = p.pid
	n.AgentStart, _ = procStartTime(p.pid)
	n.Draining = append(n.Draining, drainingAgent{PID: u.OldPID, Start: oldStart})
	if err := l.save(); err != nil {
		l.mu.Unlock()
		return u, err
	}
	l.mu.Unlock()

	// Serving: the admin socket is the new agent's (the process listening on it is
	// the new one: a file's identity would not do, since a file system such as ext4
	// gives a new socket file the inode number of the old one it replaced) and answers.
	for {
		if listenerPID(l.AgentSocket(node)) == p.pid {
			if err := l.WaitAgentReady(ctx, node); err != nil {
				return u, fmt.Errorf("upgrade agent on %s: %w", node, err)
			}
			break
		}
		if l.AgentPID(node) == 0 {
			return u, fmt.Errorf("upgrade agent on %s: the new agent exited; end of %s:\n%s", node, l.AgentLog(node), tail(l.AgentLog(node), 20))
		}
		select {
		case <-ctx.Done():
			return u, fmt.Errorf("upgrade agent on %s: new agent not serving: %w", node, ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
	u.Serving = time.Since(start)
	if sig != 0 {
		// The old agent has handed over and drains; the signal changes nothing of
		// that (an agent that did not hand over would stop now).
		if err := unix.Kill(u.OldPID, sig); err != nil && !errors.Is(err, unix.ESRCH) {
			return u, fmt.Errorf("upgrade agent on %s: signal %d: %w", node, u.OldPID, err)
		}
	}
	if waitExit {
		timeout := time.Minute
		if dl, ok := ctx.Deadline(); ok {
			timeout = time.Until(dl)
		}
		if l.waitPIDExit(u.OldPID, oldStart, oldProc, timeout) {
			u.Exited = time.Since(start)
		}
	}
	l.log.Info("agent upgraded", "node", node, "old_pid", u.OldPID, "new_pid", u.NewPID, "serving", u.Serving, "old_exited", u.Exited)
	return u, nil
}

// waitPIDExit waits until pid (started at start, or proc when this process started
// it) is gone.
func (l *Lab) waitPIDExit(pid int, start uint64, proc *agentProc, timeout time.Duration) bool {
	if proc != nil && proc.pid == pid {
		select {
		case <-proc.done:
			return true
		case <-time.After(timeout):
			return false
		}
	}
	deadline := time.Now().Add(timeout)
	for pidAlive(pid, start) {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
	return true
}

// DrainingAgents are the pids of node's agents that handed over and still run.
func (l *Lab) DrainingAgents(node string) []int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n, err := l.node(node)
	if err != nil {
		return nil
	}
	var pids []int
	for _, d := range n.Draining {
		if pidAlive(d.PID, d.Start) {
			pids = append(pids, d.PID)
		}
	}
	return pids
}

// killDraining ends the agents of n that still drain after handing over: they hold
// nothing the node needs.
func killDraining(n *nodeInfo) {
	for _, d := range n.Draining {
		if pidAlive(d.PID, d.Start) {
			_ = unix.Kill(d.PID, unix.SIGKILL)
		}
	}
	n.Draining = nil
}

// listenerPID is the process that listens on the unix socket at path (SO_PEERCRED of
// a connection to it gives the listener's credentials), or 0 when nothing answers.
func listenerPID(path string) int {
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0
	}
	defer unix.Close(fd)
	if err := unix.Connect(fd, &unix.SockaddrUnix{Name: path}); err != nil {
		return 0
	}
	cred, err := unix.GetsockoptUcred(fd, unix.SOL_SOCKET, unix.SO_PEERCRED)
	if err != nil {
		return 0
	}
	return int(cred.Pid)
}
