package main

import (
	"context"
	"net"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ferrymesh/ferry/api/admin"
)

// hint tells a missing socket from a socket nobody serves by the error's type.
func TestHintAdminSocket(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing.sock")
	_, err := admin.NewClient(missing).Status(context.Background())
	if err == nil || !strings.Contains(hint(err, missing).Error(), "is the agent running?") {
		t.Errorf("missing socket: %v", hint(err, missing))
	}

	stale := filepath.Join(dir, "stale.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: stale, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false) // the file stays, as a killed agent leaves it
	ln.Close()
	_, err = admin.NewClient(stale).Status(context.Background())
	if err == nil || !strings.Contains(hint(err, stale).Error(), "is not running") {
		t.Errorf("stale socket: %v", hint(err, stale))
	}
}
