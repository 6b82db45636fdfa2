// Package privileged gates tests that need root, BPF or network namespaces.
//
// Without FERRY_PRIVILEGED_TESTS=1 such tests skip with a message, so `go test ./...`
// passes for an ordinary user. With it (CI sets it), a missing privilege fails the
// test: a skip must never hide a regression.
package privileged

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"testing"

	"github.com/ferrymesh/ferry/agent/netns"
	vnetns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// EnvVar turns missing privileges from skips into failures.
const EnvVar = "FERRY_PRIVILEGED_TESTS"

// Require skips (or, under FERRY_PRIVILEGED_TESTS=1, fails) t unless the process
// runs as root.
func Require(t testing.TB) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv(EnvVar) == "1" {
		t.Fatalf("%s=1 but not running as root: this test needs root, BPF and network namespaces", EnvVar)
	}
	t.Skipf("needs root, BPF and network namespaces; run as root with %s=1", EnvVar)
}

// Missing skips t because the machine lacks something the test needs (a tool, a
// kernel feature), or under FERRY_PRIVILEGED_TESTS=1 fails it: there the machine is
// CI's, which has everything, so a missing piece is a regression to see.
func Missing(t testing.TB, format string, args ...any) {
	t.Helper()
	what := fmt.Sprintf(format, args...)
	if os.Getenv(EnvVar) == "1" {
		t.Fatalf("%s=1 but %s", EnvVar, what)
	}
	t.Skip(what)
}

// LookPath returns the path of the command name, or reports it Missing; install
// says where it comes from.
func LookPath(t testing.TB, name, install string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		Missing(t, "%s not installed (%s)", name, install)
	}
	return p
}

// NewNetns creates an anonymous network namespace with its loopback up and returns
// a handle to it; it is removed when the test ends. Run code inside with h.Do.
func NewNetns(t testing.TB) *netns.Handle {
	t.Helper()
	Require(t)
	ch := make(chan error, 1)
	var ns vnetns.NsHandle
	go func() {
		// This thread ends in the new namespace, so it is never unlocked: the
		// runtime discards it when the goroutine exits.
		runtime.LockOSThread()
		var err error
		ns, err = vnetns.New()
		if err == nil {
			err = setLoopbackUp()
		}
		ch <- err
	}()
	if err := <-ch; err != nil {
		t.Fatalf("new netns: %v", err)
	}
	defer ns.Close()
	h, err := netns.Open(fmt.Sprintf("/proc/self/fd/%d", int(ns)))
	if err != nil {
		t.Fatalf("new netns: %v", err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

func setLoopbackUp() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return err
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	return unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr)
}
