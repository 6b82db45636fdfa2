package main

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/ferrymesh/ferry/internal/privileged"
	"golang.org/x/sys/unix"
)

// The agent DaemonSet's init container: mounts bpffs where there is none,
// and says so; a second run finds it there.
func TestMountBPFFS(t *testing.T) {
	privileged.Require(t)
	mnt := filepath.Join(t.TempDir(), "bpf")
	t.Cleanup(func() { unix.Unmount(mnt, unix.MNT_DETACH) })
	dir := mnt

	out, err := ferryCLI(t, newInstallCommand, "mount-bpffs", "--pin-dir", dir)
	if err != nil {
		t.Fatalf("ferry install mount-bpffs: %v", err)
	}
	if want := "mounted bpffs; pin folder " + dir + " is ready"; !strings.Contains(out, want) {
		t.Errorf("output lacks %q", want)
	}
	if ok, err := onBPFFS(dir); err != nil || !ok {
		t.Fatalf("%s on bpffs: %v, %v", dir, ok, err)
	}

	// Again, for a pin folder below the mount that does not exist yet.
	dir = filepath.Join(dir, "ferry")
	out, err = ferryCLI(t, newInstallCommand, "mount-bpffs", "--pin-dir", dir)
	if err != nil {
		t.Fatalf("ferry install mount-bpffs again: %v", err)
	}
	if want := "bpffs is mounted already; pin folder " + dir + " is ready"; !strings.Contains(out, want) {
		t.Errorf("output lacks %q", want)
	}
}
