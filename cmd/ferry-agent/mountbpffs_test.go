package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ferrymesh/ferry/internal/privileged"
	"golang.org/x/sys/unix"
)

// --mount-bpffs, what the agent DaemonSet's init container runs: bpffs is
// mounted where there was none and the pin folder created; a second run (a
// restarted pod) changes nothing and succeeds.
func TestMountBPFFS(t *testing.T) {
	privileged.Require(t)
	mnt := filepath.Join(t.TempDir(), "bpf")
	t.Cleanup(func() { unix.Unmount(mnt, unix.MNT_DETACH) })
	for _, dir := range []string{mnt, filepath.Join(mnt, "ferry")} {
		if err := run(t.Context(), []string{"--mount-bpffs", "--bpf-pin-dir", dir}); err != nil {
			t.Fatalf("ferry-agent --mount-bpffs --bpf-pin-dir %s: %v", dir, err)
		}
		var st unix.Statfs_t
		if err := unix.Statfs(dir, &st); err != nil || uint32(st.Type) != unix.BPF_FS_MAGIC {
			t.Errorf("%s after --mount-bpffs: %v, filesystem %#x, want bpffs", dir, err, st.Type)
		}
	}
	// The second run found the mount and did not stack another on it.
	info, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	mounts := 0
	for _, line := range strings.Split(string(info), "\n") {
		if f := strings.Fields(line); len(f) > 4 && f[4] == mnt {
			mounts++
		}
	}
	if mounts != 1 {
		t.Errorf("%d mounts at %s, want 1", mounts, mnt)
	}
}
