package admin

import (
	"context"
	"net"
	"path/filepath"
	"strings"
	"testing"
)

// The client tells a missing socket from a socket nobody serves, by the error's type.
func TestClientSaysWhyUnreachable(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing.sock")
	if _, err := NewClient(missing).Status(context.Background()); err == nil || !strings.Contains(err.Error(), "is the agent running?") {
		t.Errorf("missing socket: %v", err)
	}

	stale := filepath.Join(dir, "stale.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: stale, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false) // the file stays, as a killed agent leaves it
	ln.Close()
	if _, err := NewClient(stale).Status(context.Background()); err == nil || !strings.Contains(err.Error(), "is not running") {
		t.Errorf("stale socket: %v", err)
	}
}
