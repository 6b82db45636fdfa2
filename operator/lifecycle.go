package operator

import (
	"context"
	"errors"
	"fmt"
	"sync"
)

// component is one part of the operator. Start runs the components in order and
// Stop stops the started ones in reverse, so a part never outlives what it uses.
type component struct {
	name  string
	start func(context.Context) error
	stop  func(context.Context) error
}

// startAll starts cs in order; when one fails, it stops those already started, in
// reverse, and returns the failure.
func startAll(ctx context.Context, cs []component) ([]component, error) {
	for i, c := range cs {
		if err := c.start(ctx); err != nil {
			_ = stopAll(ctx, cs[:i])
			return nil, err
		}
	}
	return cs, nil
}

// stopAll stops cs in reverse order, all of them even when one fails.
func stopAll(ctx context.Context, cs []component) error {
	var errs []error
	for i := len(cs) - 1; i >= 0; i-- {
		if err := cs[i].stop(ctx); err != nil {
			errs = append(errs, fmt.Errorf("stop %s: %w", cs[i].name, err))
		}
	}
	return errors.Join(errs...)
}

// group owns the goroutines of one component: they run until stop cancels their
// context, and stop waits for them.
type group struct {
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

func newGroup(ctx context.Context) *group {
	g := &group{}
	g.ctx, g.cancel = context.WithCancel(ctx)
	return g
}

// run runs f on a goroutine of the group.
func (g *group) run(f func(context.Context)) {
	g.wg.Add(1)
	go func() {
		defer g.wg.Done()
		f(g.ctx)
	}()
}

// stop cancels the group's goroutines and waits for them until ctx ends.
func (g *group) stop(ctx context.Context) error {
	g.cancel()
	done := make(chan struct{})
	go func() {
		g.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
