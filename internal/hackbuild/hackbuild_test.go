package hackbuild_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/ferrymesh/ferry/internal/hackbuild"
)

// A script in hack/ above the working directory is found and run, and its paths
// are returned by base name, its progress (stderr) kept out of them.
func TestBinariesFromScriptAbove(t *testing.T) {
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "hack"), 0o755); err != nil {
		t.Fatal(err)
	}
	script := "#!/usr/bin/env bash\necho 'building…' >&2\necho /cache/v1/alpha\necho /cache/v1/beta\n"
	if err := os.WriteFile(filepath.Join(root, "hack", "build-fake.sh"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	sub := filepath.Join(root, "agent", "pkg")
	if err := os.MkdirAll(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Chdir(sub)
	got := hackbuild.Binaries(t, "build-fake.sh", "alpha", "beta")
	if got["alpha"] != "/cache/v1/alpha" || got["beta"] != "/cache/v1/beta" {
		t.Fatalf("Binaries = %v, want alpha and beta under /cache/v1", got)
	}
	if len(got) != 2 {
		t.Errorf("Binaries returned %d paths, want the 2 the script printed: %v", len(got), got)
	}
}
