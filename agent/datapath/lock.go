// The node lock: one agent at a time may own a node's pins and state folder. A
// second agent (a DaemonSet surge, a mistake) that adopted the pins of a running one
// would unenroll its pods and remove its sockets; the lock makes it stop before it
// touches anything.

package datapath

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// ErrLocked is wrapped by the error of a lock another live process holds.
var ErrLocked = errors.New("held by another agent")

// Lock is an exclusive flock(2) on a file or a folder. The kernel drops it when the
// last descriptor closes, so a crashed agent never leaves it held.
type Lock struct {
	path string
	f    *os.File
}

// LockFile takes the lock on the file at path, creating it (and its folder) if
// needed, and writes this process's pid into it for the next one to name. If a live
// process holds it, LockFile changes nothing and returns an error naming that pid.
func LockFile(path string) (*Lock, error) {
	// Open before creating anything: a held lock's file exists already, and then
	// neither the folder nor the file may change.
	f, err := os.OpenFile(path, os.O_RDWR|unix.O_CLOEXEC, 0)
	if errors.Is(err, os.ErrNotExist) {
		if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		f, err = os.OpenFile(path, os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC, 0o600)
	}
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	if err := flock(f); err != nil {
		err = lockedError(path, f, err)
		f.Close()
		return nil, err
	}
	// Ours now: the pid of a previous holder (which has exited) is replaced.
	if err := f.Truncate(0); err == nil {
		_, err = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: write pid: %w", path, err)
	}
	return &Lock{path: path, f: f}, nil
}

// LockDir takes the lock on the folder at dir, which must exist: bpffs holds no
// regular files, so the pin folder itself is locked. The holder's pid comes from
// /proc/locks.
func LockDir(dir string) (*Lock, error) {
	f, err := os.OpenFile(dir, os.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", dir, err)
	}
	if err := flock(f); err != nil {
		err = lockedError(dir, f, err)
		f.Close()
		return nil, err
	}
	return &Lock{path: dir, f: f}, nil
}

func flock(f *os.File) error {
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if !errors.Is(err, unix.EINTR) {
			return err
		}
	}
}

func lockedError(path string, f *os.File, err error) error {
	if !errors.Is(err, unix.EWOULDBLOCK) {
		return fmt.Errorf("lock %s: %w", path, err)
	}
	return fmt.Errorf("lock %s is %w for this node: %s", path, ErrLocked, lockHolder(f))
}

// lockHolder names the process holding a flock on f's inode: the pid /proc/locks
// lists, with its command name; else (the holder is in a pid namespace this one
// cannot see) the pid a lock file holds, as the holder saw it.
func lockHolder(f *os.File) string {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return "a process this one cannot see"
	}
	if pid := procLocksHolder(st.Dev, st.Ino); pid > 0 {
		if cmd := processName(pid); cmd != "" {
			return fmt.Sprintf("pid %d (%s)", pid, cmd)
		}
		return fmt.Sprintf("pid %d", pid)
	}
	if st.Mode&unix.S_IFMT == unix.S_IFREG {
		b := make([]byte, 32)
		n, _ := f.ReadAt(b, 0)
		if pid, err := strconv.Atoi(strings.TrimSpace(string(b[:n]))); err == nil {
			return fmt.Sprintf("pid %d (in its own pid namespace, from the lock file)", pid)
		}
	}
	return "a process this one cannot see"
}

// procLocksHolder finds the FLOCK on the inode (dev, ino) in /proc/locks, whose lines
// read "1: FLOCK  ADVISORY  WRITE 4242 00:1d:1234 0 EOF" (major and minor in hex).
func procLocksHolder(dev, ino uint64) int {
	f, err := os.Open("/proc/locks")
	if err != nil {
		return 0
	}
	defer f.Close()
	want := fmt.Sprintf("%02x:%02x:%d", unix.Major(dev), unix.Minor(dev), ino)
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		// A waiter's line starts with "->"; only the holder counts.
		if len(fs) < 6 || fs[1] != "FLOCK" || fs[5] != want {
			continue
		}
		if pid, err := strconv.Atoi(fs[4]); err == nil {
			return pid
		}
	}
	return 0
}

func processName(pid int) string {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "comm"))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// Path is the locked file or folder.
func (l *Lock) Path() string { return l.path }

// Unlock releases the lock. The lock file stays: removing it would let a process
// that opened it just before lock a file no one else can find.
func (l *Lock) Unlock() error {
	if l == nil || l.f == nil {
		return nil
	}
	err := l.f.Close()
	l.f = nil
	if err != nil {
		return fmt.Errorf("unlock %s: %w", l.path, err)
	}
	return nil
}

// File is the locked file's descriptor, for passing to the agent that takes over
// (agent/handoff): the flock belongs to the open file description, which the copy
// shares, so it stays held while either process has it open.
func (l *Lock) File() *os.File { return l.f }

// AdoptLock makes a Lock of f, a descriptor of path received from the agent that
// held the lock: f must be the file or folder at path and hold its flock (taking
// it again on the same open file description succeeds; another holder's does not).
func AdoptLock(path string, f *os.File) (*Lock, error) {
	var want, got unix.Stat_t
	if err := unix.Stat(path, &want); err != nil {
		return nil, fmt.Errorf("adopt lock %s: %w", path, err)
	}
	if err := unix.Fstat(int(f.Fd()), &got); err != nil {
		return nil, fmt.Errorf("adopt lock %s: %w", path, err)
	}
	if want.Dev != got.Dev || want.Ino != got.Ino {
		return nil, fmt.Errorf("adopt lock %s: the descriptor passed is another file", path)
	}
	if err := flock(f); err != nil {
		return nil, lockedError(path, f, err)
	}
	return &Lock{path: path, f: f}, nil
}

// WritePID writes this process's pid into a lock file, for the next agent to name
// (the agent that took the lock over from another writes its own).
func (l *Lock) WritePID() error {
	if st, err := l.f.Stat(); err != nil || !st.Mode().IsRegular() {
		return nil // a folder's lock: /proc/locks names the holder
	}
	if err := l.f.Truncate(0); err != nil {
		return fmt.Errorf("lock %s: write pid: %w", l.path, err)
	}
	if _, err := l.f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0); err != nil {
		return fmt.Errorf("lock %s: write pid: %w", l.path, err)
	}
	return nil
}

// PinLock is the pin folder's lock while the data path holds it (nil otherwise),
// for a listener handoff.
func (d *Datapath) PinLock() *Lock {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.lock
}

// AdoptPinLock makes the data path hold l, the pin folder's lock a previous agent
// handed over (AdoptLock), instead of taking it: Lock then has nothing to do.
func (d *Datapath) AdoptPinLock(l *Lock) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.lock != nil {
		return errors.New("adopt pin lock: the data path holds one already")
	}
	if filepath.Clean(l.path) != filepath.Clean(d.cfg.PinDir) {
		return fmt.Errorf("adopt pin lock: lock of %s, the pin folder is %s", l.path, d.cfg.PinDir)
	}
	d.lock = l
	return nil
}

// PinLock is the data path's (the eBPF programs load in both modes).
func (c *IPTables) PinLock() *Lock { return c.dp.PinLock() }

// AdoptPinLock is the data path's.
func (c *IPTables) AdoptPinLock(l *Lock) error { return c.dp.AdoptPinLock(l) }
