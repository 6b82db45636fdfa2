// Package netns finds pod network namespaces and runs code inside them.
//
// A goroutine enters a namespace on an OS thread it has locked, so the rest of the
// process stays where it is; sockets created there keep their namespace for life,
// which is how the agent opens listeners and dials from inside a pod.
package netns

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Handle is an open network namespace.
//
// Do runs code on OS threads that stay inside the namespace between calls (up to
// maxIdle of them, each parked for at most idleFor), so a dial from a busy pod costs
// a hand-off to a parked thread instead of a thread lock, an open of the current
// namespace and two setns(2) calls.
type Handle struct {
	ns   vnetns.NsHandle
	path string

	mu     sync.Mutex
	idle   []*worker // parked threads inside ns, most recently used last
	closed bool
}

// maxIdle bounds the threads a namespace keeps parked; idleFor bounds how long one
// waits for work before it leaves the namespace and returns to the runtime.
const (
	maxIdle = 2
	idleFor = 10 * time.Second
)

// worker is a goroutine locked to an OS thread that has entered the namespace.
type worker struct {
	jobs chan job
}

type job struct {
	fn   func() error
	errc chan error
}

// Open opens the network namespace at path (a /var/run/netns file or /proc/PID/ns/net).
func Open(path string) (*Handle, error) {
	ns, err := vnetns.GetFromPath(path)
	if err != nil {
		return nil, fmt.Errorf("open netns %s: %w", path, err)
	}
	return &Handle{ns: ns, path: path}, nil
}

// Path is where the namespace was opened from.
func (h *Handle) Path() string { return h.path }

// FD is the namespace's file descriptor, valid until Close.
func (h *Handle) FD() int { return int(h.ns) }

// Close releases the namespace handle; parked threads leave the namespace. A Do in
// progress finishes where it is.
func (h *Handle) Close() error {
	h.mu.Lock()
	h.closed = true
	idle := h.idle
	h.idle = nil
	h.mu.Unlock()
	for _, w := range idle {
		close(w.jobs)
	}
	return h.ns.Close()
}

// Do runs fn on a locked OS thread inside the namespace: a parked one if there is
// one, else a new one. Calls may run at once, each on its own thread. A thread
// returns to the runtime only after it is back in the namespace it came from; if it
// cannot get back it is not unlocked, so the runtime discards it rather than reusing
// a thread in the wrong place.
func (h *Handle) Do(fn func() error) error {
	errc := make(chan error, 1)
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		return fmt.Errorf("enter netns %s: handle closed", h.path)
	}
	if n := len(h.idle); n > 0 {
		w := h.idle[n-1]
		h.idle = h.idle[:n-1]
		h.mu.Unlock()
		w.jobs <- job{fn, errc}
		return <-errc
	}
	h.mu.Unlock()
	go h.run(job{fn, errc})
	return <-errc
}

// run is a worker: it enters the namespace, runs first, then parks for more work.
func (h *Handle) run(first job) {
	runtime.LockOSThread()
	orig, err := vnetns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		first.errc <- fmt.Errorf("current netns: %w", err)
		return
	}
	defer orig.Close()
	if err := vnetns.Set(h.ns); err != nil {
		runtime.UnlockOSThread()
		first.errc <- fmt.Errorf("enter netns %s: %w", h.path, err)
		return
	}
	w := &worker{jobs: make(chan job)}
	timer := time.NewTimer(idleFor)
	defer timer.Stop()
	j := first
	for {
		j.errc <- j.fn()
		if !h.park(w) {
			break
		}
		timer.Reset(idleFor)
		var ok bool
		select {
		case j, ok = <-w.jobs:
		case <-timer.C:
			if !h.unpark(w) {
				// Do (or Close) took w just as the timer fired: its job, or the
				// close, is on the way.
				j, ok = <-w.jobs
			}
		}
		if !ok {
			break
		}
	}
	if err := vnetns.Set(orig); err != nil {
		return // thread stays locked and dies with this goroutine
	}
	runtime.UnlockOSThread()
}

// park offers w for the next Do; false if the handle is closed or has enough parked.
func (h *Handle) park(w *worker) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed || len(h.idle) >= maxIdle {
		return false
	}
	h.idle = append(h.idle, w)
	return true
}

// unpark takes an idle w off the list; false if a Do (or Close) already took it.
func (h *Handle) unpark(w *worker) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	for i, x := range h.idle {
		if x == w {
			h.idle = append(h.idle[:i], h.idle[i+1:]...)
			return true
		}
	}
	return false
}

// Cookie returns the namespace's netns cookie, the key BPF programs see.
func (h *Handle) Cookie() (uint64, error) {
	var cookie uint64
	err := h.Do(func() error {
		c, err := CurrentCookie()
		cookie = c
		return err
	})
	return cookie, err
}

// CurrentCookie returns the netns cookie of the calling thread's namespace.
func CurrentCookie() (uint64, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("netns cookie socket: %w", err)
	}
	defer unix.Close(fd)
	return SocketCookie(fd)
}

// SocketCookie returns the netns cookie of the namespace a socket lives in.
func SocketCookie(fd int) (uint64, error) {
	v, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	if err != nil {
		return 0, fmt.Errorf("getsockopt SO_NETNS_COOKIE: %w", err)
	}
	return v, nil
}

// Addrs lists the IP addresses configured in the namespace.
func (h *Handle) Addrs() ([]netip.Addr, error) {
	nl, err := netlink.NewHandleAt(h.ns)
	if err != nil {
		return nil, fmt.Errorf("netlink in %s: %w", h.path, err)
	}
	defer nl.Close()
	list, err := nl.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("list addresses in %s: %w", h.path, err)
	}
	out := make([]netip.Addr, 0, len(list))
	for _, a := range list {
		if ip, ok := netip.AddrFromSlice(a.IP); ok {
			out = append(out, ip.Unmap())
		}
	}
	return out, nil
}

// FindByIP returns the network namespace that holds ip, searching named namespaces
// (/var/run/netns) and then every process's namespace (/proc/*/ns/net). Each
// namespace is looked at once, however many paths lead to it.
func FindByIP(ip netip.Addr) (*Handle, error) {
	seen := map[[2]uint64]bool{}
	var denied error // a namespace we may not open might be the one
	for _, path := range candidatePaths() {
		var st unix.Stat_t
		if unix.Stat(path, &st) != nil {
			continue
		}
		id := [2]uint64{st.Dev, st.Ino}
		if seen[id] {
			continue
		}
		seen[id] = true
		h, err := Open(path)
		if err != nil {
			if errors.Is(err, os.ErrPermission) && denied == nil {
				denied = err
			}
			continue // else the process exited or the name was removed meanwhile
		}
		addrs, err := h.Addrs()
		if err == nil {
			for _, a := range addrs {
				if a == ip.Unmap() {
					return h, nil
				}
			}
		} else if denied == nil {
			// netlink flattens setns's error to text: try entering it ourselves to
			// tell a missing CAP_SYS_ADMIN from a namespace that went away.
			if derr := h.Do(func() error { return nil }); errors.Is(derr, os.ErrPermission) {
				denied = derr
			}
		}
		h.Close()
	}
	if denied != nil {
		return nil, fmt.Errorf("no network namespace we could open holds %s (is CAP_SYS_ADMIN or CAP_SYS_PTRACE missing?): %w", ip, denied)
	}
	return nil, fmt.Errorf("no network namespace holds %s", ip)
}

func candidatePaths() []string {
	var paths []string
	if names, err := os.ReadDir("/var/run/netns"); err == nil {
		for _, n := range names {
			paths = append(paths, filepath.Join("/var/run/netns", n.Name()))
		}
	}
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		if _, err := strconv.Atoi(p.Name()); err == nil {
			paths = append(paths, filepath.Join("/proc", p.Name(), "ns", "net"))
		}
	}
	return paths
}
