// Package datapath loads Ferry's eBPF programs, attaches and pins them, and enrolls
// pod network namespaces.
//
// Everything the kernel needs to keep redirecting traffic is pinned under the pin
// folder: the maps (by name) and the links (PinDir/links). Close releases only this
// process's file descriptors, so capture keeps working while the agent restarts; the
// next Start adopts the pins, swapping in the new programs with link updates (no gap
// without capture). Cleanup removes everything.
package datapath

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/ferrymesh/ferry/agent/netns"
	"github.com/ferrymesh/ferry/api/mesh"
	"github.com/ferrymesh/ferry/bpf"
	"github.com/spf13/pflag"
	"golang.org/x/sys/unix"
)

// Defaults for Config's zero values (the socket mark and the mesh ports are
// mesh.DefaultMark and mesh.DefaultPorts).
const (
	DefaultPinDir  = "/sys/fs/bpf/ferry"
	DefaultMaxPods = 110
)

// Link pin names under PinDir/links.
const (
	linksDir         = "links"
	linkConnect4     = "connect4"
	linkConnect6     = "connect6"
	linkSockops      = "sockops"
	linkSkMsg        = "sk_msg"
	skLookupPrefix   = "sk_lookup_"
	attachCgroupDesc = "cgroup"
)

// Config configures the data path.
type Config struct {
	// PinDir is the bpffs folder holding Ferry's pins; "" means DefaultPinDir.
	PinDir string
	// CgroupPath is the cgroup v2 folder the capture programs attach to; "" means the
	// root of the cgroup v2 mount (found in /proc/self/mountinfo).
	CgroupPath string
	// Mark is the SO_MARK on the agent's own sockets, which are never captured; 0
	// means mesh.DefaultMark.
	Mark uint32
	// Ports are the mesh ports the programs redirect to and never capture: the
	// proxy's, which the agent passes to both; zero means mesh.DefaultPorts.
	Ports mesh.Ports
	// FastPath enables the sockhash + sk_msg path between local sockets.
	FastPath bool
	// FastPathQueue bounds each fast-path socket's ingress queue, in bytes, when its
	// receive buffer is smaller; past it a sender's messages take the TCP path. 0
	// means bpf.DefaultFastPathQueue.
	FastPathQueue uint32
	// MaxPods is the node's pod limit, which sizes the maps; 0 means DefaultMaxPods.
	MaxPods int
	// ExcludedPorts are destination ports never captured, besides the mesh ports.
	ExcludedPorts []uint16
}

// DefaultConfig is the data path's configuration with every default filled in. The
// fast path is off by default: it is safe (sk_msg bounds each socket's ingress queue,
// so a fast sender blocks instead of getting ENOMEM) but, measured, not faster than
// loopback TCP with the proxy splicing (docs/datapath.md, "Fast path and
// back-pressure").
func DefaultConfig() Config {
	return Config{PinDir: DefaultPinDir, Mark: mesh.DefaultMark, Ports: mesh.DefaultPorts(), MaxPods: DefaultMaxPods}
}

// Flags registers the data path's flags on fs, with c's values as their defaults.
func (c *Config) Flags(fs *pflag.FlagSet) {
	fs.StringVar(&c.PinDir, "bpf-pin-dir", c.PinDir, "bpffs folder where programs, maps and links are pinned")
	fs.StringVar(&c.CgroupPath, "cgroup", c.CgroupPath, "cgroup v2 folder to attach capture to (default: the cgroup2 mount root)")
	fs.Uint32Var(&c.Mark, "mark", c.Mark, "SO_MARK on the agent's own sockets, which capture skips")
	fs.BoolVar(&c.FastPath, "fast-path", c.FastPath, "move bytes between local sockets with sockmap/sk_msg, bounded per socket (off: loopback TCP, and the proxy splices)")
	fs.Uint32Var(&c.FastPathQueue, "fast-path-queue", c.FastPathQueue, "bytes a fast-path socket may hold on its ingress queue before a faster sender is sent the TCP way (0: 1 MiB)")
	fs.IntVar(&c.MaxPods, "max-pods", c.MaxPods, "most pods on this node; sizes the BPF maps")
}

// Datapath is the loaded, attached and pinned eBPF data path.
type Datapath struct {
	cfg Config
	log *slog.Logger

	mu       sync.Mutex
	cgroup   string
	objs     *bpf.Objects
	links    map[string]link.Link // cgroup and sk_msg links, by pin name
	skLookup map[uint64]link.Link // by netns cookie
	// lock is held on the pin folder from Lock (or the start of Start) to Unlock
	// (or the end of Stop): another agent using the same pins stops before it adopts
	// them. startLocked says Start took it, so Stop lets it go.
	lock        *Lock
	startLocked bool
}

// New validates cfg and fills in defaults; it touches nothing in the kernel.
func New(cfg Config, log *slog.Logger) (*Datapath, error) {
	if cfg.PinDir == "" {
		cfg.PinDir = DefaultPinDir
	}
	if !filepath.IsAbs(cfg.PinDir) {
		return nil, fmt.Errorf("datapath config: pin folder %q is not absolute", cfg.PinDir)
	}
	if cfg.CgroupPath != "" && !filepath.IsAbs(cfg.CgroupPath) {
		return nil, fmt.Errorf("datapath config: cgroup path %q is not absolute", cfg.CgroupPath)
	}
	if cfg.Mark == 0 {
		cfg.Mark = mesh.DefaultMark
	}
	if cfg.Ports == (mesh.Ports{}) {
		cfg.Ports = mesh.DefaultPorts()
	}
	if err := cfg.Ports.Validate(); err != nil {
		return nil, fmt.Errorf("datapath config: %w", err)
	}
	if cfg.MaxPods == 0 {
		cfg.MaxPods = DefaultMaxPods
	}
	if cfg.MaxPods < 0 {
		return nil, fmt.Errorf("datapath config: MaxPods %d is negative", cfg.MaxPods)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	cfg.ExcludedPorts = append([]uint16(nil), cfg.ExcludedPorts...)
	return &Datapath{cfg: cfg, log: log, links: map[string]link.Link{}, skLookup: map[uint64]link.Link{}}, nil
}

// Config is the configuration with its defaults filled in.
func (d *Datapath) Config() Config {
	d.mu.Lock()
	defer d.mu.Unlock()
	c := d.cfg
	c.ExcludedPorts = append([]uint16(nil), c.ExcludedPorts...)
	return c
}

// PinDir is the bpffs folder holding the pins.
func (d *Datapath) PinDir() string { return d.cfg.PinDir }

// Start mounts bpffs if needed, loads the programs (adopting pinned maps), attaches
// or adopts the links and drops sk_lookup links of namespaces no longer enrolled.
func (d *Datapath) Start(ctx context.Context) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.objs != nil {
		return errors.New("datapath already started")
	}
	if d.lock == nil {
		lock, err := lockPinDir(d.cfg.PinDir)
		if err != nil {
			return err
		}
		d.lock, d.startLocked = lock, true
	}
	if err := os.MkdirAll(filepath.Join(d.cfg.PinDir, linksDir), 0o700); err != nil {
		d.stopLocked()
		return fmt.Errorf("create links folder: %w", err)
	}
	cgroup, err := ResolveCgroup(d.cfg.CgroupPath)
	if err != nil {
		d.stopLocked()
		return err
	}
	d.cgroup = cgroup
	objs, err := bpf.Load(bpf.Config{AgentMark: d.cfg.Mark, Ports: d.cfg.Ports, FastPath: d.cfg.FastPath, FastPathQueue: d.cfg.FastPathQueue, MaxPods: d.cfg.MaxPods}, d.cfg.PinDir)
	if err != nil {
		d.stopLocked()
		return err
	}
	d.objs = objs
	if err := d.start(ctx); err != nil {
		d.stopLocked()
		return err
	}
	d.log.Info("datapath started", "pin_dir", d.cfg.PinDir, "cgroup", d.cgroup, "fast_path", d.cfg.FastPath,
		"enrolled", len(d.skLookup))
	return nil
}

// Lock takes the pin folder's lock without starting anything, for an agent that
// must hold it before it does anything else (open a socket, remove a stale one);
// Start then finds it held. It fails with ErrLocked, naming the holder, while
// another process holds it. Unlock releases it.
func (d *Datapath) Lock() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.lock != nil {
		return nil
	}
	lock, err := lockPinDir(d.cfg.PinDir)
	if err != nil {
		return err
	}
	d.lock = lock
	return nil
}

// Unlock releases the lock Lock took; call it after Stop.
func (d *Datapath) Unlock() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.startLocked {
		return nil // Stop's to release
	}
	err := d.lock.Unlock()
	d.lock = nil
	return err
}

// lockPinDir locks the pin folder before anything under it is read or changed. A
// pin folder on bpffs is locked as it is; one that is missing or not on bpffs cannot
// hold a live agent's pins, so it is made (and bpffs mounted) first.
func lockPinDir(dir string) (*Lock, error) {
	if ok, err := isBPFFS(dir); err != nil || !ok {
		if err := EnsureBPFFS(dir); err != nil {
			return nil, err
		}
	}
	return LockDir(dir)
}

func (d *Datapath) start(ctx context.Context) error {
	for _, c := range []struct {
		name   string
		prog   *ebpf.Program
		attach ebpf.AttachType
	}{
		{linkConnect4, d.objs.FerryConnect4, ebpf.AttachCGroupInet4Connect},
		{linkConnect6, d.objs.FerryConnect6, ebpf.AttachCGroupInet6Connect},
		{linkSockops, d.objs.FerrySockops, ebpf.AttachCGroupSockOps},
	} {
		l, err := d.cgroupLink(c.name, c.prog, c.attach)
		if err != nil {
			return fmt.Errorf("attach %s: %w", c.name, err)
		}
		d.links[c.name] = l
	}
	if err := d.skMsg(); err != nil {
		return err
	}
	if err := d.adoptSkLookup(ctx); err != nil {
		return err
	}
	if err := d.objs.SetExcludedPorts(d.cfg.ExcludedPorts); err != nil {
		return err
	}
	return nil
}

func (d *Datapath) linkPin(name string) string {
	return filepath.Join(d.cfg.PinDir, linksDir, name)
}

// cgroupLink adopts the pinned link for name if it is attached to the configured
// cgroup, swapping in prog, and otherwise attaches (and pins) a new one.
func (d *Datapath) cgroupLink(name string, prog *ebpf.Program, attach ebpf.AttachType) (link.Link, error) {
	pin := d.linkPin(name)
	want, err := cgroupID(d.cgroup)
	if err != nil {
		return nil, err
	}
	if old, err := link.LoadPinnedLink(pin, nil); err == nil {
		info, ierr := old.Info()
		if ierr == nil && info.Cgroup() != nil && info.Cgroup().CgroupId == want {
			if err := old.Update(prog); err != nil {
				old.Close()
				return nil, fmt.Errorf("update pinned link: %w", err)
			}
			d.log.Info("adopted pinned link", "link", name, "cgroup", d.cgroup)
			return old, nil
		}
		// Attached elsewhere (the cgroup flag changed): move it.
		d.log.Info("replacing pinned link on another cgroup", "link", name)
		dropLink(old)
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("load pinned link: %w", err)
	}
	l, err := link.AttachCgroup(link.CgroupOptions{Path: d.cgroup, Attach: attach, Program: prog})
	if err != nil {
		return nil, err
	}
	if err := l.Pin(pin); err != nil {
		l.Close()
		return nil, fmt.Errorf("pin: %w", err)
	}
	return l, nil
}

// skMsg attaches (or adopts) sk_msg on local_socks when the fast path is on, and
// detaches it and empties local_socks when it is off.
func (d *Datapath) skMsg() error {
	pin := d.linkPin(linkSkMsg)
	old, err := link.LoadPinnedLink(pin, nil)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("load pinned sk_msg link: %w", err)
	}
	if !d.cfg.FastPath {
		if old != nil {
			dropLink(old)
			d.log.Info("fast path off: detached sk_msg")
		}
		return d.flushLocalSocks()
	}
	if old != nil {
		if err := old.Update(d.objs.FerrySkMsg); err == nil {
			d.links[linkSkMsg] = old
			return nil
		}
		dropLink(old)
	}
	// A bpf_link for sk_msg (Linux 6.10+) can be pinned and updated like the others.
	l, err := link.AttachRawLink(link.RawLinkOptions{
		Target: d.objs.LocalSocks.FD(), Program: d.objs.FerrySkMsg, Attach: ebpf.AttachSkMsgVerdict,
	})
	if err != nil {
		return fmt.Errorf("attach sk_msg: %w", err)
	}
	if err := l.Pin(pin); err != nil {
		l.Close()
		return fmt.Errorf("pin sk_msg link: %w", err)
	}
	d.links[linkSkMsg] = l
	return nil
}

func (d *Datapath) flushLocalSocks() error {
	var keys []bpf.SockKey
	var k bpf.SockKey
	var v uint64
	for _, m := range []*ebpf.Map{d.objs.LocalSocks, d.objs.LocalSockAddrs} {
		keys = keys[:0]
		it := m.Iterate()
		for it.Next(&k, &v) {
			keys = append(keys, k)
		}
		for i := range keys {
			m.Delete(&keys[i])
		}
	}
	return nil
}

// adoptSkLookup takes over the pinned sk_lookup links: those of enrolled namespaces
// get the new program, the others (and those whose namespace is gone) are removed.
func (d *Datapath) adoptSkLookup(ctx context.Context) error {
	enrolled, err := d.objs.Enrolled()
	if err != nil {
		return err
	}
	entries, err := os.ReadDir(filepath.Join(d.cfg.PinDir, linksDir))
	if err != nil {
		return fmt.Errorf("read links folder: %w", err)
	}
	for _, e := range entries {
		cookie, ok := skLookupCookie(e.Name())
		if !ok {
			continue
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		pin := d.linkPin(e.Name())
		l, err := link.LoadPinnedLink(pin, nil)
		if err != nil {
			d.log.Warn("dropping unreadable sk_lookup pin", "netns_cookie", cookie, "error", err)
			os.Remove(pin)
			continue
		}
		if _, ok := enrolled[cookie]; !ok {
			d.log.Info("removing sk_lookup of a namespace no longer enrolled", "netns_cookie", cookie)
			dropLink(l)
			continue
		}
		if err := l.Update(d.objs.FerrySkLookup); err != nil {
			// The namespace is gone (its link is defunct): forget it.
			d.log.Info("removing sk_lookup of a namespace that is gone", "netns_cookie", cookie,
				"pod", enrolled[cookie], "error", err)
			dropLink(l)
			d.objs.Unenroll(cookie)
			continue
		}
		d.skLookup[cookie] = l
	}
	return nil
}

func skLookupCookie(name string) (uint64, bool) {
	s, ok := strings.CutPrefix(name, skLookupPrefix)
	if !ok {
		return 0, false
	}
	c, err := strconv.ParseUint(s, 10, 64)
	return c, err == nil
}

// dropLink unpins and detaches a link, then closes it.
func dropLink(l link.Link) {
	l.Unpin()
	l.Detach() // may be unsupported for some types; closing the last fd detaches then
	l.Close()
}

// Stop releases the data path's file descriptors. Pins stay, so traffic keeps being
// captured until the next Start adopts them or Cleanup removes them.
func (d *Datapath) Stop(context.Context) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.stopLocked()
}

func (d *Datapath) stopLocked() error {
	var errs []error
	for name, l := range d.links {
		errs = append(errs, l.Close())
		delete(d.links, name)
	}
	for c, l := range d.skLookup {
		errs = append(errs, l.Close())
		delete(d.skLookup, c)
	}
	if d.objs != nil {
		errs = append(errs, d.objs.Close())
		d.objs = nil
	}
	// Last: the next agent may adopt the pins once this one holds nothing.
	if d.startLocked {
		errs = append(errs, d.lock.Unlock())
		d.lock, d.startLocked = nil, false
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("close datapath: %w", err)
	}
	return nil
}

func (d *Datapath) started() error {
	if d.objs == nil {
		return errors.New("datapath not started")
	}
	return nil
}

// Enroll starts capturing the pod whose network namespace is h: its netns cookie goes
// into enrolled_netns (outbound) and an sk_lookup program is attached to the
// namespace and pinned (inbound). Enrolling again is harmless. It returns the cookie
// and whether the namespace was enrolled already (by a previous run): a caller whose
// later step fails must leave such a pod captured, not release what it did not add.
func (d *Datapath) Enroll(h *netns.Handle, pod string) (cookie uint64, adopted bool, err error) {
	cookie, err = h.Cookie()
	if err != nil {
		return 0, false, fmt.Errorf("enroll %s: %w", pod, err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.started(); err != nil {
		return 0, false, err
	}
	pinned, err := d.objs.Enrolled()
	if err != nil {
		return 0, false, fmt.Errorf("enroll %s: %w", pod, err)
	}
	_, adopted = pinned[cookie]
	if err := d.objs.Enroll(cookie, pod); err != nil {
		return 0, false, err
	}
	if _, ok := d.skLookup[cookie]; ok {
		return cookie, adopted, nil
	}
	l, err := d.attachSkLookup(h, cookie)
	if err != nil {
		if !adopted { // only this call's entry goes; a pinned one keeps the pod captured
			d.objs.Unenroll(cookie)
		}
		return 0, false, fmt.Errorf("enroll %s: %w", pod, err)
	}
	d.skLookup[cookie] = l
	d.log.Info("enrolled", "pod", pod, "netns_cookie", cookie, "adopted", adopted)
	return cookie, adopted, nil
}

func (d *Datapath) attachSkLookup(h *netns.Handle, cookie uint64) (link.Link, error) {
	pin := d.linkPin(skLookupPrefix + strconv.FormatUint(cookie, 10))
	if old, err := link.LoadPinnedLink(pin, nil); err == nil {
		if err := old.Update(d.objs.FerrySkLookup); err == nil {
			return old, nil
		}
		dropLink(old)
	}
	l, err := link.AttachNetNs(h.FD(), d.objs.FerrySkLookup)
	if err != nil {
		return nil, fmt.Errorf("attach sk_lookup: %w", err)
	}
	if err := l.Pin(pin); err != nil {
		l.Close()
		return nil, fmt.Errorf("pin sk_lookup: %w", err)
	}
	return l, nil
}

// Unenroll stops capturing the namespace with this cookie: it leaves enrolled_netns
// and its sk_lookup link is detached and unpinned.
func (d *Datapath) Unenroll(cookie uint64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.started(); err != nil {
		return err
	}
	err := d.objs.Unenroll(cookie)
	if l, ok := d.skLookup[cookie]; ok {
		dropLink(l)
		delete(d.skLookup, cookie)
	} else if l, lerr := link.LoadPinnedLink(d.linkPin(skLookupPrefix+strconv.FormatUint(cookie, 10)), nil); lerr == nil {
		dropLink(l)
	}
	if err == nil {
		d.log.Info("unenrolled", "netns_cookie", cookie)
	}
	return err
}

// Enrolled returns the enrolled namespaces (netns cookie → pod), including those
// adopted from pins, so the agent can unenroll what it no longer needs.
func (d *Datapath) Enrolled() (map[uint64]string, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.started(); err != nil {
		return nil, err
	}
	return d.objs.Enrolled()
}

// SetInboundListener registers a pod's 15006 listener for sk_lookup under the pod's
// IP. The listener must have Multipath TCP off (net.ListenConfig.SetMultipathTCP(false)):
// an MPTCP socket cannot enter a sockhash. It leaves the map when closed.
func (d *Datapath) SetInboundListener(podIP netip.Addr, ln syscall.Conn) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.started(); err != nil {
		return err
	}
	raw, err := ln.SyscallConn()
	if err != nil {
		return fmt.Errorf("inbound listener for %s: %w", podIP, err)
	}
	var setErr error
	if err := raw.Control(func(fd uintptr) { setErr = d.objs.SetInboundListener(podIP, int(fd)) }); err != nil {
		return fmt.Errorf("inbound listener for %s: %w", podIP, err)
	}
	if errors.Is(setErr, unix.EOPNOTSUPP) {
		if proto, err := socketProtocol(raw); err == nil && proto == unix.IPPROTO_MPTCP {
			return fmt.Errorf("%w (the listener is Multipath TCP: open it with ListenConfig.SetMultipathTCP(false))", setErr)
		}
	}
	return setErr
}

func socketProtocol(raw syscall.RawConn) (int, error) {
	var proto int
	var serr error
	err := raw.Control(func(fd uintptr) { proto, serr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PROTOCOL) })
	return proto, errors.Join(err, serr)
}

// OrigDst returns, and forgets, the original destination of a captured connection,
// identified by the netns cookie of the namespace it came from and its client port
// (the accepted socket's remote port). It wraps bpf.ErrNoOrigDst when none is known.
func (d *Datapath) OrigDst(netnsCookie uint64, clientPort uint16) (netip.AddrPort, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.started(); err != nil {
		return netip.AddrPort{}, err
	}
	return d.objs.TakeOrigDst(netnsCookie, clientPort)
}

// SetExcludedPorts replaces the destination ports that are never captured.
func (d *Datapath) SetExcludedPorts(ports []uint16) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.started(); err != nil {
		return err
	}
	if err := d.objs.SetExcludedPorts(ports); err != nil {
		return err
	}
	d.cfg.ExcludedPorts = append([]uint16(nil), ports...)
	return nil
}

// Cleanup removes everything Ferry put in the kernel: it detaches and unpins the
// links under pinDir (cgroup, sk_msg, sk_lookup), detaches any other Ferry program
// link still on cgroupPath ("" = the cgroup v2 root), and removes the map pins and
// the pin folder. Stop the agent first: Cleanup takes the pin folder's lock, and
// refuses while an agent holds it rather than uncapture a running agent's pods. A
// missing pin folder is not an error.
func Cleanup(pinDir, cgroupPath string) error {
	if pinDir == "" {
		pinDir = DefaultPinDir
	}
	if _, err := os.Stat(pinDir); err == nil {
		lock, err := lockForCleanup(pinDir)
		if err != nil {
			return fmt.Errorf("cleanup: %w (stop the agent first)", err)
		}
		defer lock.Unlock()
	}
	var errs []error
	linkDir := filepath.Join(pinDir, linksDir)
	entries, err := os.ReadDir(linkDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("read links folder: %w", err))
	}
	for _, e := range entries {
		pin := filepath.Join(linkDir, e.Name())
		l, err := link.LoadPinnedLink(pin, nil)
		if err != nil {
			errs = append(errs, fmt.Errorf("load pinned link %s: %w", e.Name(), err))
			continue
		}
		dropLink(l)
	}
	if err := os.Remove(linkDir); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("remove links folder: %w", err))
	}
	if err := detachCgroupLinks(cgroupPath); err != nil {
		errs = append(errs, err)
	}
	for _, name := range bpf.MapNames() {
		if err := os.Remove(filepath.Join(pinDir, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("unpin map %s: %w", name, err))
		}
	}
	if err := os.Remove(pinDir); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("remove pin folder: %w", err))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("cleanup: %w", err)
	}
	return nil
}

// lockForCleanup locks the pin folder, waiting a moment for an agent that was just
// killed: the kernel drops its lock as the process ends, not as the signal is sent.
func lockForCleanup(pinDir string) (*Lock, error) {
	deadline := time.Now().Add(2 * time.Second)
	for {
		lock, err := LockDir(pinDir)
		if err == nil || !errors.Is(err, ErrLocked) || time.Now().After(deadline) {
			return lock, err
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// detachCgroupLinks detaches links on the cgroup whose program is one of Ferry's,
// for links whose pins were lost.
func detachCgroupLinks(cgroupPath string) error {
	cgroupPath, err := ResolveCgroup(cgroupPath)
	if err != nil {
		return err
	}
	id, err := cgroupID(cgroupPath)
	if err != nil {
		return err
	}
	var it link.Iterator
	defer it.Close()
	for it.Next() {
		info, err := it.Link.Info()
		if err != nil || info.Cgroup() == nil || info.Cgroup().CgroupId != id {
			continue
		}
		if isFerryProgram(info.Program) {
			it.Link.Detach()
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("list links: %w", err)
	}
	return nil
}

func isFerryProgram(id ebpf.ProgramID) bool {
	p, err := ebpf.NewProgramFromID(id)
	if err != nil {
		return false
	}
	defer p.Close()
	info, err := p.Info()
	return err == nil && strings.HasPrefix(info.Name, "ferry_")
}

// SetStrictPorts replaces the mTLS modes sk_lookup enforces (strict_ports): with
// STRICT on a pod port, plaintext to it is refused before any socket sees it. A set
// that does not fit fails with bpf.ErrStrictFull and changes nothing. The entries
// are pinned: they hold while no agent runs, until the next agent changes them.
//
// The node's own addresses (node_addrs) are written first, read afresh each time:
// plaintext from the node (kubelet's probes) passes STRICT, as in Istio and
// Linkerd, or no pod with a probe on a STRICT port would ever be Ready. Each new
// pod brings a new state and so a call here, after its CNI plugin gave the node
// any new address (a bridge's, made with the first pod).
func (d *Datapath) SetStrictPorts(ps []bpf.StrictPort) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.started(); err != nil {
		return err
	}
	addrs, err := nodeAddrs()
	if err == nil {
		err = d.objs.SetNodeAddrs(addrs)
	}
	if err != nil {
		// STRICT still holds: only probes from the node are refused with it.
		d.log.Warn("node addresses for STRICT's probe exemption", "error", err)
	}
	return d.objs.SetStrictPorts(ps)
}

// nodeAddrs are the addresses of the agent's network namespace, the node's (the
// agent runs with hostNetwork), but loopback (always let through) and IPv6
// link-local ones (one per pod veth on some CNIs; never a probe's source).
func nodeAddrs() ([]netip.Addr, error) {
	ifAddrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil, err
	}
	var out []netip.Addr
	for _, a := range ifAddrs {
		p, err := netip.ParsePrefix(a.String())
		if err != nil {
			continue
		}
		if ip := p.Addr().Unmap(); !ip.IsLoopback() && !ip.IsLinkLocalUnicast() {
			out = append(out, ip)
		}
	}
	return out, nil
}

// StrictPorts returns the mTLS modes in strict_ports.
func (d *Datapath) StrictPorts() ([]bpf.StrictPort, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.started(); err != nil {
		return nil, err
	}
	return d.objs.StrictPortEntries()
}
