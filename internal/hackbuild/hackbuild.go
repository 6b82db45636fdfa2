// Package hackbuild runs the hack/ scripts that build test-only programs from Go
// modules of their own (hack/build-kube.sh, hack/build-istio-echo.sh): each is
// cached, prints the paths of what it built on stdout, one a line, and its
// progress on stderr.
package hackbuild

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/privileged"
)

// Binaries runs hack/<script> (Run) and returns the path it printed for each of
// names, by base name. If the script is missing, fails, runs out of the test's time
// or does not print every name, t is skipped, or fails under FERRY_PRIVILEGED_TESTS=1.
func Binaries(t testing.TB, script string, names ...string) map[string]string {
	t.Helper()
	out := Run(t, script)
	got := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		got[filepath.Base(line)] = line
	}
	for _, n := range names {
		if got[n] == "" {
			privileged.Missing(t, "hack/%s printed no path for %s: %q", script, n, out)
		}
	}
	return got
}

// Run runs hack/<script> with args (found above the working directory, which go test
// sets to the package being tested) and returns what it printed on stdout; its
// stderr, the progress, goes to the test's log. If the script is missing, fails or
// runs out of the test's time, t is skipped, or fails under FERRY_PRIVILEGED_TESTS=1.
func Run(t testing.TB, script string, args ...string) string {
	t.Helper()
	path, err := find(filepath.Join("hack", script))
	if err != nil {
		privileged.Missing(t, "%v", err)
	}
	ctx := context.Background()
	// A first build takes minutes; stop short of the test binary's -timeout so the
	// message below is seen instead of a panic. The Go build cache keeps what was
	// compiled, so the next run picks up from there.
	if d, ok := t.(interface{ Deadline() (time.Time, bool) }); ok {
		if deadline, ok := d.Deadline(); ok {
			var cancel context.CancelFunc
			margin := min(30*time.Second, time.Until(deadline)/4)
			ctx, cancel = context.WithDeadline(ctx, deadline.Add(-margin))
			defer cancel()
		}
	}
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, "bash", append([]string{path}, args...)...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	err = cmd.Run()
	if msg := strings.TrimSpace(stderr.String()); msg != "" {
		t.Logf("%s (%v):\n%s", path, time.Since(start).Round(time.Second), msg)
	}
	if ctx.Err() != nil {
		privileged.Missing(t, "%s did not finish before the test deadline: run it once by hand, or raise go test -timeout", path)
	}
	if err != nil {
		privileged.Missing(t, "%s failed: %v", path, err)
	}
	return stdout.String()
}

func find(rel string) (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", fmt.Errorf("working directory: %w", err)
	}
	for {
		p := filepath.Join(dir, rel)
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New(rel + " not found above the working directory")
		}
		dir = parent
	}
}
