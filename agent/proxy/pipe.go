package proxy

import (
	"errors"
	"io"
	"net"
	"sync"
)

// halfCloser is a connection whose write side can be shut while it still reads:
// *net.TCPConn and tunnel streams both are.
type halfCloser interface {
	io.ReadWriteCloser
	CloseWrite() error
}

var bufPool = sync.Pool{New: func() any { b := make([]byte, 64<<10); return &b }}

// pipe copies a→b and b→a until both directions end, propagating half-close: when
// one side's reader hits EOF the other side's writer is shut, so a client that
// closes its write side still reads the whole reply. It returns the bytes copied each
// way and the first error that was not an orderly end. If one side fails, both are
// closed so the other direction cannot hang.
//
// With splice false every copy goes through a pooled buffer: sockets in Ferry's
// sockhash (the fast path) can read 0 bytes through splice(2), which looks like EOF.
func pipe(a, b halfCloser, splice bool) (aToB, bToA int64, err error) {
	var wg sync.WaitGroup
	var errAB error
	wg.Add(1)
	go func() {
		defer wg.Done()
		aToB, errAB = copyHalf(b, a, splice)
		if errAB != nil {
			abort(a, b)
		}
	}()
	var errBA error
	bToA, errBA = copyHalf(a, b, splice)
	if errBA != nil {
		abort(a, b)
	}
	wg.Wait()
	a.Close()
	b.Close()
	return aToB, bToA, errors.Join(errAB, errBA)
}

// copyHalf copies src to dst until EOF, then shuts dst's write side.
func copyHalf(dst, src halfCloser, splice bool) (int64, error) {
	var n int64
	var err error
	if splice {
		n, err = io.Copy(dst, src)
	} else {
		bp := bufPool.Get().(*[]byte)
		n, err = io.CopyBuffer(writerOnly{dst}, readerOnly{src}, *bp)
		bufPool.Put(bp)
	}
	if err != nil {
		return n, err
	}
	if err := dst.CloseWrite(); err != nil && !errors.Is(err, net.ErrClosed) {
		return n, err
	}
	return n, nil
}

// abort ends both connections at once, with a reset where the socket allows it,
// so the peer sees a failure rather than a clean end of stream.
func abort(conns ...io.Closer) {
	for _, c := range conns {
		if tc, ok := c.(*net.TCPConn); ok {
			tc.SetLinger(0)
		}
		c.Close()
	}
}

// readerOnly and writerOnly hide ReadFrom/WriteTo so io.CopyBuffer uses the buffer
// instead of splice.
type readerOnly struct{ io.Reader }
type writerOnly struct{ io.Writer }
