package handoff

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// offerListeners returns an Offer of n TCP listeners on loopback, and them.
func offerListeners(t *testing.T, n int) (func() ([]Socket, []*os.File, error), []*net.TCPListener) {
	t.Helper()
	var lns []*net.TCPListener
	for range n {
		ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		lns = append(lns, ln)
	}
	return func() ([]Socket, []*os.File, error) {
		var socks []Socket
		var files []*os.File
		for _, ln := range lns {
			f, err := ln.File()
			if err != nil {
				return nil, nil, err
			}
			socks = append(socks, Socket{Kind: KindNode, Addr: ln.Addr().String()})
			files = append(files, f)
		}
		return socks, files, nil
	}, lns
}

func startServer(t *testing.T, node string, offer func() ([]Socket, []*os.File, error)) (*Server, string, chan int) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "handoff.sock")
	handed := make(chan int, 1)
	s, err := NewServer(ServerConfig{Path: path, Node: node, Offer: offer, Handed: func(pid int) { handed <- pid },
		Log: slog.New(slog.DiscardHandler), HelloTimeout: 5 * time.Second, ServingTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Stop(context.Background()) })
	return s, path, handed
}

// More listeners than one packet carries arrive, each the same socket as the
// running side's: a connection queued on it is accepted from the copy.
func TestHandoverPassesEverySocket(t *testing.T) {
	offer, lns := offerListeners(t, maxFDs+5)
	s, path, handed := startServer(t, "node1", offer)
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("handoff socket: %v, mode %v; want 0600", err, fi.Mode().Perm())
	}
	tk, err := Take(context.Background(), path, "node1")
	if err != nil {
		t.Fatal(err)
	}
	defer tk.Close()
	if len(tk.Files) != len(lns) || len(tk.Sockets) != len(lns) || tk.PID != os.Getpid() {
		t.Fatalf("got %d files, %d sockets from pid %d; want %d from %d", len(tk.Files), len(tk.Sockets), tk.PID, len(lns), os.Getpid())
	}
	// A connection made before the copy accepts is queued on the shared socket.
	c, err := net.Dial("tcp", lns[maxFDs+2].Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	got, err := net.FileListener(tk.Files[maxFDs+2])
	if err != nil {
		t.Fatal(err)
	}
	defer got.Close()
	if got.Addr().String() != tk.Sockets[maxFDs+2].Addr {
		t.Fatalf("file %d is %s, described as %s", maxFDs+2, got.Addr(), tk.Sockets[maxFDs+2].Addr)
	}
	ac, err := got.Accept()
	if err != nil {
		t.Fatal(err)
	}
	ac.Close()
	select {
	case <-handed:
		t.Fatal("handed over before the new side said it serves")
	default:
	}
	if err := tk.Serving(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	select {
	case pid := <-handed:
		if pid != os.Getpid() {
			t.Errorf("handed to pid %d, want %d", pid, os.Getpid())
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Handed not called")
	}
	if !s.Handed() {
		t.Error("server does not say it handed over")
	}
	// One successor only: the socket is closed (the successor opens its own).
	if _, err := Take(context.Background(), path, "node1"); !isReason(err, NoPeer) {
		t.Errorf("second take: %v, want %s", err, NoPeer)
	}
	for _, f := range tk.Files {
		f.Close()
	}
}

// A successor that goes away before it serves leaves the running side as it was,
// ready for the next one.
func TestAbandonedHandoverChangesNothing(t *testing.T) {
	offer, _ := offerListeners(t, 3)
	s, path, handed := startServer(t, "node1", offer)
	tk, err := Take(context.Background(), path, "node1")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range tk.Files {
		f.Close()
	}
	tk.Close()
	tk, err = Take(context.Background(), path, "node1")
	if err != nil {
		t.Fatalf("take after an abandoned one: %v", err)
	}
	defer tk.Close()
	if len(tk.Files) != 3 {
		t.Fatalf("%d files, want 3", len(tk.Files))
	}
	select {
	case <-handed:
		t.Fatal("handed over to a successor that never served")
	default:
	}
	if s.Handed() {
		t.Error("server says it handed over")
	}
}

func TestHandoverRefused(t *testing.T) {
	offer, _ := offerListeners(t, 1)
	_, path, _ := startServer(t, "node1", offer)
	if _, err := Take(context.Background(), path, "node2"); !isReason(err, Refused) {
		t.Errorf("another node: %v, want %s", err, Refused)
	}
	// Another protocol version, spoken by hand.
	c, err := net.Dial("unixpacket", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	b, _ := json.Marshal(message{Version: Version + 1, Op: OpHello, Node: "node1"})
	if _, err := c.Write(b); err != nil {
		t.Fatal(err)
	}
	m, files, err := recv(c.(*net.UnixConn))
	if err != nil || m.Op != OpRefused || len(files) != 0 {
		t.Errorf("version %d: %+v, %d files, %v; want refused with nothing", Version+1, m, len(files), err)
	}
	// Garbage is refused too, and the server goes on.
	g, err := net.Dial("unixpacket", path)
	if err != nil {
		t.Fatal(err)
	}
	g.Write([]byte("{not json"))
	io.Copy(io.Discard, g)
	g.Close()
	if tk, err := Take(context.Background(), path, "node1"); err != nil {
		t.Errorf("after garbage: %v", err)
	} else {
		tk.Close()
	}
}

func TestNoPeer(t *testing.T) {
	if _, err := Take(context.Background(), filepath.Join(t.TempDir(), "handoff.sock"), "node1"); !isReason(err, NoPeer) {
		t.Errorf("no socket: %v, want %s", err, NoPeer)
	}
}

func isReason(err error, r Reason) bool {
	var he *Error
	return errors.As(err, &he) && he.Reason == r
}
