// The small components the agent assembles its parts from: hooks around a part
// whose lifecycle is two functions, a loop that runs until stopped, and the health
// endpoints.

package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"
)

// hooks is a component made of two functions; either may be nil.
type hooks struct {
	start, stop func(context.Context) error
}

func (h hooks) Start(ctx context.Context) error {
	if h.start == nil {
		return nil
	}
	return h.start(ctx)
}

func (h hooks) Stop(ctx context.Context) error {
	if h.stop == nil {
		return nil
	}
	return h.stop(ctx)
}

// loop runs run on a goroutine it owns from Start until Stop or the end of Start's
// ctx: the state stream, certificate renewal, the file watch, reconcile.
type loop struct {
	run    func(context.Context)
	cancel context.CancelFunc
	done   chan struct{}
}

func (l *loop) Start(ctx context.Context) error {
	ctx, l.cancel = context.WithCancel(ctx)
	l.done = make(chan struct{})
	go func() {
		defer close(l.done)
		l.run(ctx)
	}()
	return nil
}

// Stop ends the loop and waits for it, or for ctx.
func (l *loop) Stop(ctx context.Context) error {
	if l.cancel == nil {
		return nil
	}
	l.cancel()
	select {
	case <-l.done:
		return nil
	case <-ctx.Done():
		return context.Cause(ctx)
	}
}

// healthServer serves /healthz (alive) and /readyz (a state is applied) on addr.
type healthServer struct {
	addr  string
	ready func() bool
	srv   *http.Server
	done  chan struct{}
}

func (h *healthServer) Start(ctx context.Context) error {
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	l, err := lc.Listen(ctx, "tcp", h.addr)
	if err != nil {
		return fmt.Errorf("health listener: %w", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !h.ready() {
			http.Error(w, "no state applied yet", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	h.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	h.done = make(chan struct{})
	go func() {
		defer close(h.done)
		_ = h.srv.Serve(l)
	}()
	return nil
}

func (h *healthServer) Stop(context.Context) error {
	if h.srv == nil {
		return nil
	}
	err := h.srv.Close()
	<-h.done
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	return err
}
