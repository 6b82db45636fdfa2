// Package pipe moves bytes between two connections: the one copy loop and buffer pool
// that the node proxy (app ↔ upstream) and the tunnel server (HTTP/2 stream ↔ app)
// share.
//
// Sockets in Ferry's sockhash (the fast path) can read 0 bytes through splice(2),
// which looks like EOF (docs/datapath.md), so only a caller that knows neither side
// is in the sockhash may ask Join to splice; Copy never does.
package pipe

import (
	"errors"
	"io"
	"net"
	"sync"

	"github.com/ferrymesh/ferry/internal/rawsock"
)

// BufSize, the size of each pooled copy buffer (a copy holds one per direction), is
// large enough to fill TLS records and HTTP/2 frames in few calls, small enough to
// pool freely.
const BufSize = 64 << 10

// bufs holds copy buffers (pointers to slices, so Put does not allocate). A sync.Pool
// is a cache, not state: what it holds never changes what a copy does.
var bufs = sync.Pool{New: func() any { b := make([]byte, BufSize); return &b }}

// HalfCloser is a connection whose write side can be shut while it still reads:
// *net.TCPConn and tunnel streams both are.
type HalfCloser interface {
	io.ReadWriteCloser
	CloseWrite() error
}

// Copy copies src to dst through a pooled buffer until src reports EOF (err nil) or an
// error; it never splices. flush, if set, runs after every write: an HTTP/2 response
// flushes there so bytes leave at once instead of waiting for a buffer to fill.
// io.Copy is avoided because a TCP destination would fall back to a fresh 32 KiB
// buffer per call (ReadFrom) or to splice.
func Copy(dst io.Writer, src io.Reader, flush func() error) (int64, error) {
	if wt, ok := src.(io.WriterTo); ok && flush == nil {
		if _, tcp := src.(*net.TCPConn); !tcp { // its WriteTo may splice
			// A tunnel stream writes to dst itself, without a buffer of ours.
			return wt.WriteTo(dst)
		}
	}
	// The sockets' own reads and writes go through raw system calls (rawsock);
	// a wrapper of a socket (TLS, a tunnel stream) keeps its own.
	if tc, ok := src.(*net.TCPConn); ok {
		if r, err := rawsock.NewReader(tc); err == nil {
			src = r
		}
	}
	if tc, ok := dst.(*net.TCPConn); ok {
		if w, err := rawsock.NewWriter(tc); err == nil {
			dst = w
		}
	}
	bp := bufs.Get().(*[]byte)
	defer bufs.Put(bp)
	buf := *bp
	var n int64
	for {
		nr, rerr := src.Read(buf)
		if nr > 0 {
			nw, werr := dst.Write(buf[:nr])
			n += int64(nw)
			if werr == nil && nw != nr {
				werr = io.ErrShortWrite
			}
			if werr == nil && flush != nil {
				werr = flush()
			}
			if werr != nil {
				return n, werr
			}
		}
		if rerr == io.EOF {
			return n, nil
		}
		if rerr != nil {
			return n, rerr
		}
	}
}

// Join copies a→b and b→a until both directions end, propagating half-close: when
// one side's reader hits EOF the other side's writer is shut, so a client that
// closes its write side still reads the whole reply. It returns the bytes copied each
// way and the first error that was not an orderly end. If one side fails, both are
// aborted so the other direction cannot hang; both are closed on return.
//
// With splice true, two *net.TCPConn copy with splice(2) (io.Copy); otherwise, or for
// any other connection, every copy goes through Copy's pooled buffer.
func Join(a, b HalfCloser, splice bool) (aToB, bToA int64, err error) {
	var wg sync.WaitGroup
	var errAB error
	wg.Add(1)
	go func() {
		defer wg.Done()
		aToB, errAB = half(b, a, splice)
		if errAB != nil {
			Abort(a, b)
		}
	}()
	var errBA error
	bToA, errBA = half(a, b, splice)
	if errBA != nil {
		Abort(a, b)
	}
	wg.Wait()
	a.Close()
	b.Close()
	return aToB, bToA, errors.Join(errAB, errBA)
}

// half copies src to dst until EOF, then shuts dst's write side.
func half(dst, src HalfCloser, splice bool) (int64, error) {
	var n int64
	var err error
	_, dtcp := dst.(*net.TCPConn)
	_, stcp := src.(*net.TCPConn)
	if splice && dtcp && stcp {
		n, err = io.Copy(dst, src)
	} else {
		n, err = Copy(dst, src, nil)
	}
	if err != nil {
		return n, err
	}
	if err := dst.CloseWrite(); err != nil && !errors.Is(err, net.ErrClosed) {
		return n, err
	}
	return n, nil
}

// Abort ends the connections at once, with a reset where the socket allows it, so
// the peer sees a failure rather than a clean end of stream.
func Abort(conns ...io.Closer) {
	for _, c := range conns {
		if tc, ok := c.(*net.TCPConn); ok {
			tc.SetLinger(0)
		}
		c.Close()
	}
}
