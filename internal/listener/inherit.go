// Listeners inherited from a previous agent (a listener handoff, agent/handoff): the
// open sockets it passed are kept here, and the functions that open listeners take
// one of them, when the context carries a set with one on the same address, instead
// of binding a new socket (which would fail with "address in use" while the previous
// agent still holds it, or leave a gap once it has closed it).

package listener

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// Inherited holds listening sockets received from another process, by network
// namespace cookie and bound address. Each is taken at most once; Close closes the
// ones nobody took.
type Inherited struct {
	mu  sync.Mutex
	lns map[inheritKey]net.Listener
}

type inheritKey struct {
	netns uint64 // network namespace cookie (SO_NETNS_COOKIE)
	addr  netip.AddrPort
}

// NewInherited returns an empty set.
func NewInherited() *Inherited {
	return &Inherited{lns: map[inheritKey]net.Listener{}}
}

// Add keeps the listening TCP socket f (the set owns it from here, f itself is
// closed): its namespace and address are read from the socket itself, so a socket
// can only ever be used where it is bound.
func (s *Inherited) Add(f *os.File) error {
	defer f.Close()
	k, err := socketKey(int(f.Fd()))
	if err != nil {
		return err
	}
	ln, err := net.FileListener(f) // dups f
	if err != nil {
		return fmt.Errorf("inherited socket %s: %w", k.addr, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if old, dup := s.lns[k]; dup {
		old.Close()
	}
	s.lns[k] = ln
	return nil
}

// Len is how many listeners are still to be taken.
func (s *Inherited) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.lns)
}

// Foreign is how many listeners are still to be taken in namespaces other than
// this thread's (a previous agent's in-pod listeners).
func (s *Inherited) Foreign() int {
	own, err := ownNetns()
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for k := range s.lns {
		if err != nil || k.netns != own {
			n++
		}
	}
	return n
}

// Take returns the listener bound to addr in the network namespace netns and
// removes it from the set.
func (s *Inherited) Take(netns uint64, addr netip.AddrPort) (net.Listener, bool) {
	if s == nil {
		return nil, false
	}
	k := inheritKey{netns, netip.AddrPortFrom(addr.Addr().Unmap(), addr.Port())}
	s.mu.Lock()
	defer s.mu.Unlock()
	ln, ok := s.lns[k]
	delete(s.lns, k)
	return ln, ok
}

// Close closes the listeners nobody took: the previous agent still holds its copy,
// so the kernel keeps the socket for as long as that one does.
func (s *Inherited) Close() error {
	if s == nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var errs []error
	for k, ln := range s.lns {
		errs = append(errs, ln.Close())
		delete(s.lns, k)
	}
	return errors.Join(errs...)
}

// socketKey reads a listening TCP socket's namespace cookie and bound address.
func socketKey(fd int) (inheritKey, error) {
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil || typ != unix.SOCK_STREAM {
		return inheritKey{}, fmt.Errorf("inherited socket: not a stream socket (type %d): %v", typ, err)
	}
	if acc, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN); err != nil || acc != 1 {
		return inheritKey{}, errors.New("inherited socket: not listening")
	}
	cookie, err := NetnsCookie(fd)
	if err != nil {
		return inheritKey{}, err
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return inheritKey{}, fmt.Errorf("inherited socket: getsockname: %w", err)
	}
	var ap netip.AddrPort
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		ap = netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port))
	case *unix.SockaddrInet6:
		ap = netip.AddrPortFrom(netip.AddrFrom16(a.Addr).Unmap(), uint16(a.Port))
	default:
		return inheritKey{}, fmt.Errorf("inherited socket: not a TCP socket (%T)", sa)
	}
	return inheritKey{cookie, ap}, nil
}

// NetnsCookie is the cookie of the network namespace socket fd belongs to.
func NetnsCookie(fd int) (uint64, error) {
	v, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	if err != nil {
		return 0, fmt.Errorf("socket netns cookie: %w", err)
	}
	return v, nil
}

// ownNetns is the cookie of this thread's network namespace (that of a fresh socket).
func ownNetns() (uint64, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("socket netns cookie: %w", err)
	}
	defer unix.Close(fd)
	return NetnsCookie(fd)
}

type inheritedKey struct{}

// WithInherited returns ctx carrying s: TCP and InNetns called with it take their
// listeners from s where it has one.
func WithInherited(ctx context.Context, s *Inherited) context.Context {
	return context.WithValue(ctx, inheritedKey{}, s)
}

func inheritedFrom(ctx context.Context) *Inherited {
	s, _ := ctx.Value(inheritedKey{}).(*Inherited)
	return s
}

// takeTCP is the inherited listener for address (host:port, in this process's
// network namespace), if ctx carries one.
func takeTCP(ctx context.Context, address string) (net.Listener, bool) {
	s := inheritedFrom(ctx)
	if s == nil || s.Len() == 0 {
		return nil, false
	}
	tcp, err := net.ResolveTCPAddr("tcp", address)
	if err != nil {
		return nil, false
	}
	ns, err := ownNetns()
	if err != nil {
		return nil, false
	}
	ap := tcp.AddrPort()
	if !tcp.IP.IsUnspecified() && tcp.IP != nil {
		return s.Take(ns, ap)
	}
	// ":15021" binds the IPv6 wildcard (dual stack) or the IPv4 one.
	if ln, ok := s.Take(ns, netip.AddrPortFrom(netip.IPv6Unspecified(), ap.Port())); ok {
		return ln, true
	}
	return s.Take(ns, netip.AddrPortFrom(netip.IPv4Unspecified(), ap.Port()))
}

// InNetns returns the inherited listener on addr in the network namespace netns when
// ctx carries one, else the listener open makes.
func InNetns(ctx context.Context, netns uint64, addr netip.AddrPort, open func() (net.Listener, error)) (net.Listener, error) {
	if ln, ok := inheritedFrom(ctx).Take(netns, addr); ok {
		return ln, nil
	}
	return open()
}

// NodeTCP returns a copy of every listening TCP socket this process has open in its
// own network namespace (health, metrics, the observer's TCP address), found
// through /proc/self/fd, so a listener handoff passes them all without each
// server having to be asked. The caller closes the files.
func NodeTCP() ([]*os.File, []netip.AddrPort, error) {
	own, err := ownNetns()
	if err != nil {
		return nil, nil, err
	}
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return nil, nil, fmt.Errorf("list descriptors: %w", err)
	}
	var (
		files []*os.File
		addrs []netip.AddrPort
	)
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if target, err := os.Readlink("/proc/self/fd/" + e.Name()); err != nil || !strings.HasPrefix(target, "socket:") {
			continue
		}
		// A copy first: fd may be closed, and its number reused, meanwhile; the
		// checks below are on the copy.
		dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			continue
		}
		k, err := socketKey(dup)
		if err != nil || k.netns != own {
			unix.Close(dup)
			continue
		}
		files = append(files, os.NewFile(uintptr(dup), "listener "+k.addr.String()))
		addrs = append(addrs, k.addr)
	}
	return files, addrs, nil
}
