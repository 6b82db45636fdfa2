// This file hands a stream of HTTP requests to the destination node's proxy as a
// connection of its own (ServerConfig.ServeHTTP).

package tunnel

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// serveHTTP answers the CONNECT, gives the stream to ServeHTTP and holds the stream
// open until the proxy closes it or the peer resets it.
func (s *Server) serveHTTP(w http.ResponseWriter, r *http.Request, info *StreamInfo, ci *connInfo) {
	info.Status = http.StatusOK
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	if err := rc.Flush(); err != nil {
		info.Err = fmt.Errorf("flush: %w", err)
		return
	}
	c := newStreamConn(w, r.Body, net.TCPAddrFromAddrPort(info.Target), net.TCPAddrFromAddrPort(ci.remote))
	s.cfg.ServeHTTP(*info, c)
	c.wait(r.Context())
	info.BytesIn, info.BytesOut = c.in.Load(), c.out.Load()
}

// streamConn is one server-side stream as a net.Conn: reads come from the request
// body, writes go out as DATA frames at once.
//
// net/http's server stops a background read between requests by setting a read
// deadline in the past, then clears it and reads on. An HTTP/2 request body's own
// deadline cannot be cleared once it fired (it closes the body), so the deadline is
// kept here: a pump reads the body, and Read waits for the pump or the deadline.
type streamConn struct {
	w             http.ResponseWriter
	body          io.ReadCloser
	rc            *http.ResponseController
	local, remote net.Addr
	in, out       atomic.Int64

	chunks chan chunk    // pump → Read
	more   chan struct{} // Read → pump: the last chunk is used up
	rmu    sync.Mutex    // one Read at a time
	rest   []byte        // what is left of the last chunk
	rerr   error         // the body's end, once reached

	mu       sync.Mutex // writes, closing, and the read deadline
	closed   bool
	deadline time.Time
	wake     chan struct{} // closed when the deadline changes or passes
	timer    *time.Timer
	once     sync.Once
	done     chan struct{}
}

type chunk struct {
	b   []byte
	err error
}

func newStreamConn(w http.ResponseWriter, body io.ReadCloser, local, remote net.Addr) *streamConn {
	c := &streamConn{
		w: w, body: body, rc: http.NewResponseController(w), local: local, remote: remote,
		chunks: make(chan chunk), more: make(chan struct{}), wake: make(chan struct{}), done: make(chan struct{}),
	}
	go c.pump()
	return c
}

// pump reads the body one buffer at a time, handing each to Read; it ends with the
// body or the stream.
func (c *streamConn) pump() {
	buf := make([]byte, 16<<10) // an HTTP/2 DATA frame's default size
	for {
		n, err := c.body.Read(buf)
		select {
		case c.chunks <- chunk{buf[:n], err}:
		case <-c.done:
			return
		}
		if err != nil {
			return
		}
		select {
		case <-c.more:
		case <-c.done:
			return
		}
	}
}

func (c *streamConn) Read(b []byte) (int, error) {
	c.rmu.Lock()
	defer c.rmu.Unlock()
	for len(c.rest) == 0 && c.rerr == nil {
		c.mu.Lock()
		expired, wake := !c.deadline.IsZero() && !time.Now().Before(c.deadline), c.wake
		c.mu.Unlock()
		if expired {
			return 0, os.ErrDeadlineExceeded
		}
		select {
		case ch := <-c.chunks:
			c.rest, c.rerr = ch.b, ch.err
			if len(c.rest) == 0 && c.rerr == nil {
				c.more <- struct{}{}
			}
		case <-wake: // the deadline changed or passed: look again
		case <-c.done:
			return 0, net.ErrClosed
		}
	}
	if len(c.rest) == 0 {
		return 0, c.rerr
	}
	n := copy(b, c.rest)
	c.rest = c.rest[n:]
	if len(c.rest) == 0 && c.rerr == nil {
		c.more <- struct{}{}
	}
	c.in.Add(int64(n))
	return n, nil
}

func (c *streamConn) Write(b []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return 0, net.ErrClosed
	}
	n, err := c.w.Write(b)
	c.out.Add(int64(n))
	if err == nil {
		err = c.rc.Flush()
	}
	return n, err
}

// Close ends the stream (the handler returns: END_STREAM).
func (c *streamConn) Close() error {
	c.once.Do(func() {
		c.body.Close()
		c.mu.Lock()
		c.closed = true
		if c.timer != nil {
			c.timer.Stop()
		}
		c.mu.Unlock()
		close(c.done)
	})
	return nil
}

// wait returns once the stream is closed; a reset (ctx) closes it.
func (c *streamConn) wait(ctx context.Context) {
	select {
	case <-c.done:
	case <-ctx.Done():
		c.Close()
	}
}

func (c *streamConn) LocalAddr() net.Addr  { return c.local }
func (c *streamConn) RemoteAddr() net.Addr { return c.remote }

func (c *streamConn) SetDeadline(t time.Time) error { return c.SetReadDeadline(t) }

// SetReadDeadline wakes a Read in progress, which then honours t.
func (c *streamConn) SetReadDeadline(t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.timer != nil {
		c.timer.Stop()
		c.timer = nil
	}
	c.deadline = t
	close(c.wake)
	c.wake = make(chan struct{})
	if d := time.Until(t); !t.IsZero() && d > 0 {
		wake := c.wake
		c.timer = time.AfterFunc(d, func() {
			c.mu.Lock()
			defer c.mu.Unlock()
			if c.wake == wake {
				close(c.wake)
				c.wake = make(chan struct{})
			}
		})
	}
	return nil
}

// SetWriteDeadline does nothing: the server as the proxy runs it sets none, and an
// HTTP/2 stream's write deadline would reset the stream.
func (c *streamConn) SetWriteDeadline(time.Time) error { return nil }
