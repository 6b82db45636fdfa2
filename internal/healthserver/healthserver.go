// Package healthserver is the small HTTP server a Ferry daemon answers health
// probes (/healthz, /readyz) and Prometheus scrapes (/metrics) on.
package healthserver

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/ferrymesh/ferry/internal/listener"
)

// Routes says what a Server answers; an unset route is not served.
type Routes struct {
	// Ready serves /healthz (always "ok") and /readyz, which answers 503 with the
	// error's text while Ready returns one.
	Ready func() error
	// Metrics serves GET /metrics.
	Metrics http.Handler
}

// Handler returns the handler of r's routes.
func (r Routes) Handler() http.Handler {
	mux := http.NewServeMux()
	if r.Ready != nil {
		mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
		mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
			if err := r.Ready(); err != nil {
				http.Error(w, err.Error(), http.StatusServiceUnavailable)
				return
			}
			fmt.Fprintln(w, "ok")
		})
	}
	if r.Metrics != nil {
		mux.Handle("GET /metrics", r.Metrics)
	}
	return mux
}

// Server serves Routes on one address.
type Server struct {
	addr   string
	routes Routes
	log    *slog.Logger

	ln   net.Listener
	srv  *http.Server
	done chan struct{}
	once sync.Once
}

// New returns a server of routes on addr (host:port or unix:///path); nothing is
// opened until Start.
func New(addr string, routes Routes, log *slog.Logger) *Server {
	return &Server{addr: addr, routes: routes, log: log}
}

// Start opens the listener, failing at once on a bad address, and serves in the
// background until Stop.
func (s *Server) Start(ctx context.Context) error {
	ln, err := listener.Addr(ctx, s.addr)
	if err != nil {
		return err
	}
	s.ln = ln
	s.srv = &http.Server{Handler: s.routes.Handler(), ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 60 * time.Second}
	s.done = make(chan struct{})
	go func() {
		defer close(s.done)
		if err := s.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("http server stopped", "address", s.addr, "error", err)
		}
	}()
	return nil
}

// Addr is the address the server listens on (after Start).
func (s *Server) Addr() net.Addr { return s.ln.Addr() }

// Stop ends the server, letting requests in flight finish until ctx ends, and waits
// for it. Stopping a server that never started does nothing.
func (s *Server) Stop(ctx context.Context) error {
	if s.srv == nil {
		return nil
	}
	var err error
	s.once.Do(func() {
		if err = s.srv.Shutdown(ctx); err != nil {
			s.srv.Close()
			err = fmt.Errorf("http server %s: %w", s.addr, err)
		}
		<-s.done
	})
	return err
}
