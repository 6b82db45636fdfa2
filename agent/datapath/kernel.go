// Host facts the data path depends on: where the cgroup v2 hierarchy is mounted and
// whether the pin folder is on bpffs.

package datapath

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// bpffsRoot is where bpffs is conventionally mounted.
const bpffsRoot = "/sys/fs/bpf"

// Cgroup2Mount returns where the cgroup v2 hierarchy is mounted, from
// /proc/self/mountinfo. Hosts differ (/sys/fs/cgroup on unified hosts,
// /sys/fs/cgroup/unified on hybrid ones), so the path is never assumed.
func Cgroup2Mount() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", fmt.Errorf("cgroup2 mount: %w", err)
	}
	defer f.Close()
	return FindCgroup2(f)
}

// ResolveCgroup returns the cgroup v2 folder capture attaches to for the --cgroup
// flag path: the cgroup2 mount when path is empty; path itself when it is on a
// cgroup2 filesystem; path/unified when path is a hybrid host's /sys/fs/cgroup
// (a tmpfs of v1 hierarchies with v2 mounted at unified/), as the DaemonSet's
// /host/sys/fs/cgroup is there. Anything else is an error naming what was found.
func ResolveCgroup(path string) (string, error) {
	if path == "" {
		return Cgroup2Mount()
	}
	isCgroup2 := func(p string) (bool, error) {
		var st unix.Statfs_t
		if err := unix.Statfs(p, &st); err != nil {
			return false, err
		}
		return st.Type == unix.CGROUP2_SUPER_MAGIC, nil
	}
	ok, err := isCgroup2(path)
	if err != nil {
		return "", fmt.Errorf("cgroup %s: %w", path, err)
	}
	if ok {
		return path, nil
	}
	unified := filepath.Join(path, "unified")
	if ok, _ := isCgroup2(unified); ok {
		return unified, nil
	}
	return "", fmt.Errorf("cgroup %s: not a cgroup v2 filesystem, and no cgroup v2 at %s (hybrid hosts) either", path, unified)
}

// FindCgroup2 returns the first cgroup2 mount point listed in a mountinfo file.
func FindCgroup2(mountinfo io.Reader) (string, error) {
	mounts, err := parseMountinfo(mountinfo)
	if err != nil {
		return "", fmt.Errorf("cgroup2 mount: %w", err)
	}
	for _, m := range mounts {
		if m.FSType == "cgroup2" {
			return m.Point, nil
		}
	}
	return "", errors.New("cgroup2 mount: no cgroup2 filesystem in mountinfo (is cgroup v2 enabled?)")
}

// Mount is one line of /proc/self/mountinfo.
type Mount struct {
	Point  string // where it is mounted
	FSType string // e.g. cgroup2, bpf
}

// Mounts lists this process's mounts, from /proc/self/mountinfo.
func Mounts() ([]Mount, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("mounts: %w", err)
	}
	defer f.Close()
	return parseMountinfo(f)
}

func parseMountinfo(r io.Reader) ([]Mount, error) {
	var out []Mount
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		// "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw"
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		if !ok {
			continue
		}
		fields, fs := strings.Fields(pre), strings.Fields(post)
		if len(fields) < 5 || len(fs) == 0 {
			continue
		}
		out = append(out, Mount{Point: unescapeMountPath(fields[4]), FSType: fs[0]})
	}
	return out, sc.Err()
}

// unescapeMountPath undoes mountinfo's octal escapes (\040 for a space and so on).
func unescapeMountPath(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
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

// isBPFFS reports whether path lives on a bpffs.
func isBPFFS(path string) (bool, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return false, err
	}
	return uint32(st.Type) == unix.BPF_FS_MAGIC, nil
}

// EnsureBPFFS makes sure dir can hold pins: if the nearest existing folder on its path
// is not on bpffs, it mounts bpffs at /sys/fs/bpf (when dir is below it; on a fresh
// host that folder exists but nothing is mounted there) or at dir itself. It then
// creates dir.
func EnsureBPFFS(dir string) error {
	dir = filepath.Clean(dir)
	existing := dir
	for {
		if _, err := os.Stat(existing); err == nil {
			break
		}
		parent := filepath.Dir(existing)
		if parent == existing {
			break
		}
		existing = parent
	}
	ok, err := isBPFFS(existing)
	if err != nil {
		return fmt.Errorf("bpffs check %s: %w", existing, err)
	}
	if !ok {
		target := dir
		if dir == bpffsRoot || strings.HasPrefix(dir, bpffsRoot+"/") {
			target = bpffsRoot
		}
		if err := mountBPFFS(target); err != nil {
			return err
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create pin folder: %w", err)
	}
	if ok, err := isBPFFS(dir); err != nil || !ok {
		return fmt.Errorf("pin folder %s is not on bpffs (%v)", dir, err)
	}
	return nil
}

// mountBPFFS mounts bpffs at target unless it already is, holding a lock on the
// folder underneath so that two agents (or test binaries) starting together do not
// stack two mounts, the second hiding the first's pins.
func mountBPFFS(target string) error {
	if err := os.MkdirAll(target, 0o700); err != nil {
		return fmt.Errorf("mount bpffs: %w", err)
	}
	under, err := os.Open(target)
	if err != nil {
		return fmt.Errorf("mount bpffs: %w", err)
	}
	defer under.Close()
	if err := unix.Flock(int(under.Fd()), unix.LOCK_EX); err != nil {
		return fmt.Errorf("mount bpffs: lock %s: %w", target, err)
	}
	defer unix.Flock(int(under.Fd()), unix.LOCK_UN)
	if ok, err := isBPFFS(target); err == nil && ok {
		return nil // someone else mounted it meanwhile
	}
	if err := unix.Mount("bpffs", target, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mount bpffs at %s: %w", target, err)
	}
	return nil
}

// cgroupID returns the id the kernel reports for the cgroup v2 folder at path (its
// inode number).
func cgroupID(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, fmt.Errorf("cgroup %s: %w", path, err)
	}
	return st.Ino, nil
}

// cgroupPathByID finds the cgroup folder below root whose id is id, or "".
func cgroupPathByID(root string, id uint64) string {
	found := ""
	filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil
		}
		if cid, err := cgroupID(path); err == nil && cid == id {
			found = path
			return filepath.SkipAll
		}
		return nil
	})
	return found
}
