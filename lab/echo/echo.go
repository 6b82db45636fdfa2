// Package echo holds the lab's built-in workload programs: a TCP echo server (raw
// echo with half-close semantics, or a tiny HTTP server) and client helpers that send
// a deterministic pattern and verify every byte that comes back.
package echo

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// Mode selects what Serve speaks.
type Mode int

const (
	// ModeEcho copies every byte back, and on read EOF closes its write side once
	// everything has been echoed.
	ModeEcho Mode = iota
	// ModeHTTP answers /echo with the request body, /bytes?n=N with N bytes,
	// /status/CODE with that status, /headers with the request's headers (JSON), /
	// with JSON {pod, remote_addr}, and the paths http.go lists for traffic tests
	// (/fail, /delay, /request/, /stats).
	ModeHTTP
	// ModeGRPC serves the gRPC health service, naming the pod in a response
	// header (PodHeader).
	ModeGRPC
)

// Options configure Serve.
type Options struct {
	Mode Mode
	// Banner is sent on accept, before reading: a server that speaks first
	// (ModeEcho only).
	Banner string
	// Pod is the name reported by the HTTP / handler and in gRPC responses.
	Pod string
	// FailStatus, when set, answers every HTTP request (but /stats) with this
	// status: an endpoint that keeps failing.
	FailStatus int
	// Delay holds every HTTP answer (but /stats) back this long: an endpoint
	// slower than its peers.
	Delay time.Duration
}

// MaxBytes caps /bytes?n=N.
const MaxBytes = 1 << 30

// Serve answers connections on ln until ctx ends, then closes ln and every open
// connection and returns nil once the handlers are done. Pass a listener opened with
// MPTCP off (package internal/listener), as every Ferry listener is.
func Serve(ctx context.Context, ln net.Listener, opts Options) error {
	switch opts.Mode {
	case ModeHTTP:
		return serveHTTP(ctx, ln, opts)
	case ModeGRPC:
		return serveGRPC(ctx, ln, opts)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	conns := map[net.Conn]struct{}{}
	stop := context.AfterFunc(ctx, func() {
		ln.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
	})
	defer stop()
	defer wg.Wait()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return fmt.Errorf("accept: %w", err)
		}
		mu.Lock()
		if ctx.Err() != nil {
			mu.Unlock()
			c.Close()
			return nil
		}
		conns[c] = struct{}{}
		mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			_ = echoConn(c, opts.Banner)
			c.Close()
			mu.Lock()
			delete(conns, c)
			mu.Unlock()
		}()
	}
}

// echoConn writes the banner, echoes until EOF, then half-closes.
func echoConn(c net.Conn, banner string) error {
	if banner != "" {
		if _, err := io.WriteString(c, banner); err != nil {
			return err
		}
	}
	// A plain Read/Write loop rather than io.Copy, which would splice: splice on a
	// socket redirected by sk_msg has been seen to read 0 bytes (see DESIGN.md).
	buf := make([]byte, 64*1024)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				return werr
			}
		}
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
	}
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}
