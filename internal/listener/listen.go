// Package listener opens every listener Ferry serves on, with Multipath TCP off.
package listener

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// Config returns the ListenConfig every Ferry listener uses.
//
// Go 1.24+ listeners use Multipath TCP by default where the kernel has it. An MPTCP
// socket cannot be put in a sockmap or sockhash (EOPNOTSUPP), so sk_lookup steering
// into it and the sockmap fast path would fail silently. Every listener Ferry opens
// therefore turns MPTCP off, including those that are never steered (one rule, no
// exceptions to remember).
func Config() net.ListenConfig {
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	return lc
}

// TCP listens on the TCP address host:port with MPTCP off; when ctx carries
// inherited listeners (WithInherited) with one on address, that one is returned.
func TCP(ctx context.Context, address string) (net.Listener, error) {
	if ln, ok := takeTCP(ctx, address); ok {
		return ln, nil
	}
	lc := Config()
	return lc.Listen(ctx, "tcp", address)
}

// Unix listens on the unix socket path, first removing a socket file a killed
// process left there (or a previous agent handing over) and creating its folder.
// Closing the listener removes the socket file only while it is still the one this
// listener bound: a successor's socket at the same path is left alone.
func Unix(ctx context.Context, path string) (net.Listener, error) {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, err
	}
	lc := Config()
	ln, err := lc.Listen(ctx, "unix", path)
	if err != nil {
		return nil, err
	}
	ul := ln.(*net.UnixListener)
	ul.SetUnlinkOnClose(false)
	fi, err := os.Lstat(path)
	if err != nil {
		ul.Close()
		return nil, err
	}
	return &unixListener{UnixListener: ul, path: path, fi: fi}, nil
}

// unixListener removes its socket file on Close if the file is still its own.
type unixListener struct {
	*net.UnixListener
	path string
	fi   os.FileInfo
}

func (l *unixListener) Close() error {
	err := l.UnixListener.Close()
	if fi, serr := os.Lstat(l.path); serr == nil && SameFile(fi, l.fi) {
		os.Remove(l.path)
	}
	return err
}

// SameFile says whether a and b, two Lstats of a socket's path, are the same file:
// the same inode and the same modification time (set when the socket is made; a
// chmod leaves it). The inode alone would not do: ext4 (a
// /run that is not tmpfs) gives a socket file made after another was removed that
// one's inode number, and a draining agent closing its listener would then remove
// its successor's socket.
func SameFile(a, b os.FileInfo) bool {
	if !os.SameFile(a, b) {
		return false
	}
	sa, ok1 := a.Sys().(*syscall.Stat_t)
	sb, ok2 := b.Sys().(*syscall.Stat_t)
	return ok1 && ok2 && sa.Mtim == sb.Mtim
}

// Addr listens on addr, which is host:port or unix:///path.
func Addr(ctx context.Context, addr string) (net.Listener, error) {
	var (
		l   net.Listener
		err error
	)
	if path, ok := strings.CutPrefix(addr, "unix://"); ok {
		l, err = Unix(ctx, path)
	} else {
		l, err = TCP(ctx, addr)
	}
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", addr, err)
	}
	return l, nil
}
