// Package wiretest captures what crosses a test network with tcpdump and reads the
// captures with tshark (both Debian packages, hack/install-deps.sh): the tests'
// proof that only TLS to the tunnel port leaves a node.
package wiretest

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Capture runs tcpdump on every interface of the network namespace at netnsPath,
// writing the TCP packets to file, until the returned stop is called.
func Capture(t testing.TB, netnsPath, file string) (stop func()) {
	t.Helper()
	cmd := exec.Command("nsenter", "--net="+netnsPath, "tcpdump", "-i", "any", "-U", "-s", "0", "-w", file, "tcp")
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
		cmd.Wait()
		t.Fatal("tcpdump did not start listening")
	}
	stopped := false
	stop = func() {
		if !stopped {
			stopped = true
			cmd.Process.Signal(syscall.SIGINT)
			cmd.Wait()
		}
	}
	t.Cleanup(stop)
	return stop
}

// Captured says whether the capture file holds s anywhere, as bytes: a plaintext
// payload on the wire.
func Captured(t testing.TB, file, s string) bool {
	t.Helper()
	raw, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	return bytes.Contains(raw, []byte(s))
}

// Tshark reads a capture and returns its non-empty output lines.
func Tshark(t testing.TB, file string, args ...string) []string {
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
