// The small components the agent assembles its parts from: the node lock, hooks
// around a part whose lifecycle is two functions, and a loop that runs until stopped.

package agent

import (
	"context"
	"errors"
	"log/slog"
	"sync"

	"github.com/ferrymesh/ferry/agent/datapath"
)

// nodeLock is the agent's first part: the lock file in its state folder, held until
// the agent has stopped everything else. A second agent for the node (a DaemonSet
// surge, a mistake) fails here, before it has opened a socket, removed a file or
// adopted a pin of the running one; the data path takes a second lock on the pin
// folder, in case the state folders differ.
//
// When the lock is held, the new agent asks the holder over the handoff socket for
// the lock's and the pin folder's descriptors and the listeners (takeover.take);
// whatever goes wrong there, it still exits before touching anything.
type nodeLock struct {
	path string
	log  *slog.Logger
	t    *takeover

	mu   sync.Mutex
	lock *datapath.Lock
}

func (l *nodeLock) Start(ctx context.Context) error {
	lock, err := datapath.LockFile(l.path)
	if errors.Is(err, datapath.ErrLocked) {
		lock, err = l.t.take(ctx, l.path, err)
	}
	if err != nil {
		return err
	}
	l.mu.Lock()
	l.lock = lock
	l.mu.Unlock()
	l.log.Info("agent lock taken", "lock", l.path)
	return nil
}

func (l *nodeLock) Stop(context.Context) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	err := l.lock.Unlock()
	l.lock = nil
	return err
}

// held is the lock while the agent holds it.
func (l *nodeLock) held() *datapath.Lock {
	if l == nil {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lock
}

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
