package lab

import (
	"bytes"
	"errors"
	"log/slog"
	"testing"
)

func TestProgressHandler(t *testing.T) {
	var b bytes.Buffer
	log := slog.New(NewProgressHandler(&b))
	log.Debug("hidden")
	log.Info("create node1", "pods", 3)
	log.With("node", "node2").Warn("slow", "error", errors.New("boom"))
	log.Error("failed")
	want := "- create node1 pods=3\nwarning: slow node=node2 error=boom\nerror: failed\n"
	if b.String() != want {
		t.Errorf("got %q, want %q", b.String(), want)
	}
}
