// The small components the agent assembles its parts from: hooks around a part
// whose lifecycle is two functions, and a loop that runs until stopped.

package agent

import (
	"context"
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
