// The agent's side of a listener handoff (agent/handoff): as the new agent, taking
// the running one's locks and listeners when it finds the lock held; as the running
// agent, offering them to a successor and draining once it serves.

package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/ferrymesh/ferry/agent/datapath"
	"github.com/ferrymesh/ferry/agent/handoff"
	"github.com/ferrymesh/ferry/internal/listener"
	"golang.org/x/sys/unix"
)

// inheritWait bounds how long a new agent waits, after its start, for its first
// state to give every inherited pod listener a pod before it tells the previous
// agent it serves (with an operator and no state cache, the state comes when the
// operator answers).
const inheritWait = 30 * time.Second

// pinLocker is the capture's pin-folder lock as a handoff passes it.
type pinLocker interface {
	PinLock() *datapath.Lock
	AdoptPinLock(l *datapath.Lock) error
}

// takeover is the handoff state of one agent, shared by its lock part (which takes
// over from a running agent) and its handoff part (which tells it this agent
// serves, then offers the same to the next one).
type takeover struct {
	a         *Agent
	inherited *listener.Inherited

	mu    sync.Mutex
	taken *handoff.Taken // from the previous agent, until it is told we serve

	// handed closes when a successor serves: this agent then stops accepting.
	handed     chan struct{}
	handedOnce sync.Once
}

// handoffPath is the handoff socket, beside the lock file.
func (c Config) handoffPath() string {
	if p := c.lockPath(); p != "" {
		return filepath.Join(filepath.Dir(p), "handoff.sock")
	}
	return ""
}

// take asks the agent holding the lock at lockPath (which this one could not take)
// for its locks and listeners. It returns this agent's lock, or an error that
// leaves the running agent as it was; when the running agent has just exited
// (no peer, the exchange broken) and the lock is free now, it is taken as usual.
func (t *takeover) take(ctx context.Context, lockPath string, locked error) (*datapath.Lock, error) {
	cfg := t.a.cfg
	if cfg.NoHandoff {
		return nil, locked
	}
	tk, err := handoff.Take(ctx, cfg.handoffPath(), cfg.Node)
	if err != nil {
		if lock, lerr := datapath.LockFile(lockPath); lerr == nil {
			t.a.log.Info("the running agent left during the handoff; starting as usual", "handoff", err)
			return lock, nil
		}
		return nil, fmt.Errorf("%w; %w", locked, err)
	}
	lock, err := t.adopt(tk)
	if err != nil {
		closeFiles(tk.Files)
		tk.Close()
		t.inherited.Close()
		return nil, fmt.Errorf("%w; handoff from pid %d: %w", locked, tk.PID, err)
	}
	t.mu.Lock()
	t.taken = tk
	t.mu.Unlock()
	t.a.log.Info("taking over from the running agent", "pid", tk.PID, "sockets", len(tk.Sockets))
	return lock, nil
}

// adopt takes the received descriptors: both locks (required), the listeners into
// the inherited set. The files are owned by what they went into, or closed.
func (t *takeover) adopt(tk *handoff.Taken) (*datapath.Lock, error) {
	cfg := t.a.cfg
	var lock, pins *datapath.Lock
	var errs []error
	for i, s := range tk.Sockets {
		f := tk.Files[i]
		tk.Files[i] = nil
		switch s.Kind {
		case handoff.KindLock:
			l, err := datapath.AdoptLock(s.Path, f)
			switch {
			case err != nil:
				f.Close()
				errs = append(errs, err)
			case filepath.Clean(s.Path) == filepath.Clean(cfg.lockPath()):
				lock = l
			case filepath.Clean(s.Path) == filepath.Clean(cfg.Datapath.PinDir):
				pins = l
			default:
				f.Close()
				errs = append(errs, fmt.Errorf("lock of %s is neither this agent's lock nor its pin folder", s.Path))
			}
		case handoff.KindPod, handoff.KindNode:
			if err := t.inherited.Add(f); err != nil {
				errs = append(errs, fmt.Errorf("%s socket %s %s: %w", s.Kind, s.Name, s.Addr, err))
			}
		default:
			f.Close()
		}
	}
	pl, ok := t.a.capture.(pinLocker)
	switch {
	case lock == nil || pins == nil || !ok:
		errs = append(errs, errors.New("the running agent did not pass both its lock and the pin folder's"))
	case len(errs) == 0:
		if err := pl.AdoptPinLock(pins); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		lock.Unlock()
		pins.Unlock()
		return nil, err
	}
	return lock, nil
}

func closeFiles(files []*os.File) {
	for _, f := range files {
		if f != nil {
			f.Close()
		}
	}
}

// Start (the handoff part, once everything else serves): tell the previous agent,
// if any, that this one serves, then offer the same to the next.
func (t *takeover) Start(ctx context.Context) error {
	t.mu.Lock()
	tk := t.taken
	t.taken = nil
	t.mu.Unlock()
	if tk != nil {
		t.serving(ctx, tk)
	}
	return t.a.handoffSrv.Start(ctx)
}

// serving waits (a bounded time) for every inherited pod listener to be served,
// tells the previous agent, and closes what was not taken.
func (t *takeover) serving(ctx context.Context, tk *handoff.Taken) {
	defer tk.Close()
	deadline := time.Now().Add(inheritWait)
	for t.inherited.Foreign() > 0 && time.Now().Before(deadline) && ctx.Err() == nil {
		// Pods come with the first state (file or cache); with the operator only,
		// they come when it answers.
		time.Sleep(20 * time.Millisecond)
	}
	if n := t.inherited.Len(); n > 0 {
		// Pods no longer in the state, or node listeners this agent does not serve.
		t.a.log.Warn("inherited listeners not served; closing them", "listeners", n)
	}
	t.inherited.Close()
	if err := tk.Serving(10 * time.Second); err != nil {
		t.a.log.Warn("telling the previous agent we serve", "pid", tk.PID, "error", err)
	} else {
		t.a.log.Info("serving; the previous agent drains", "pid", tk.PID)
	}
}

// abort gives up a handoff this agent has not told the previous one about: it
// closes the listeners received, and the previous agent, still accepting on
// them, carries on.
func (t *takeover) abort() {
	t.mu.Lock()
	tk := t.taken
	t.taken = nil
	t.mu.Unlock()
	t.inherited.Close()
	if tk != nil {
		tk.Close()
	}
}

// Stop stops offering the listeners.
func (t *takeover) Stop(ctx context.Context) error {
	return t.a.handoffSrv.Stop(ctx)
}

// offer lists the sockets to hand over: the pods' listeners, the node's TCP
// listeners, and both locks.
func (t *takeover) offer() ([]handoff.Socket, []*os.File, error) {
	var (
		socks []handoff.Socket
		files []*os.File
	)
	fail := func(err error) ([]handoff.Socket, []*os.File, error) {
		closeFiles(files)
		return nil, nil, err
	}
	for _, pl := range t.a.proxy.Listeners() {
		sc, ok := pl.Listener.(interface{ File() (*os.File, error) })
		if !ok {
			continue
		}
		f, err := sc.File()
		if err != nil {
			return fail(fmt.Errorf("pod %s listener: %w", pl.Name, err))
		}
		socks = append(socks, handoff.Socket{Kind: handoff.KindPod, Pod: pl.UID, Name: pl.Name, Netns: pl.Cookie, Addr: pl.Listener.Addr().String()})
		files = append(files, f)
	}
	nodeFiles, addrs, err := listener.NodeTCP()
	if err != nil {
		return fail(err)
	}
	for i, f := range nodeFiles {
		socks = append(socks, handoff.Socket{Kind: handoff.KindNode, Addr: addrs[i].String()})
		files = append(files, f)
	}
	var locks []*datapath.Lock
	if l := t.a.lock.held(); l != nil {
		locks = append(locks, l)
	}
	if pl, ok := t.a.capture.(pinLocker); ok && pl.PinLock() != nil {
		locks = append(locks, pl.PinLock())
	}
	for _, l := range locks {
		f, err := dupFile(l.File())
		if err != nil {
			return fail(fmt.Errorf("lock %s: %w", l.Path(), err))
		}
		socks = append(socks, handoff.Socket{Kind: handoff.KindLock, Path: l.Path()})
		files = append(files, f)
	}
	return socks, files, nil
}

func dupFile(f *os.File) (*os.File, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, err
	}
	var dup *os.File
	var derr error
	if err := rc.Control(func(fd uintptr) {
		var nfd int
		nfd, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
		if derr == nil {
			dup = os.NewFile(uintptr(nfd), f.Name())
		}
	}); err != nil {
		return nil, err
	}
	return dup, derr
}

// handedOff is called by the handoff server once a successor serves: this agent
// stops accepting at once (the successor accepts from the same sockets), and
// HandedOff tells its owner to drain and exit.
func (t *takeover) handedOff(pid int) {
	t.handedOnce.Do(func() {
		t.a.handedOver.Store(true)
		t.a.proxy.StopAccepting()
		// The state is the new agent's to apply: this one enrolls and releases
		// nothing more.
		for _, p := range t.a.parts {
			if _, ok := p.c.(*loop); ok {
				_ = p.c.Stop(context.Background())
			}
		}
		// The successor holds copies of both locks: closing this agent's leaves them
		// held by it alone (a flock belongs to the open file description, and close,
		// unlike LOCK_UN, releases nothing another process still holds), so if the
		// successor dies while this one drains, the next agent can start.
		if t.a.lock != nil {
			if err := t.a.lock.Stop(context.Background()); err != nil {
				t.a.log.Warn("closing the handed-over agent lock", "error", err)
			}
		}
		if err := t.a.capture.Unlock(); err != nil {
			t.a.log.Warn("closing the handed-over pin lock", "error", err)
		}
		t.a.log.Info("a new agent serves; stopped accepting, draining", "pid", pid)
		close(t.handed)
	})
}

// HandedOff closes once a new agent has taken over this one's listeners: the owner
// then calls Drain and Stop and exits. Stop after a handoff leaves the pins, the
// links and the pods' enrollments as they are: they are the new agent's now.
func (a *Agent) HandedOff() <-chan struct{} { return a.takeover.handed }

// CanHandOff says whether the agent offers its listeners to a new one.
func (a *Agent) CanHandOff() bool { return a.handoffSrv != nil }

// Drain waits, until ctx ends, for the connections this agent still carries after
// a handoff.
func (a *Agent) Drain(ctx context.Context) {
	a.proxy.Drain(ctx)
}
