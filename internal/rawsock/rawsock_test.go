package rawsock

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"
)

// pair is a connected TCP pair on loopback: a is wrapped, b is package net's own.
func pair(t *testing.T) (a net.Conn, b *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s := <-accepted
	if s == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	a = Wrap(c)
	if _, ok := a.(*Conn); !ok {
		t.Fatalf("Wrap(%T) = %T, want *rawsock.Conn", c, a)
	}
	return a, s.(*net.TCPConn)
}

// The wrapped socket moves bytes both ways as package net's does, including more
// than a send buffer holds (Write waits for room), and reads io.EOF at the end.
func TestReadWriteEOF(t *testing.T) {
	a, b := pair(t)
	msg := bytes.Repeat([]byte("ferry"), 2<<20) // 10 MiB: more than the socket buffers
	got := make(chan []byte)
	go func() {
		all, _ := io.ReadAll(b)
		got <- all
	}()
	if n, err := a.Write(msg); err != nil || n != len(msg) {
		t.Fatalf("Write = %d, %v; want %d, nil", n, err, len(msg))
	}
	a.(*Conn).Conn.(*net.TCPConn).CloseWrite()
	if all := <-got; !bytes.Equal(all, msg) {
		t.Fatalf("peer read %d bytes, want %d", len(all), len(msg))
	}
	if _, err := b.Write([]byte("back")); err != nil {
		t.Fatal(err)
	}
	b.CloseWrite()
	all, err := io.ReadAll(a)
	if err != nil || string(all) != "back" {
		t.Fatalf("ReadAll = %q, %v; want \"back\", nil", all, err)
	}
}

// Deadlines and Close end a waiting Read with package net's errors.
func TestDeadlineAndClose(t *testing.T) {
	a, _ := pair(t)
	a.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	buf := make([]byte, 8)
	if _, err := a.Read(buf); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Read past the deadline: %v, want os.ErrDeadlineExceeded", err)
	}
	a.SetReadDeadline(time.Time{})
	done := make(chan error, 1)
	go func() {
		_, err := a.Read(buf)
		done <- err
	}()
	time.Sleep(20 * time.Millisecond)
	a.Close()
	if err := <-done; !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Read on a closed connection: %v, want net.ErrClosed", err)
	}
	if _, err := a.Write(buf); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Write on a closed connection: %v, want net.ErrClosed", err)
	}
}

// TryWrite takes what the send buffer has room for and returns without waiting.
func TestTryWriteDoesNotWait(t *testing.T) {
	a, _ := pair(t) // the peer never reads
	w := a.(*Conn).w.(*Writer)
	big := make([]byte, 64<<20)
	n, err := w.TryWrite(big)
	if err != nil || n <= 0 || n >= len(big) {
		t.Fatalf("TryWrite of 64 MiB to a peer that does not read = %d, %v; want part of it, nil", n, err)
	}
}

// A connection that is not a socket keeps its own Read and Write.
func TestWrapLeavesOtherConns(t *testing.T) {
	c, d := net.Pipe()
	defer c.Close()
	defer d.Close()
	if w := Wrap(c); w != c {
		t.Fatalf("Wrap(net.Pipe end) = %T, want it unchanged", w)
	}
}
