// Package rawsock reads and writes TCP sockets with raw system calls, for the
// proxy's hot paths.
//
// Go's own net.Conn Read and Write enter each read(2) and write(2) through the
// runtime's syscall entry, which wakes the runtime's monitor thread (sysmon)
// whenever it sleeps because every P was idle. At a moderate request rate a proxy
// is idle between messages, so every message woke sysmon, which then polled every
// 20 µs for a millisecond: at 1,000 req/s across nodes that was a fifth of each
// agent's CPU (docs/benchmarks.md, "Raw socket calls"). A socket of package net
// never blocks (it is non-blocking; a call that would block returns EAGAIN and
// the goroutine waits in the netpoller instead), so a raw system call, which
// skips that entry, is safe on it and costs only the call.
package rawsock

import (
	"io"
	"net"
	"os"
	"syscall"
	"unsafe"
)

// Reader reads a socket with raw read(2) calls; one goroutine at a time.
type Reader struct {
	rc    syscall.RawConn
	b     []byte
	n     int
	errno syscall.Errno
	fn    func(uintptr) bool // r.read, bound once: a call allocates nothing
}

// NewReader reads c, which must be a socket of package net (non-blocking).
func NewReader(c syscall.Conn) (*Reader, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	r := &Reader{rc: rc}
	r.fn = r.read
	return r, nil
}

func (r *Reader) read(fd uintptr) bool {
	for {
		n, _, e := syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(unsafe.SliceData(r.b))), uintptr(len(r.b)))
		switch e {
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return false // wait in the netpoller, then again
		}
		r.n, r.errno = int(n), e
		return true
	}
}

// Read reads as net.Conn's Read does: io.EOF at the end, the deadline's and a
// closed connection's errors as package net gives them.
func (r *Reader) Read(b []byte) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	r.b = b
	err := r.rc.Read(r.fn)
	r.b = nil
	switch {
	case err != nil:
		return 0, err
	case r.errno != 0:
		return 0, os.NewSyscallError("read", r.errno)
	case r.n == 0:
		return 0, io.EOF
	}
	return r.n, nil
}

// Writer writes a socket with raw write(2) calls; one goroutine at a time.
type Writer struct {
	rc    syscall.RawConn
	b     []byte
	n     int
	errno syscall.Errno
	fn    func(uintptr) bool
	once  bool // try once, never wait (TryWrite)
}

// NewWriter writes c, which must be a socket of package net (non-blocking).
func NewWriter(c syscall.Conn) (*Writer, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	w := &Writer{rc: rc}
	w.fn = w.write
	return w, nil
}

func (w *Writer) write(fd uintptr) bool {
	for len(w.b) > 0 {
		n, _, e := syscall.RawSyscall(syscall.SYS_WRITE, fd, uintptr(unsafe.Pointer(unsafe.SliceData(w.b))), uintptr(len(w.b)))
		switch e {
		case 0:
			w.n += int(n)
			w.b = w.b[n:]
		case syscall.EINTR:
		case syscall.EAGAIN:
			return w.once // wait for room in the send buffer, then on
		default:
			w.errno = e
			return true
		}
	}
	return true
}

// Write writes all of b, waiting for room in the socket's send buffer as
// net.Conn's Write does.
func (w *Writer) Write(b []byte) (int, error) {
	w.once = false
	return w.run(b)
}

// TryWrite writes what the socket takes of b without waiting.
func (w *Writer) TryWrite(b []byte) (int, error) {
	w.once = true
	return w.run(b)
}

func (w *Writer) run(b []byte) (int, error) {
	w.b, w.n, w.errno = b, 0, 0
	err := w.rc.Write(w.fn)
	n := w.n
	w.b = nil
	if err == nil && w.errno != 0 {
		err = os.NewSyscallError("write", w.errno)
	}
	return n, err
}

// Conn is a connection whose Read and Write are raw when it is a socket of
// package net; everything else is the connection's own.
type Conn struct {
	net.Conn
	r io.Reader
	w io.Writer
}

// Wrap gives c raw reads and writes; a connection that is not a socket keeps its
// own (Wrap returns it as it is).
func Wrap(c net.Conn) net.Conn {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return c
	}
	r, err := NewReader(sc)
	if err != nil {
		return c
	}
	w, err := NewWriter(sc)
	if err != nil {
		return c
	}
	return &Conn{Conn: c, r: r, w: w}
}

func (c *Conn) Read(b []byte) (int, error)  { return c.r.Read(b) }
func (c *Conn) Write(b []byte) (int, error) { return c.w.Write(b) }
