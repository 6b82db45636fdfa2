// Package promcheck checks a Prometheus exposition with promtool, for tests: it
// must parse, and lint clean but for the one finding Istio's own names carry.
package promcheck

import (
	"os/exec"
	"strings"
	"testing"

	"github.com/ferrymesh/ferry/internal/privileged"
)

// istioUnitLint is promtool's finding on Istio's request duration metric: Istio
// counts it in milliseconds, and the dashboards users bring query that name.
const istioUnitLint = `istio_request_duration_milliseconds use base unit "seconds" instead of "milliseconds"`

// Check fails t unless promtool check metrics accepts text (Debian prometheus,
// installed by make deps) with no finding but istioUnitLint.
func Check(t testing.TB, text string) {
	t.Helper()
	promtool := privileged.LookPath(t, "promtool", "Debian prometheus; make deps installs it")
	cmd := exec.Command(promtool, "check", "metrics")
	cmd.Stdin = strings.NewReader(text)
	out, err := cmd.CombinedOutput()
	if err == nil {
		return
	}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if line != istioUnitLint {
			t.Errorf("promtool check metrics: %v\n%s", err, out)
			return
		}
	}
}
