// Package echo holds the lab's built-in workload programs: a TCP echo server (raw
// echo with half-close semantics, or a tiny HTTP server) and client helpers that send
// a deterministic pattern and verify every byte that comes back.
package echo

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
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
	// /status/CODE with that status, /headers with the request's headers (JSON), and
	// / with JSON {pod, remote_addr}.
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

func serveHTTP(ctx context.Context, ln net.Listener, opts Options) error {
	mux := http.NewServeMux()
	mux.HandleFunc("/echo", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/octet-stream")
		buf := make([]byte, 64*1024)
		for {
			n, err := r.Body.Read(buf)
			if n > 0 {
				if _, werr := w.Write(buf[:n]); werr != nil {
					return
				}
			}
			if err != nil {
				return
			}
		}
	})
	mux.HandleFunc("/bytes", func(w http.ResponseWriter, r *http.Request) {
		n, err := strconv.ParseInt(r.URL.Query().Get("n"), 10, 64)
		if err != nil || n < 0 || n > MaxBytes {
			http.Error(w, fmt.Sprintf("n: want an integer from 0 to %d", MaxBytes), http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Content-Length", strconv.FormatInt(n, 10))
		buf := make([]byte, 64*1024)
		var p Pattern
		for off := int64(0); off < n; {
			chunk := buf[:min(int64(len(buf)), n-off)]
			p.Fill(chunk, off)
			if _, err := w.Write(chunk); err != nil {
				return
			}
			off += int64(len(chunk))
		}
	})
	mux.HandleFunc("/status/{code}", func(w http.ResponseWriter, r *http.Request) {
		code, err := strconv.Atoi(r.PathValue("code"))
		if err != nil || code < 200 || code > 599 {
			http.Error(w, "code: want a status from 200 to 599", http.StatusBadRequest)
			return
		}
		w.WriteHeader(code)
	})
	mux.HandleFunc("/headers", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(r.Header)
	})
	mux.HandleFunc("/{$}", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]string{"pod": opts.Pod, "remote_addr": r.RemoteAddr})
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("http serve: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		srv.Close()
	}
	<-errc
	return nil
}
