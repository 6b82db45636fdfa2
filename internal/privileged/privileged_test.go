package privileged

import (
	"testing"

	"github.com/ferrymesh/ferry/agent/netns"
)

func TestNewNetnsIsolated(t *testing.T) {
	h := NewNetns(t)
	inner, err := h.Cookie()
	if err != nil {
		t.Fatal(err)
	}
	outer, err := netns.CurrentCookie()
	if err != nil {
		t.Fatal(err)
	}
	if inner == outer {
		t.Fatalf("new netns has the caller's cookie %d", inner)
	}
	addrs, err := h.Addrs()
	if err != nil {
		t.Fatal(err)
	}
	if len(addrs) == 0 {
		t.Fatal("loopback has no address in the new netns")
	}
}
