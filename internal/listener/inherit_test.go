package listener

import (
	"context"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
)

// A listener this process has open is found by NodeTCP, kept by an Inherited set
// under its own namespace and address, and handed out once by TCP.
func TestInheritedListenerIsTakenOnce(t *testing.T) {
	ln, err := TCP(context.Background(), "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	files, addrs, err := NodeTCP()
	if err != nil {
		t.Fatal(err)
	}
	set := NewInherited()
	defer set.Close()
	found := false
	for i, f := range files {
		if addrs[i].String() == ln.Addr().String() {
			found = true
		}
		if err := set.Add(f); err != nil {
			t.Fatal(err)
		}
	}
	if !found {
		t.Fatalf("NodeTCP did not find %s among %v", ln.Addr(), addrs)
	}
	ctx := WithInherited(context.Background(), set)
	got, err := TCP(ctx, ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer got.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ac, err := got.Accept() // the same socket: the connection is in its queue
	if err != nil {
		t.Fatal(err)
	}
	ac.Close()
	if _, err := TCP(ctx, ln.Addr().String()); err == nil {
		t.Fatal("the inherited listener was handed out twice (the second bind should fail: in use)")
	}
	own, _ := ownNetns()
	if _, ok := set.Take(own, netip.MustParseAddrPort(ln.Addr().String())); ok {
		t.Fatal("taken twice")
	}
}

// Closing a unix listener leaves a successor's socket file at the same path.
func TestUnixListenerLeavesSuccessorsSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.sock")
	old, err := Unix(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	next, err := Unix(context.Background(), path) // replaces the file
	if err != nil {
		t.Fatal(err)
	}
	old.Close()
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("the old listener's close removed the new socket: %v", err)
	}
	next.Close()
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("socket file left after its own listener closed: %v", err)
	}
}
