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

	"github.com/vishvananda/netlink"
	vnetns "github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Handle is an open network namespace.
type Handle struct {
	ns   vnetns.NsHandle
	path string
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

// Close releases the namespace handle.
func (h *Handle) Close() error { return h.ns.Close() }

// Do runs fn inside the namespace on the caller's own goroutine, locked to its OS
// thread for the call, and then puts the thread back where it was (the caller may
// itself be inside a Do). No goroutine or thread hand-off: a dial to a pod costs the
// open of the thread's namespace and two setns(2) calls. A thread that cannot be put
// back would leave the caller making sockets in the wrong namespace, so that panics.
func (h *Handle) Do(fn func() error) error {
	runtime.LockOSThread()
	orig, err := vnetns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("current netns: %w", err)
	}
	defer orig.Close()
	if err := vnetns.Set(h.ns); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("enter netns %s: %w", h.path, err)
	}
	defer func() {
		if err := vnetns.Set(orig); err != nil {
			panic(fmt.Sprintf("netns: cannot return thread from %s: %v", h.path, err))
		}
		runtime.UnlockOSThread()
	}()
	return fn()
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
