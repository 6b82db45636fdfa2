// This file tears labs down: a running one (Down) or whatever a crashed run with the
// same prefix left (Clean).

package lab

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/ferrymesh/ferry/agent/datapath"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Down stops the agents (SIGTERM, then SIGKILL after 5 seconds), runs each node's
// agent with --cleanup, kills the processes left in the lab's cgroups, and removes the
// namespaces, cgroups, pin folders and state folder.
func (l *Lab) Down() error {
	l.Close()
	l.mu.Lock()
	desc := l.desc
	log := l.log
	procs := make(map[string]*agentProc, len(l.procs))
	for k, v := range l.procs {
		procs[k] = v
	}
	l.mu.Unlock()
	return clean(&desc, procs, log)
}

// Clean removes everything of the lab with this prefix: it is Down for a lab this
// process did not start, or one that crashed. stateDir may be empty for the default.
// It does nothing, successfully, when there is nothing to remove.
func Clean(prefix, stateDir string, log *slog.Logger) error {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if !prefixRE.MatchString(prefix) {
		return fmt.Errorf("prefix %q: want 1 to 8 lower-case letters or digits", prefix)
	}
	if os.Geteuid() != 0 {
		return ErrNotRoot
	}
	if stateDir == "" {
		stateDir = StateDirFor(prefix)
	}
	desc := description{Config: Config{Prefix: prefix, StateDir: stateDir}}
	if data, err := os.ReadFile(filepath.Join(stateDir, descriptionFile)); err == nil {
		var d description
		if err := json.Unmarshal(data, &d); err != nil {
			log.Warn("unreadable lab description; cleaning by prefix only", "error", err)
		} else if d.Config.Prefix == prefix {
			desc = d
			desc.Config.StateDir = stateDir
		}
	}
	return clean(&desc, nil, log)
}

func clean(d *description, procs map[string]*agentProc, log *slog.Logger) error {
	prefix := d.Config.Prefix
	var errs []error
	stopOperator(d, log)
	stopDNS(d, log)

	// Agents first, gracefully, so that they can detach and unpin on their own.
	for i := range d.Nodes {
		n := &d.Nodes[i]
		p := procs[n.Name]
		killDraining(n)
		if n.AgentPID == 0 {
			continue
		}
		alive := func() bool {
			if p != nil && p.pid == n.AgentPID {
				select {
				case <-p.done:
					return false
				default:
					return true
				}
			}
			return pidAlive(n.AgentPID, n.AgentStart)
		}
		if !alive() {
			continue
		}
		log.Info("stop agent on "+n.Name, "pid", n.AgentPID)
		_ = unix.Kill(n.AgentPID, unix.SIGTERM)
		deadline := time.Now().Add(5 * time.Second)
		for alive() && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
		if alive() {
			log.Warn("agent ignored SIGTERM; killing it", "node", n.Name, "pid", n.AgentPID)
			_ = unix.Kill(n.AgentPID, unix.SIGKILL)
		}
	}

	if bin := d.Config.AgentBinary; bin != "" {
		if _, err := os.Stat(bin); err != nil {
			log.Warn("agent binary is gone; skipping agent cleanup", "binary", bin)
		} else {
			for _, n := range d.Nodes {
				log.Info("agent cleanup on " + n.Name)
				if err := agentCleanup(bin, n); err != nil {
					log.Warn("agent cleanup failed", "node", n.Name, "error", err)
				}
			}
		}
	}

	cgRoot := d.CgroupRoot
	if cgRoot == "" {
		if mnt, err := datapath.Cgroup2Mount(); err == nil {
			cgRoot = filepath.Join(mnt, prefix)
		}
	}
	if cgRoot != "" {
		if _, err := os.Stat(cgRoot); err == nil {
			log.Info("kill processes and remove cgroups under " + cgRoot)
			if err := removeCgroup(cgRoot); err != nil {
				errs = append(errs, err)
			}
		}
	}

	if names := listNetns(prefix); len(names) > 0 {
		log.Info(fmt.Sprintf("delete %d network namespaces %s-*", len(names), prefix))
		for _, name := range names {
			if err := deleteNetns(name); err != nil {
				errs = append(errs, err)
			}
		}
	}

	pins, _ := filepath.Glob(filepath.Join(BPFRoot, prefix+"-*"))
	for _, dir := range pins {
		log.Info("remove pin folder " + dir)
		if err := removePinDir(dir); err != nil {
			errs = append(errs, err)
		}
	}

	if _, err := os.Stat(d.Config.StateDir); err == nil {
		log.Info("remove state folder " + d.Config.StateDir)
		if err := removeStateDir(d.Config.StateDir); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("clean lab %s: %w", prefix, errors.Join(errs...))
	}
	return nil
}

// agentCleanup runs the agent with --cleanup for one node, in the node's namespace if
// it still exists.
func agentCleanup(bin string, n nodeInfo) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	args := []string{"--cleanup", "--bpf-pin-dir", n.PinDir, "--cgroup", n.Cgroup}
	var cmd *exec.Cmd
	if _, err := os.Stat(n.Netns); err == nil {
		cmd = exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + n.Netns, "--", bin}, args...)...)
	} else {
		cmd = exec.CommandContext(ctx, bin, args...)
	}
	cmd.Dir = "/"
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s --cleanup: %w: %s", bin, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// removePinDir removes an agent's pin folder, unmounting a bpffs the agent may have
// mounted on it.
func removePinDir(dir string) error {
	for _, mp := range mountPointsUnder(dir) {
		if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("unmount %s: %w", mp, err)
		}
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("remove pin folder: %w", err)
	}
	return nil
}

// removeStateDir removes a lab's state folder, but only one that looks like it: it
// holds a lab description, sits under the default root, or is empty. A mistyped
// --state-dir must not wipe an unrelated folder.
func removeStateDir(dir string) error {
	if dir == "" || dir == "/" {
		return nil
	}
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	_, descErr := os.Stat(filepath.Join(dir, descriptionFile))
	if descErr == nil || strings.HasPrefix(filepath.Clean(dir), DefaultStateRoot+"/") {
		if err := os.RemoveAll(dir); err != nil {
			return fmt.Errorf("remove state folder: %w", err)
		}
		return nil
	}
	if err := os.Remove(dir); err != nil {
		return fmt.Errorf("state folder %s is not a lab's (no %s); left in place: %w", dir, descriptionFile, err)
	}
	return nil
}
