// This file finds the cgroup v2 hierarchy and manages the lab's per-node cgroups.

package lab

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/ferrymesh/ferry/agent/datapath"
	"golang.org/x/sys/unix"
)

// mountPointsUnder lists mount points at or below dir, deepest first.
func mountPointsUnder(dir string) []string {
	mounts, err := datapath.Mounts()
	if err != nil {
		return nil
	}
	var out []string
	for _, m := range mounts {
		if m.Point == dir || strings.HasPrefix(m.Point, dir+"/") {
			out = append(out, m.Point)
		}
	}
	// Deeper paths are longer; unmount them first.
	sort.Slice(out, func(i, j int) bool { return len(out[i]) > len(out[j]) })
	return out
}

// removeCgroup kills every process in the cgroup tree at dir and removes the tree,
// leaves first.
func removeCgroup(dir string) error {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("remove cgroup %s: %w", dir, err)
	}
	var errs []error
	for _, e := range entries {
		if e.IsDir() {
			errs = append(errs, removeCgroup(filepath.Join(dir, e.Name())))
		}
	}
	if err := killCgroup(dir); err != nil {
		errs = append(errs, err)
	}
	// The kernel may need a moment to free a cgroup whose last task just died.
	var rmErr error
	for i := 0; i < 50; i++ {
		rmErr = unix.Rmdir(dir)
		if rmErr == nil || errors.Is(rmErr, unix.ENOENT) {
			rmErr = nil
			break
		}
		if !errors.Is(rmErr, unix.EBUSY) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if rmErr != nil {
		errs = append(errs, fmt.Errorf("rmdir cgroup %s: %w", dir, rmErr))
	}
	return errors.Join(errs...)
}

// killCgroup SIGKILLs every process in the cgroup (not its children) and waits until
// it is empty.
func killCgroup(dir string) error {
	deadline := time.Now().Add(5 * time.Second)
	for {
		pids := cgroupPIDs(dir)
		if len(pids) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("cgroup %s: processes %v survive SIGKILL", dir, pids)
		}
		// cgroup.kill would also reach the children, which removeCgroup handles
		// itself; signalling pids keeps this working on kernels before 5.14.
		for _, pid := range pids {
			if pid == os.Getpid() {
				return fmt.Errorf("cgroup %s: holds this process; not killing it", dir)
			}
			_ = unix.Kill(pid, unix.SIGKILL)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// cgroupPIDs lists the processes directly in the cgroup at dir.
func cgroupPIDs(dir string) []int {
	data, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return nil
	}
	var pids []int
	for _, f := range strings.Fields(string(data)) {
		if pid, err := strconv.Atoi(f); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids
}

// moveToCgroup puts pid into the cgroup at dir.
func moveToCgroup(dir string, pid int) error {
	err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0o644)
	if err != nil {
		return fmt.Errorf("move pid %d to cgroup %s: %w", pid, dir, err)
	}
	return nil
}
