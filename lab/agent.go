// This file starts, stops and probes the node agents.

package lab

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// agentProc is an agent this process started; done closes when it has been reaped.
type agentProc struct {
	pid  int
	done chan struct{}
}

// agentCommand is the agent's command line. nsenter, not `ip netns exec`: the latter
// remounts /sys, which hides bpffs and the cgroup mounts from the agent.
func (l *Lab) agentCommand(n *nodeInfo, extra ...string) *exec.Cmd {
	cfg := l.desc.Config
	args := []string{"--net=" + n.Netns, "--", cfg.AgentBinary,
		"--node", n.Name,
		"--bpf-pin-dir", n.PinDir,
		"--cgroup", n.Cgroup,
		"--admin-socket", n.Socket,
	}
	if cfg.usesOperator() {
		args = append(args, l.operatorArgs(n)...)
	} else {
		args = append(args, "--state", n.StateFile)
	}
	args = append(args, extra...)
	cmd := exec.Command("nsenter", args...)
	cmd.Dir = "/"
	return cmd
}

// StartAgent starts the node's agent in the node's network namespace and cgroup, in
// its own session so that it outlives the process that started it. Its output goes to
// <StateDir>/<node>/agent.log. extraArgs follow the lab's AgentArgs, so they win.
func (l *Lab) StartAgent(node string, extraArgs ...string) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	n, err := l.node(node)
	if err != nil {
		return err
	}
	if l.agentAliveLocked(n) {
		return fmt.Errorf("start agent on %s: already running as pid %d", node, n.AgentPID)
	}
	if err := os.Remove(n.Socket); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("start agent on %s: stale socket: %w", node, err)
	}
	p, err := l.spawnAgentLocked(n, extraArgs)
	if err != nil {
		return err
	}
	l.procs[node] = p
	n.AgentPID = p.pid
	n.AgentStart, _ = procStartTime(p.pid)
	return l.save()
}

// spawnAgentLocked starts an agent process for n, whether one runs or not (an
// upgrade starts the new one beside the old); l.mu is held.
func (l *Lab) spawnAgentLocked(n *nodeInfo, extraArgs []string) (*agentProc, error) {
	node := n.Name
	if l.desc.Config.AgentBinary == "" {
		return nil, fmt.Errorf("start agent on %s: the lab has no agent binary", node)
	}
	logf, err := os.OpenFile(n.LogFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("start agent on %s: %w", node, err)
	}
	defer logf.Close()
	fmt.Fprintf(logf, "--- ferry lab: starting agent on %s at %s\n", node, time.Now().Format(time.RFC3339))
	cg, err := unix.Open(n.Cgroup, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("start agent on %s: open cgroup: %w", node, err)
	}
	defer unix.Close(cg)

	// Born in the node cgroup (clone3 CLONE_INTO_CGROUP), so every socket the agent
	// creates belongs to the cgroup its programs are attached to.
	cmd := l.agentCommand(n, append(slices.Clone(l.desc.Config.AgentArgs), extraArgs...)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, UseCgroupFD: true, CgroupFD: cg}
	if err := cmd.Start(); err != nil {
		if cmd.Err != nil || errors.Is(err, exec.ErrNotFound) {
			return nil, fmt.Errorf("start agent on %s: %w", node, err)
		}
		l.log.Warn("starting the agent inside its cgroup failed; moving it there after start", "node", node, "error", err)
		cmd = l.agentCommand(n, append(slices.Clone(l.desc.Config.AgentArgs), extraArgs...)...)
		cmd.Stdout, cmd.Stderr = logf, logf
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
		if err := cmd.Start(); err != nil {
			return nil, fmt.Errorf("start agent on %s: %w", node, err)
		}
		if err := moveToCgroup(n.Cgroup, cmd.Process.Pid); err != nil {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
			return nil, fmt.Errorf("start agent on %s: %w", node, err)
		}
	}
	p := &agentProc{pid: cmd.Process.Pid, done: make(chan struct{})}
	// Reaps the agent whenever it exits; it lives as long as the agent does.
	go func() {
		_ = cmd.Wait()
		close(p.done)
	}()
	l.log.Info("agent started", "node", node, "pid", p.pid, "log", n.LogFile)
	return p, nil
}

// StopAgent sends sig (SIGTERM, or SIGKILL to simulate a crash) to the node's agent
// and waits up to 10 seconds for it to exit.
func (l *Lab) StopAgent(node string, sig syscall.Signal) error {
	l.mu.Lock()
	n, err := l.node(node)
	if err != nil {
		l.mu.Unlock()
		return err
	}
	if !l.agentAliveLocked(n) {
		l.mu.Unlock()
		return fmt.Errorf("stop agent on %s: not running", node)
	}
	pid := n.AgentPID
	proc := l.procs[node]
	l.mu.Unlock()
	if err := unix.Kill(pid, sig); err != nil {
		return fmt.Errorf("stop agent on %s: signal %d: %w", node, pid, err)
	}
	if !l.waitAgentExit(node, pid, proc, 10*time.Second) {
		return fmt.Errorf("stop agent on %s: pid %d still runs 10s after %v", node, pid, sig)
	}
	return nil
}

// waitAgentExit waits until the agent pid is gone; proc is nil for an agent another
// process started.
func (l *Lab) waitAgentExit(node string, pid int, proc *agentProc, timeout time.Duration) bool {
	if proc != nil {
		select {
		case <-proc.done:
			return true
		case <-time.After(timeout):
			return false
		}
	}
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		l.mu.Lock()
		n, err := l.node(node)
		alive := err == nil && n.AgentPID == pid && l.agentAliveLocked(n)
		l.mu.Unlock()
		if !alive {
			return true
		}
		time.Sleep(20 * time.Millisecond)
	}
	return false
}

// AgentPID returns the pid of the node's running agent, or 0.
func (l *Lab) AgentPID(node string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n, err := l.node(node)
	if err != nil || !l.agentAliveLocked(n) {
		return 0
	}
	return n.AgentPID
}

// AgentSocket returns the path of the node agent's admin socket.
func (l *Lab) AgentSocket(node string) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	n, err := l.node(node)
	if err != nil {
		return ""
	}
	return n.Socket
}

// AgentLog returns the path of the node agent's log file.
func (l *Lab) AgentLog(node string) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	n, err := l.node(node)
	if err != nil {
		return ""
	}
	return n.LogFile
}

// AgentClient returns an HTTP client whose every request goes to the node agent's
// admin socket, whatever the URL's host (use http://agent/...).
func (l *Lab) AgentClient(node string) *http.Client {
	sock := l.AgentSocket(node)
	return &http.Client{
		Timeout: 5 * time.Second,
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", sock)
			},
			// Each client is a new Transport: a kept-alive connection would hold a
			// goroutine and a file in the agent (until its idle timeout) per call.
			DisableKeepAlives: true,
		},
	}
}

// WaitAgentReady polls the node agent's admin socket until GET /status answers 200. It
// fails at once if the agent exits, quoting the end of its log.
func (l *Lab) WaitAgentReady(ctx context.Context, node string) error {
	client := l.AgentClient(node)
	defer client.CloseIdleConnections()
	var last error
	for {
		if l.AgentPID(node) == 0 {
			return fmt.Errorf("agent on %s is not running; end of %s:\n%s", node, l.AgentLog(node), tail(l.AgentLog(node), 20))
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://agent/status", nil)
		if err != nil {
			return fmt.Errorf("wait for agent on %s: %w", node, err)
		}
		resp, err := client.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			err = fmt.Errorf("GET /status: %s", resp.Status)
		}
		last = err
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for agent on %s: %w (last: %v)", node, ctx.Err(), last)
		case <-time.After(10 * time.Millisecond): // fine enough to time restarts by
		}
	}
}

// agentAliveLocked says whether the node's recorded agent still runs; l.mu is held.
func (l *Lab) agentAliveLocked(n *nodeInfo) bool {
	if n.AgentPID == 0 {
		return false
	}
	if p, ok := l.procs[n.Name]; ok && p.pid == n.AgentPID {
		select {
		case <-p.done:
			return false
		default:
			return true
		}
	}
	return pidAlive(n.AgentPID, n.AgentStart)
}

// pidAlive says whether pid runs, is not a zombie, and (when start is not 0) is the
// process that started at that time rather than a later one reusing the pid.
func pidAlive(pid int, start uint64) bool {
	data, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return false
	}
	state, st, ok := parseStat(data)
	if !ok || state == "Z" || state == "X" {
		return false
	}
	return start == 0 || st == start
}

func procStartTime(pid int) (uint64, error) {
	data, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return 0, err
	}
	_, st, ok := parseStat(data)
	if !ok {
		return 0, fmt.Errorf("parse /proc/%d/stat", pid)
	}
	return st, nil
}

// parseStat returns the state and start time fields of /proc/PID/stat.
func parseStat(data []byte) (state string, start uint64, ok bool) {
	// The command name (field 2) may hold spaces and parentheses; it ends at the last ')'.
	i := bytes.LastIndexByte(data, ')')
	if i < 0 {
		return "", 0, false
	}
	f := strings.Fields(string(data[i+1:]))
	// f[0] is field 3 (state); start time is field 22.
	if len(f) < 20 {
		return "", 0, false
	}
	st, err := strconv.ParseUint(f[19], 10, 64)
	if err != nil {
		return "", 0, false
	}
	return f[0], st, true
}

// tail returns up to n last lines of a file.
func tail(path string, n int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return "(" + err.Error() + ")"
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
