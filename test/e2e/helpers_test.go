package e2e

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/api/admin"
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
	cmd := exec.Command("nsenter", "--net="+path, "tcpdump", "-i", "any", "-U", "-s", "0", "-w", file, "tcp")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("tcpdump: %v", err)
	}
	ready := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			if strings.Contains(sc.Text(), "listening on") {
				close(ready)
				break
			}
		}
		for sc.Scan() {
		}
	}()
	select {
	case <-ready:
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		t.Fatal("tcpdump did not start listening")
	}
	return func() {
		cmd.Process.Signal(syscall.SIGINT)
		cmd.Wait()
	}
}

// captured says whether the capture file holds s anywhere, as bytes: a plaintext
// payload on the wire.
func captured(t *testing.T, file, s string) bool {
	t.Helper()
	raw, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	return bytes.Contains(raw, []byte(s))
}

// tshark reads a capture and returns its non-empty output lines.
func tshark(t *testing.T, file string, args ...string) []string {
	t.Helper()
	out, err := exec.Command("tshark", append([]string{"-r", file}, args...)...).Output()
	if err != nil {
		t.Fatalf("tshark: %v", err)
	}
	var lines []string
	for _, l := range strings.Split(string(out), "\n") {
		if l = strings.TrimSpace(l); l != "" {
			lines = append(lines, l)
		}
	}
	return lines
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
