package bench

import (
	"bytes"
	"runtime/pprof"
	"strings"
	"testing"
	"time"

	"github.com/google/pprof/profile"
)

//go:noinline
func spinForProfile(d time.Duration) int {
	n := 0
	for end := time.Now().Add(d); time.Now().Before(end); {
		for i := range 10000 {
			n += i * i
		}
	}
	return n
}

// TestWriteTop profiles a busy loop with runtime/pprof and checks that the top
// list puts it among the first functions.
func TestWriteTop(t *testing.T) {
	var raw bytes.Buffer
	if err := pprof.StartCPUProfile(&raw); err != nil {
		t.Fatal(err)
	}
	spinForProfile(500 * time.Millisecond)
	pprof.StopCPUProfile()
	p, err := profile.Parse(&raw)
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	if err := writeTop(&b, p, 5); err != nil {
		t.Fatal(err)
	}
	top := b.String()
	t.Logf("\n%s", top)
	lines := strings.Split(strings.TrimSpace(top), "\n")
	if len(lines) < 3 || !strings.Contains(lines[1], "flat%") {
		t.Fatalf("top list has no header and rows:\n%s", top)
	}
	if !strings.Contains(top, "spinForProfile") {
		t.Errorf("the busy function is not in the top 5:\n%s", top)
	}
}
