package tunnel

import (
	"io"
	"sync"
)

// bufSize is the copy buffer: large enough to fill TLS records and HTTP/2 frames in few
// calls, small enough to pool freely.
const bufSize = 32 << 10

// bufPool holds copy buffers; pointers to slices, so Put does not allocate.
var bufPool = sync.Pool{New: func() any { b := make([]byte, bufSize); return &b }}

type copyResult struct {
	n   int64
	err error
}

// copyBuf copies src to dst through a pooled buffer until src reports EOF (err nil) or an
// error. after, if set, runs after every write: the HTTP/2 side flushes there so bytes
// leave at once instead of waiting for a buffer to fill. io.Copy is avoided because a
// TCP destination would fall back to a fresh 32 KiB buffer per call (ReadFrom), and
// splice does not apply to an HTTP/2 stream.
func copyBuf(dst io.Writer, src io.Reader, after func() error) copyResult {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
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
			if werr == nil && after != nil {
				werr = after()
			}
			if werr != nil {
				return copyResult{n, werr}
			}
		}
		if rerr == io.EOF {
			return copyResult{n, nil}
		}
		if rerr != nil {
			return copyResult{n, rerr}
		}
	}
}
