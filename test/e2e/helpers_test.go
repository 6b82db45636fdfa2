package e2e

import (
	"context"
	"io"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/api/admin"
	"github.com/ferrymesh/ferry/internal/wiretest"
)

type agentStatus = admin.Status

// capture runs tcpdump on every interface of the fabric namespace, writing to file,
// until the returned stop is called.
func (e *env) capture(t *testing.T, file string) (stop func()) {
	t.Helper()
	path, err := e.lab.NetnsPath("fabric")
	if err != nil {
		t.Fatal(err)
	}
	return wiretest.Capture(t, path, file)
}

// captured says whether the capture file holds s anywhere: a plaintext payload on
// the wire.
func captured(t *testing.T, file, s string) bool { return wiretest.Captured(t, file, s) }

// tshark reads a capture and returns its non-empty output lines.
func tshark(t *testing.T, file string, args ...string) []string {
	return wiretest.Tshark(t, file, args...)
}

// restartAgent stops node's agent and starts it again with extra flags.
func (e *env) restartAgent(t *testing.T, node string, args ...string) {
	t.Helper()
	if err := e.lab.StopAgent(node, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := e.lab.StartAgent(node, args...); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := e.lab.WaitAgentReady(ctx, node); err != nil {
		t.Fatal(err)
	}
}

// cookie is the netns cookie node's agent reports for pod ("namespace/name").
func (e *env) cookie(t *testing.T, node, pod string) uint64 {
	t.Helper()
	for _, p := range e.status(t, node).Pods {
		if p.Name == pod {
			return p.NetnsCookie
		}
	}
	t.Fatalf("agent on %s has not enrolled %s", node, pod)
	return 0
}

// goroutines is node's agent's goroutine profile, for failure messages.
func (e *env) goroutines(node string) string {
	resp, err := e.lab.AgentClient(node).Get("http://agent/debug/pprof/goroutine?debug=1")
	if err != nil {
		return err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}
