// This file finds the cgroup v2 hierarchy and manages the lab's per-node cgroups.

package lab

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Cgroup2Mount returns where the cgroup v2 hierarchy is mounted, read from
// /proc/self/mountinfo: /sys/fs/cgroup on a unified host, /sys/fs/cgroup/unified on
// a hybrid one.
func Cgroup2Mount() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", fmt.Errorf("cgroup2 mount: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		// id parent major:minor root mountpoint options [optional...] - fstype source super
		fields := strings.Fields(sc.Text())
		sep := -1
		for i, f := range fields {
			if f == "-" {
				sep = i
				break
			}
		}
		if sep < 5 || sep+1 >= len(fields) || fields[sep+1] != "cgroup2" {
			continue
		}
		return unescapeMountinfo(fields[4]), nil
	}
	if err := sc.Err(); err != nil {
		return "", fmt.Errorf("cgroup2 mount: %w", err)
	}
	return "", errors.New("cgroup2 mount: no cgroup2 file system is mounted")
}

// unescapeMountinfo undoes the octal escapes (\040 for a space) of mountinfo paths.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// mountPointsUnder lists mount points at or below dir, deepest first.
func mountPointsUnder(dir string) []string {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	var out []string
	for _, line := range strings.Split(string(data), "\n") {
		fields := strings.Fields(line)
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMountinfo(fields[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			out = append(out, mp)
		}
	}
	// Deeper paths are longer; unmount them first.
	for i := range out {
		for j := i + 1; j < len(out); j++ {
			if len(out[j]) > len(out[i]) {
				out[i], out[j] = out[j], out[i]
			}
		}
	}
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
