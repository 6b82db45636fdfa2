// Package loopback gives tests TCP endpoints on 127.0.0.1 in the test's own network
// namespace: a listener, both ends of one connection, and a served app. Every
// listener is on a port the kernel chose and held until the test ends, so tests never
// race each other for a port.
package loopback

import (
	"context"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"

	"github.com/ferrymesh/ferry/internal/listener"
)

// Listen returns a TCP listener on 127.0.0.1 (Multipath TCP off, as every Ferry
// listener), closed when the test ends.
func Listen(tb testing.TB) net.Listener {
	tb.Helper()
	lc := listener.Config()
	ln, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { ln.Close() })
	return ln
}

// Pair returns both ends of one TCP connection: the one that dialled and the one
// that was accepted. Both are closed when the test ends.
func Pair(tb testing.TB) (dialed, accepted *net.TCPConn) {
	tb.Helper()
	ln := Listen(tb)
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		tb.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		c.Close()
		tb.Fatal(err)
	}
	ln.Close()
	tb.Cleanup(func() { c.Close(); s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

// Serve runs handle for each connection accepted on a new listener until the test
// ends, then waits for the handlers; it returns the listener's address.
func Serve(tb testing.TB, handle func(c *net.TCPConn)) netip.AddrPort {
	tb.Helper()
	ln := Listen(tb)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				handle(c.(*net.TCPConn))
			}()
		}
	}()
	tb.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// Echo copies back what it reads and half-closes when the client does: a handler
// for Serve.
func Echo(c *net.TCPConn) {
	if _, err := io.Copy(c, c); err == nil {
		c.CloseWrite()
	}
}
