package privileged

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/ferrymesh/ferry/agent/netns"
)

func TestNewNetnsIsolated(t *testing.T) {
	h := NewNetns(t)
	inner, err := h.Cookie()
	if err != nil {
		t.Fatal(err)
	}
	outer, err := netns.CurrentCookie()
	if err != nil {
		t.Fatal(err)
	}
	if inner == outer {
		t.Fatalf("new netns has the caller's cookie %d", inner)
	}
	addrs, err := h.Addrs()
	if err != nil {
		t.Fatal(err)
	}
	if len(addrs) == 0 {
		t.Fatal("loopback has no address in the new netns")
	}
}

// TestRequire checks both halves of the contract as a user would meet them: as an
// ordinary user a privileged test skips with a message, and with
// FERRY_PRIVILEGED_TESTS=1 it fails instead. It re-runs this test binary as nobody.
func TestRequire(t *testing.T) {
	Require(t)
	// The test binary sits in a folder only root can enter: copy it where nobody can.
	dir, err := os.MkdirTemp("", "ferry-require-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	self, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "privileged.test")
	if err := os.WriteFile(bin, self, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		env      string
		wantExit bool
		want     string
	}{
		{env: "", wantExit: false, want: "needs root, BPF and network namespaces; run as root with FERRY_PRIVILEGED_TESTS=1"},
		{env: "1", wantExit: true, want: "FERRY_PRIVILEGED_TESTS=1 but not running as root"},
	} {
		cmd := exec.Command(bin, "-test.run=^TestRequireAsUser$", "-test.v")
		cmd.Env = []string{"FERRY_REQUIRE_CHILD=1", EnvVar + "=" + tc.env}
		cmd.Dir = os.TempDir()
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		out, err := cmd.CombinedOutput()
		if (err != nil) != tc.wantExit {
			t.Fatalf("%s=%q as nobody: exit error %v, want failure %v\n%s", EnvVar, tc.env, err, tc.wantExit, out)
		}
		if !strings.Contains(string(out), tc.want) {
			t.Fatalf("%s=%q as nobody: output lacks %q:\n%s", EnvVar, tc.env, tc.want, out)
		}
	}
}

// TestRequireAsUser is TestRequire's child: it only calls Require.
func TestRequireAsUser(t *testing.T) {
	if os.Getenv("FERRY_REQUIRE_CHILD") != "1" {
		t.Skip("run by TestRequire")
	}
	Require(t)
	t.Log("ran privileged code")
}

// TestMissing checks that a missing tool skips a test for an ordinary run and fails
// it under FERRY_PRIVILEGED_TESTS=1, by re-running this test binary.
func TestMissing(t *testing.T) {
	for _, tc := range []struct {
		env      string
		wantExit bool
	}{{"", false}, {"1", true}} {
		cmd := exec.Command(os.Args[0], "-test.run=^TestMissingChild$", "-test.v")
		cmd.Env = []string{"FERRY_MISSING_CHILD=1", EnvVar + "=" + tc.env, "PATH="}
		out, err := cmd.CombinedOutput()
		if (err != nil) != tc.wantExit {
			t.Fatalf("%s=%q: exit error %v, want failure %v\n%s", EnvVar, tc.env, err, tc.wantExit, out)
		}
		if !strings.Contains(string(out), "ferry-no-such-tool not installed (nowhere)") {
			t.Fatalf("%s=%q: output lacks the reason:\n%s", EnvVar, tc.env, out)
		}
	}
}

// TestMissingChild is TestMissing's child: it looks for a tool that is not there.
func TestMissingChild(t *testing.T) {
	if os.Getenv("FERRY_MISSING_CHILD") != "1" {
		t.Skip("run by TestMissing")
	}
	LookPath(t, "ferry-no-such-tool", "nowhere")
	t.Log("found a tool that cannot exist")
}
