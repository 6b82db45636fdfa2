// This file is the HTTP/2 the tunnel speaks: only what HBONE needs (CONNECT
// streams, flow control, SETTINGS, PING, GOAWAY, RST_STREAM), for both the pool's
// client connections and the server's. It replaces x/net/http2's Transport and
// Server on the data path, whose goroutine hand-offs (a frame read, then handed to
// a serve loop, then to a handler; a write handed to a serve loop, then to a
// writer goroutine, then back) cost more than the bytes they move. Here:
//
//   - a Write on a stream frames its bytes into the connection's write buffer on
//     the caller's own goroutine (the connection's write lock held);
//   - one read loop per connection reads frames and appends DATA to the stream's
//     buffer, waking its reader: one hand-off per message and direction;
//   - frames wait in the connection's buffer for a flusher goroutine, which
//     yields before it writes: the frames every ready goroutine adds meanwhile
//     (many streams, many requests) leave in one TLS write and one write(2)
//     (batchConn); a buffer of flushAt bytes leaves at once, on the writer's own
//     goroutine;
//   - the read loop never waits on the socket's send side: the frames it answers
//     with (SETTINGS and PING acknowledgements, RST_STREAM, WINDOW_UPDATE, GOAWAY)
//     are queued for the flusher, and a peer that floods them without reading
//     the answers fills a bounded queue and is cut off.
//
// HPACK is x/net/http2/hpack's; frame types, flags, settings and error codes are
// x/net/http2's constants, so what is on the wire reads as RFC 9113.

package tunnel

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/ferrymesh/ferry/internal/rawsock"
)

const (
	frameHeaderLen = 9
	// defaultWindow and defaultFrameSize are HTTP/2's until SETTINGS say otherwise.
	defaultWindow    = 65535
	defaultFrameSize = 16 << 10
	maxWindow        = 1<<31 - 1
	// ctrlQueueMax bounds the control frames waiting for the flusher: a
	// peer that floods PINGs or SETTINGS and reads none of the answers is cut off
	// once they reach it.
	ctrlQueueMax = 256 << 10
	// flushAt is how much a writer leaves buffered for the flusher.
	flushAt = 64 << 10
	// stalledAfter is how long a socket write waits before the connection takes
	// no new stream (stalled).
	stalledAfter = time.Second
	// closeLinger is how long a gracefully closed connection waits for the peer
	// to end its half before the socket closes anyway.
	closeLinger = 5 * time.Second
)

const (
	flagEndStream  = 0x1
	flagAck        = 0x1
	flagEndHeaders = 0x4
	flagPadded     = 0x8
	flagPriority   = 0x20
)

// h2config is what one connection allows its peer and how it watches it.
type h2config struct {
	server         bool
	maxStreams     uint32 // streams the peer may open (server)
	maxHeaderBytes int    // a header list, decoded
	headerTable    uint32 // the HPACK table the peer's encoder may make us keep
	readIdle       time.Duration
	pingTimeout    time.Duration
	idleTimeout    time.Duration
	// onStream serves a stream the peer opened (server); it runs on its own goroutine.
	onStream func(st *h2stream, h *h2headers)
	// log hears why a connection failed with streams open (nil: nobody).
	log *slog.Logger
}

// h2headers is one decoded header block.
type h2headers struct {
	method, authority, scheme, path, protocol string
	status                                    int
	fields                                    []hpack.HeaderField // the regular ones
	size                                      int                 // decoded, as SETTINGS_MAX_HEADER_LIST_SIZE counts
	truncated                                 bool                // past maxHeaderBytes: fields dropped
	malformed                                 bool
}

// get is the value of the regular header name (lower case), or "".
func (h *h2headers) get(name string) string {
	for _, f := range h.fields {
		if f.Name == name {
			return f.Value
		}
	}
	return ""
}

// h2Error is an HTTP/2 error code, for a stream or the connection.
type h2Error struct {
	code http2.ErrCode
	why  string
	// remote: the peer sent it (RST_STREAM, GOAWAY); else this side found it.
	remote bool
}

func (e *h2Error) Error() string {
	who := "local"
	if e.remote {
		who = "peer"
	}
	if e.why == "" {
		return fmt.Sprintf("http2 %s error %v", who, e.code)
	}
	return fmt.Sprintf("http2 %s error %v: %s", who, e.code, e.why)
}

// errRetry is a stream the peer never processed (REFUSED_STREAM, or past its
// GOAWAY): it may be sent again on another connection.
type errRetry struct{ err error }

func (e *errRetry) Error() string { return e.err.Error() }
func (e *errRetry) Unwrap() error { return e.err }

var errConnClosed = errors.New("tunnel connection closed")

// batchConn sits under TLS: once batching, what TLS writes is kept until flush,
// so the records of one flush leave in one write(2). A socket of package net is
// read and written with raw system calls (rawsock).
type batchConn struct {
	net.Conn
	r        io.Reader    // the read loop's, under TLS
	w        io.Writer    // flush's
	lastRead atomic.Int64 // unix ns of the last bytes read
	mu       sync.Mutex
	batching bool
	buf      []byte
}

func newBatchConn(c net.Conn) *batchConn {
	b := &batchConn{Conn: c, r: c, w: c}
	if sc, ok := c.(syscall.Conn); ok {
		if r, err := rawsock.NewReader(sc); err == nil {
			b.r = r
		}
		if w, err := rawsock.NewWriter(sc); err == nil {
			b.w = w
		}
	}
	return b
}

func (b *batchConn) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	if n > 0 {
		b.lastRead.Store(time.Now().UnixNano())
	}
	return n, err
}

func (b *batchConn) Write(p []byte) (int, error) {
	b.mu.Lock()
	if !b.batching {
		b.mu.Unlock()
		return b.Conn.Write(p)
	}
	b.buf = append(b.buf, p...)
	b.mu.Unlock()
	return len(p), nil
}

func (b *batchConn) flush() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.buf) == 0 {
		return nil
	}
	_, err := b.w.Write(b.buf)
	if cap(b.buf) > 1<<20 {
		b.buf = nil // a burst's buffer is not kept by an idle connection
	} else {
		b.buf = b.buf[:0]
	}
	return err
}

// h2conn is one HTTP/2 connection over TLS, either side.
type h2conn struct {
	cfg h2config
	nc  net.Conn   // TLS
	raw *batchConn // under nc
	ctx context.Context
	end context.CancelFunc

	// The read loop's own.
	rbuf   []byte
	hdec   *hpack.Decoder
	hdrs   *h2headers // the block being decoded
	hdrSID uint32     // its stream, while CONTINUATION frames are due
	hdrEnd bool       // its HEADERS carried END_STREAM
	hdrLen int        // its encoded bytes so far
	pseudo bool       // regular fields seen: a pseudo-header after them is malformed

	wmu      sync.Mutex
	wbuf     []byte
	henc     *hpack.Encoder
	hbuf     bytes.Buffer
	werr     error
	flushDue bool // wbuf holds frames the flusher is woken for

	cmu  sync.Mutex // the control queue
	ctrl []byte
	wake chan struct{} // the flusher's

	writing   atomic.Int64 // unix ns since which a socket write has waited; 0: none
	tableSize atomic.Uint32
	tableSet  uint32 // the size henc was last set to (under wmu)

	mu             sync.Mutex
	cond           sync.Cond // send windows and stream slots
	streams        map[uint32]*h2stream
	nextID         uint32 // client
	maxPeerID      uint32 // server: the highest stream the peer opened
	peerMaxStreams uint32
	peerInitWindow int64
	peerMaxFrame   int
	sendWindow     int64 // what the peer lets this side send on the connection
	recvWindow     int64 // what the peer may still send on the connection
	recvUnacked    int64 // read by streams, not yet given back
	running        int   // server: handlers not yet returned
	reserved       int   // client: streams the pool reserved
	goAwayIn       bool  // the peer sent GOAWAY
	goAwayOut      bool  // this side sent GOAWAY (or will not reuse the connection)
	closed         bool
	err            error
	idleSince      time.Time
	pingSent       time.Time
	refusedBurst   int // streams refused since a handler last returned
	timer          *time.Timer
	shut           atomic.Bool // closed: the read loop only discards
	finished       sync.Once
	done           chan struct{} // closed once the socket is
}

// newH2conn starts HTTP/2 on an established TLS connection nc over raw: a client
// sends the preface, either side its SETTINGS. The read loop runs until the
// connection closes.
func newH2conn(nc net.Conn, raw *batchConn, cfg h2config) (*h2conn, error) {
	ctx, end := context.WithCancel(context.Background())
	c := &h2conn{
		cfg: cfg, nc: nc, raw: raw, ctx: ctx, end: end,
		wake:           make(chan struct{}, 1),
		streams:        map[uint32]*h2stream{},
		nextID:         1,
		peerMaxStreams: 100,
		peerInitWindow: defaultWindow,
		peerMaxFrame:   defaultFrameSize,
		sendWindow:     defaultWindow,
		recvWindow:     maxConnWindow,
		idleSince:      time.Now(),
		done:           make(chan struct{}),
	}
	c.cond.L = &c.mu
	c.tableSize.Store(4096)
	c.tableSet = 4096
	c.henc = hpack.NewEncoder(&c.hbuf)
	c.hdec = hpack.NewDecoder(cfg.headerTable, c.emit)
	c.hdec.SetMaxStringLength(cfg.maxHeaderBytes)
	raw.lastRead.Store(time.Now().UnixNano())
	c.timer = time.AfterFunc(c.tick(), c.check)
	raw.mu.Lock()
	raw.batching = true
	raw.mu.Unlock()

	settings := []byte{}
	if !cfg.server {
		settings = append(settings, http2.ClientPreface...)
	}
	var s []byte
	put := func(id http2.SettingID, v uint32) {
		s = binary.BigEndian.AppendUint16(s, uint16(id))
		s = binary.BigEndian.AppendUint32(s, v)
	}
	if cfg.server {
		put(http2.SettingMaxConcurrentStreams, cfg.maxStreams)
	} else {
		put(http2.SettingEnablePush, 0)
	}
	put(http2.SettingInitialWindowSize, maxStreamWindow)
	put(http2.SettingMaxFrameSize, maxFrameSize)
	put(http2.SettingMaxHeaderListSize, uint32(cfg.maxHeaderBytes))
	put(http2.SettingHeaderTableSize, cfg.headerTable)
	settings = appendFrame(settings, http2.FrameSettings, 0, 0, s)
	settings = appendWindowUpdate(settings, 0, maxConnWindow-defaultWindow)
	if err := c.write(func() { c.wbuf = append(c.wbuf, settings...) }); err != nil {
		end()
		return nil, err
	}
	go c.readLoop()
	go c.flusher()
	return c, nil
}

func appendFrame(b []byte, t http2.FrameType, flags uint8, sid uint32, payload []byte) []byte {
	n := len(payload)
	b = append(b, byte(n>>16), byte(n>>8), byte(n), byte(t), flags)
	b = binary.BigEndian.AppendUint32(b, sid)
	return append(b, payload...)
}

func appendWindowUpdate(b []byte, sid uint32, inc uint32) []byte {
	b = append(b, 0, 0, 4, byte(http2.FrameWindowUpdate), 0)
	b = binary.BigEndian.AppendUint32(b, sid)
	return binary.BigEndian.AppendUint32(b, inc)
}

func appendRST(b []byte, sid uint32, code http2.ErrCode) []byte {
	b = append(b, 0, 0, 4, byte(http2.FrameRSTStream), 0)
	b = binary.BigEndian.AppendUint32(b, sid)
	return binary.BigEndian.AppendUint32(b, uint32(code))
}

func appendGoAway(b []byte, last uint32, code http2.ErrCode) []byte {
	b = append(b, 0, 0, 8, byte(http2.FrameGoAway), 0, 0, 0, 0, 0)
	b = binary.BigEndian.AppendUint32(b, last)
	return binary.BigEndian.AppendUint32(b, uint32(code))
}

// write runs fn, which appends frames to wbuf, under the write lock. They leave
// at once when flushAt bytes wait; otherwise the flusher writes them, after every
// goroutine ready to run has had its turn, so the frames that many streams' writers
// (many requests, many connections) append meanwhile leave in the same write(2).
func (c *h2conn) write(fn func()) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.werr != nil {
		return c.werr
	}
	fn()
	if len(c.wbuf) >= flushAt {
		return c.flushLocked()
	}
	if !c.flushDue {
		c.flushDue = true
		c.wakeFlusher()
	}
	return nil
}

func (c *h2conn) flushLocked() error {
	if len(c.wbuf) == 0 {
		return nil
	}
	c.writing.Store(time.Now().UnixNano())
	_, err := c.nc.Write(c.wbuf)
	if err == nil {
		err = c.raw.flush()
	}
	c.writing.Store(0)
	if cap(c.wbuf) > 1<<20 {
		c.wbuf = nil
	} else {
		c.wbuf = c.wbuf[:0]
	}
	if err != nil {
		c.werr = err
		go c.close(fmt.Errorf("tunnel write: %w", err))
	}
	return err
}

// queue hands control frames to the flusher; false when the queue is full.
func (c *h2conn) queue(frame []byte) bool { return c.enqueue(frame, true) }

// enqueue queues frame, within ctrlQueueMax if bounded. WINDOW_UPDATEs are not
// bounded, for a dropped one would stall the peer for good; they cannot flood,
// as each answers at least a quarter of a window of DATA.
func (c *h2conn) enqueue(frame []byte, bounded bool) bool {
	c.cmu.Lock()
	if bounded && len(c.ctrl)+len(frame) > ctrlQueueMax {
		c.cmu.Unlock()
		return false
	}
	c.ctrl = append(c.ctrl, frame...)
	c.cmu.Unlock()
	c.wakeFlusher()
	return true
}

func (c *h2conn) wakeFlusher() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// flusher writes out what writers left in wbuf and the control queue's frames.
// Woken, it first yields: the goroutines ready to run then, and those they wake,
// run before it and add their frames to the same write.
func (c *h2conn) flusher() {
	var out []byte
	for {
		select {
		case <-c.wake:
		case <-c.done:
			return
		}
		runtime.Gosched()
		c.cmu.Lock()
		out, c.ctrl = c.ctrl, out[:0]
		c.cmu.Unlock()
		c.wmu.Lock()
		c.flushDue = false
		err := c.werr
		if err == nil {
			c.wbuf = append(c.wbuf, out...)
			err = c.flushLocked()
		}
		c.wmu.Unlock()
		if err != nil {
			return
		}
	}
}

// encodeHeaders appends a header block (HEADERS, then CONTINUATION as needed) for
// stream sid; under wmu.
func (c *h2conn) encodeHeaders(sid uint32, end bool, fields ...string) {
	if ts := c.tableSize.Load(); ts != c.tableSet {
		c.henc.SetMaxDynamicTableSizeLimit(ts)
		c.tableSet = ts
	}
	c.hbuf.Reset()
	for i := 0; i+1 < len(fields); i += 2 {
		c.henc.WriteField(hpack.HeaderField{Name: fields[i], Value: fields[i+1]})
	}
	block := c.hbuf.Bytes()
	var flags uint8
	if end {
		flags |= flagEndStream
	}
	max := c.peerFrameSize()
	t := http2.FrameHeaders
	for {
		chunk := block
		if len(chunk) > max {
			chunk = chunk[:max]
		}
		block = block[len(chunk):]
		f := flags
		if len(block) == 0 {
			f |= flagEndHeaders
		}
		c.wbuf = appendFrame(c.wbuf, t, f, sid, chunk)
		if len(block) == 0 {
			return
		}
		t, flags = http2.FrameContinuation, 0
	}
}

func (c *h2conn) peerFrameSize() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.peerMaxFrame
}

// close ends the connection and every stream on it with err, at once.
func (c *h2conn) close(err error) { c.closeConn(err, false) }

// closeConn ends the connection with err. A graceful close (the connection
// drained, or idle) ends this side's half of the TCP connection and lets the read
// loop close the socket once the peer has ended its half, or after closeLinger:
// a socket closed with bytes unread is reset, and a reset loses what this side's
// send buffer still held for the peer, such as a stream's last bytes.
func (c *h2conn) closeConn(err error, graceful bool) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	c.err = err
	streams := c.streams
	c.streams = map[uint32]*h2stream{}
	c.cond.Broadcast()
	c.mu.Unlock()
	c.shut.Store(true)
	if len(streams) > 0 && c.cfg.log != nil {
		c.cfg.log.Warn("tunnel connection failed", "remote", c.raw.RemoteAddr().String(), "streams", len(streams), "error", err)
	}
	for _, st := range streams {
		st.fail(err, false)
	}
	c.timer.Stop()
	c.end()
	tcp, ok := c.raw.Conn.(interface{ CloseWrite() error })
	if !graceful || !ok {
		c.finish()
		return
	}
	c.raw.Conn.SetReadDeadline(time.Now().Add(closeLinger)) // the read loop calls finish
	// Frames a writer left for the next one to flush (an END_STREAM) go out
	// first; not on this goroutine, which may be the read loop, as a writer may be
	// waiting on a peer that does not read.
	go func() {
		c.wmu.Lock()
		defer c.wmu.Unlock()
		if c.werr == nil && c.flushLocked() == nil {
			tcp.CloseWrite()
		}
	}()
}

// finish closes the socket: the TCP connection, not TLS, for close_notify would
// race the writers, and HTTP/2 ends with GOAWAY.
func (c *h2conn) finish() {
	c.finished.Do(func() {
		c.raw.Conn.Close()
		close(c.done)
	})
}

// goAway tells the peer, best effort, and closes: a connection error.
func (c *h2conn) goAway(code http2.ErrCode, err error) {
	if c.wmu.TryLock() {
		c.mu.Lock()
		last := c.maxPeerID
		c.mu.Unlock()
		c.wbuf = appendGoAway(c.wbuf, last, code)
		c.raw.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
		c.flushLocked()
		c.wmu.Unlock()
	}
	c.close(err)
}

// drain sends GOAWAY: no new stream; the connection closes once its streams end.
func (c *h2conn) drain() {
	c.mu.Lock()
	if c.closed || c.goAwayOut {
		c.mu.Unlock()
		return
	}
	c.goAwayOut = true
	last := c.maxPeerID
	c.mu.Unlock()
	if c.write(func() { c.wbuf = appendGoAway(c.wbuf, last, http2.ErrCodeNo) }) != nil {
		return
	}
	c.closeIfDone()
}

// shutdown drains the connection and waits for it to close, or for ctx to end
// (then it closes it).
func (c *h2conn) shutdown(ctx context.Context) {
	c.drain()
	select {
	case <-c.done:
	case <-ctx.Done():
		c.close(errConnClosed)
	}
}

// closeIfDone closes a draining connection whose streams have all ended.
func (c *h2conn) closeIfDone() {
	c.mu.Lock()
	done := (c.goAwayOut || c.goAwayIn) && len(c.streams) == 0 && c.running == 0 && c.reserved == 0 && !c.closed
	c.mu.Unlock()
	if done {
		c.closeConn(errConnClosed, true)
	}
}

// tick is how often check runs.
func (c *h2conn) tick() time.Duration {
	d := c.cfg.readIdle
	if c.cfg.pingTimeout > 0 && c.cfg.pingTimeout < d {
		d = c.cfg.pingTimeout
	}
	if c.cfg.idleTimeout > 0 && c.cfg.idleTimeout < d {
		d = c.cfg.idleTimeout
	}
	return max(d/2, 10*time.Millisecond)
}

// check pings a silent peer, closes one that does not answer, and closes a
// connection idle for idleTimeout.
func (c *h2conn) check() {
	now := time.Now()
	// Bytes, not whole frames: a connection crawling out of a partition (a frame
	// every few seconds) is slow, not dead, and its streams live on.
	last := time.Unix(0, c.raw.lastRead.Load())
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	idle := len(c.streams) == 0 && c.running == 0 && c.reserved == 0
	if !idle {
		c.idleSince = now
	}
	var ping, dead, expired bool
	if !c.pingSent.IsZero() && last.After(c.pingSent) {
		c.pingSent = time.Time{}
	}
	if !c.pingSent.IsZero() && c.writing.Load() != 0 {
		// The PING may still wait in this side's own socket, behind what a stalled
		// write has queued: its answer is due a ping timeout after the write
		// ends. A peer that is gone meanwhile fails the write (TCP_USER_TIMEOUT,
		// set by the proxy).
		c.pingSent = now
	}
	switch {
	case idle && c.cfg.idleTimeout > 0 && now.Sub(c.idleSince) >= c.cfg.idleTimeout:
		expired = true
	case !c.pingSent.IsZero() && now.Sub(c.pingSent) >= c.cfg.pingTimeout:
		dead = true
	case c.pingSent.IsZero() && c.cfg.readIdle > 0 && now.Sub(last) >= c.cfg.readIdle:
		ping = true
		c.pingSent = now
	}
	c.mu.Unlock()
	switch {
	case expired:
		c.drain()
		c.closeConn(errConnClosed, true)
		return
	case dead:
		c.close(fmt.Errorf("tunnel peer did not answer a ping within %v", c.cfg.pingTimeout))
		return
	case ping:
		c.queue(appendFrame(nil, http2.FramePing, 0, 0, make([]byte, 8)))
	}
	c.timer.Reset(c.tick())
}

// connState is what the pool needs to know of a client connection.
type connState struct {
	closed           bool
	active, reserved int
}

func (c *h2conn) state() connState {
	c.mu.Lock()
	defer c.mu.Unlock()
	return connState{closed: c.closed, active: len(c.streams), reserved: c.reserved}
}

// stalled says a socket write has waited stalledAfter or more: the peer, or the
// path, takes nothing (a partition, or TCP crawling out of one). A new stream would
// queue behind what waits, so it goes on a new connection.
func (c *h2conn) stalled() bool {
	since := c.writing.Load()
	return since != 0 && time.Since(time.Unix(0, since)) >= stalledAfter
}

// reserve takes a stream slot for a later openStream; false when the connection
// cannot take one more, or is stalled.
func (c *h2conn) reserve() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed || c.goAwayIn || c.goAwayOut || uint32(len(c.streams)+c.reserved) >= c.peerMaxStreams || c.stalled() {
		return false
	}
	c.reserved++
	return true
}

func (c *h2conn) unreserve() {
	c.mu.Lock()
	c.reserved--
	c.mu.Unlock()
	c.closeIfDone()
}

// openStream opens a CONNECT stream (client) on a reserved slot, and waits for the
// answer within ctx.
func (c *h2conn) openStream(ctx context.Context, authority, protocol string) (*h2stream, *h2headers, error) {
	var st *h2stream
	ran := false
	err := c.write(func() {
		ran = true
		c.mu.Lock()
		c.reserved--
		if c.closed {
			c.mu.Unlock()
			return
		}
		st = c.newStreamLocked(c.nextID)
		c.nextID += 2
		c.mu.Unlock()
		if protocol != "" {
			c.encodeHeaders(st.id, false, ":method", "CONNECT", ":authority", authority, "ferry-protocol", protocol)
		} else {
			c.encodeHeaders(st.id, false, ":method", "CONNECT", ":authority", authority)
		}
	})
	if !ran {
		c.unreserve()
	}
	if st == nil {
		c.mu.Lock()
		cerr := c.err
		c.mu.Unlock()
		if cerr == nil {
			cerr = err
		}
		return nil, nil, &errRetry{fmt.Errorf("tunnel connection closed: %w", cerr)}
	}
	if err != nil {
		st.fail(err, false)
		return nil, nil, err
	}
	select {
	case h := <-st.resp:
		return st, h, nil
	case <-st.ctx.Done():
		select {
		case h := <-st.resp: // a refusal, then a reset
			return st, h, nil
		default:
		}
		return nil, nil, st.failure()
	case <-ctx.Done():
		st.Close()
		return nil, nil, context.Cause(ctx)
	}
}

// newStreamLocked registers stream id; under mu.
func (c *h2conn) newStreamLocked(id uint32) *h2stream {
	st := &h2stream{
		c: c, id: id,
		sendWindow: c.peerInitWindow,
		recvWindow: maxStreamWindow,
		readable:   make(chan struct{}, 1),
	}
	st.ctx, st.cancel = context.WithCancel(c.ctx)
	if !c.cfg.server {
		st.resp = make(chan *h2headers, 1)
	}
	c.streams[id] = st
	return st
}

// forget removes a stream that ended from the table.
func (c *h2conn) forget(st *h2stream) {
	c.mu.Lock()
	if c.streams[st.id] == st {
		delete(c.streams, st.id)
		if len(c.streams) == 0 {
			c.idleSince = time.Now()
		}
	}
	c.mu.Unlock()
	c.closeIfDone()
}

// readLoop reads frames until the connection fails, then closes it. After a
// graceful close it discards what the peer still sends until the peer closes.
func (c *h2conn) readLoop() {
	defer c.finish()
	err := c.readFrames()
	if c.shut.Load() {
		io.Copy(io.Discard, c.nc)
		return
	}
	if errors.Is(err, io.EOF) {
		// Not a stream's clean end: what was in flight is lost.
		err = fmt.Errorf("tunnel connection closed by the peer: %w", io.ErrUnexpectedEOF)
	}
	var he *h2Error
	if errors.As(err, &he) && !he.remote {
		c.goAway(he.code, err)
		return
	}
	c.close(err)
}

func (c *h2conn) readFrames() error {
	if c.cfg.server {
		var pre [len(http2.ClientPreface)]byte
		if _, err := io.ReadFull(c.nc, pre[:]); err != nil {
			return fmt.Errorf("tunnel preface: %w", err)
		}
		if string(pre[:]) != http2.ClientPreface {
			return &h2Error{code: http2.ErrCodeProtocol, why: "bad client preface"}
		}
	}
	var hdr [frameHeaderLen]byte
	for {
		if _, err := io.ReadFull(c.nc, hdr[:]); err != nil {
			return err
		}
		n := int(hdr[0])<<16 | int(hdr[1])<<8 | int(hdr[2])
		t, flags := http2.FrameType(hdr[3]), hdr[4]
		sid := binary.BigEndian.Uint32(hdr[5:]) & maxWindow
		if n > maxFrameSize {
			return &h2Error{code: http2.ErrCodeFrameSize, why: "frame larger than SETTINGS_MAX_FRAME_SIZE"}
		}
		if cap(c.rbuf) < n {
			c.rbuf = make([]byte, max(n, 16<<10))
		}
		p := c.rbuf[:n]
		if _, err := io.ReadFull(c.nc, p); err != nil {
			return err
		}
		if c.shut.Load() {
			return errConnClosed
		}
		if c.hdrs != nil && (t != http2.FrameContinuation || sid != c.hdrSID) {
			return &h2Error{code: http2.ErrCodeProtocol, why: "header block interrupted"}
		}
		var err error
		switch t {
		case http2.FrameData:
			err = c.onData(flags, sid, p)
		case http2.FrameHeaders:
			err = c.onHeaders(flags, sid, p)
		case http2.FrameContinuation:
			if c.hdrs == nil {
				return &h2Error{code: http2.ErrCodeProtocol, why: "CONTINUATION without HEADERS"}
			}
			err = c.onBlock(flags&flagEndHeaders != 0, p)
		case http2.FramePriority:
			if n != 5 || sid == 0 {
				return &h2Error{code: http2.ErrCodeFrameSize, why: "bad PRIORITY"}
			}
		case http2.FrameRSTStream:
			if n != 4 || sid == 0 {
				return &h2Error{code: http2.ErrCodeFrameSize, why: "bad RST_STREAM"}
			}
			c.onReset(sid, http2.ErrCode(binary.BigEndian.Uint32(p)))
		case http2.FrameSettings:
			err = c.onSettings(flags, sid, p)
		case http2.FramePushPromise:
			return &h2Error{code: http2.ErrCodeProtocol, why: "PUSH_PROMISE"}
		case http2.FramePing:
			if n != 8 || sid != 0 {
				return &h2Error{code: http2.ErrCodeFrameSize, why: "bad PING"}
			}
			if flags&flagAck == 0 && !c.queue(appendFrame(nil, http2.FramePing, flagAck, 0, p)) {
				return &h2Error{code: http2.ErrCodeEnhanceYourCalm, why: "control frames unanswered"}
			}
		case http2.FrameGoAway:
			if n < 8 || sid != 0 {
				return &h2Error{code: http2.ErrCodeFrameSize, why: "bad GOAWAY"}
			}
			c.onGoAway(binary.BigEndian.Uint32(p)&maxWindow, http2.ErrCode(binary.BigEndian.Uint32(p[4:])))
		case http2.FrameWindowUpdate:
			if n != 4 {
				return &h2Error{code: http2.ErrCodeFrameSize, why: "bad WINDOW_UPDATE"}
			}
			err = c.onWindowUpdate(sid, binary.BigEndian.Uint32(p)&maxWindow)
		}
		if err != nil {
			return err
		}
	}
}

// unpad strips a PADDED frame's padding; flow control counts it all the same.
func unpad(flags uint8, p []byte) ([]byte, error) {
	if flags&flagPadded == 0 {
		return p, nil
	}
	if len(p) == 0 || int(p[0]) >= len(p) {
		return nil, &h2Error{code: http2.ErrCodeProtocol, why: "padding too long"}
	}
	return p[1 : len(p)-int(p[0])], nil
}

func (c *h2conn) onData(flags uint8, sid uint32, p []byte) error {
	if sid == 0 {
		return &h2Error{code: http2.ErrCodeProtocol, why: "DATA on stream 0"}
	}
	data, err := unpad(flags, p)
	if err != nil {
		return err
	}
	c.mu.Lock()
	if int64(len(p)) > c.recvWindow {
		c.mu.Unlock()
		return &h2Error{code: http2.ErrCodeFlowControl, why: "connection window exceeded"}
	}
	c.recvWindow -= int64(len(p))
	st := c.streams[sid]
	idle := st == nil && (c.cfg.server && sid > c.maxPeerID || !c.cfg.server && sid >= c.nextID)
	c.mu.Unlock()
	if idle {
		return &h2Error{code: http2.ErrCodeProtocol, why: "DATA on an idle stream"}
	}
	if st == nil || !st.deliver(data, len(p), flags&flagEndStream != 0) {
		// A stream that ended (or was never ours): its window is the connection's
		// to give back.
		c.returnWindow(nil, int64(len(p)))
		if st == nil && len(p) > 0 {
			c.queue(appendRST(nil, sid, http2.ErrCodeStreamClosed))
		}
		return nil
	}
	if pad := len(p) - len(data); pad > 0 {
		c.returnWindow(st, int64(pad))
	}
	return nil
}

// returnWindow counts n bytes read (or dropped) on st (nil: the connection only),
// and sends WINDOW_UPDATEs once a quarter of a window is due.
func (c *h2conn) returnWindow(st *h2stream, n int64) {
	var frames []byte
	c.mu.Lock()
	c.recvUnacked += n
	if c.recvUnacked >= maxConnWindow/4 {
		frames = appendWindowUpdate(frames, 0, uint32(c.recvUnacked))
		c.recvWindow += c.recvUnacked
		c.recvUnacked = 0
	}
	if st != nil && !st.recvEnd {
		st.recvUnacked += n
		if st.recvUnacked >= maxStreamWindow/4 {
			frames = appendWindowUpdate(frames, st.id, uint32(st.recvUnacked))
			st.recvWindow += st.recvUnacked
			st.recvUnacked = 0
		}
	}
	c.mu.Unlock()
	if frames != nil {
		c.enqueue(frames, false)
	}
}

func (c *h2conn) onHeaders(flags uint8, sid uint32, p []byte) error {
	if sid == 0 {
		return &h2Error{code: http2.ErrCodeProtocol, why: "HEADERS on stream 0"}
	}
	p, err := unpad(flags, p)
	if err != nil {
		return err
	}
	if flags&flagPriority != 0 {
		if len(p) < 5 {
			return &h2Error{code: http2.ErrCodeProtocol, why: "HEADERS priority too short"}
		}
		p = p[5:]
	}
	c.hdrs, c.hdrSID, c.hdrEnd, c.hdrLen, c.pseudo = &h2headers{}, sid, flags&flagEndStream != 0, 0, true
	return c.onBlock(flags&flagEndHeaders != 0, p)
}

// onBlock decodes one fragment of the header block in progress; at its end the
// block goes to its stream.
func (c *h2conn) onBlock(last bool, frag []byte) error {
	c.hdrLen += len(frag)
	if c.hdrLen > 4*c.cfg.maxHeaderBytes+(16<<10) {
		return &h2Error{code: http2.ErrCodeEnhanceYourCalm, why: "header block too large"}
	}
	if _, err := c.hdec.Write(frag); err != nil {
		return &h2Error{code: http2.ErrCodeCompression, why: err.Error()}
	}
	if !last {
		return nil
	}
	if err := c.hdec.Close(); err != nil {
		return &h2Error{code: http2.ErrCodeCompression, why: err.Error()}
	}
	h, sid, end := c.hdrs, c.hdrSID, c.hdrEnd
	c.hdrs = nil
	if c.cfg.server {
		return c.onRequest(sid, h, end)
	}
	c.onResponse(sid, h, end)
	return nil
}

// emit is the HPACK decoder's field callback.
func (c *h2conn) emit(f hpack.HeaderField) {
	h := c.hdrs
	if h == nil {
		return
	}
	h.size += len(f.Name) + len(f.Value) + 32
	if h.size > c.cfg.maxHeaderBytes {
		h.truncated = true
		return
	}
	if f.IsPseudo() {
		if !c.pseudo {
			h.malformed = true
		}
		switch f.Name {
		case ":method":
			h.method = f.Value
		case ":authority":
			h.authority = f.Value
		case ":scheme":
			h.scheme = f.Value
		case ":path":
			h.path = f.Value
		case ":protocol":
			h.protocol = f.Value
		case ":status":
			st, err := strconv.Atoi(f.Value)
			if err != nil || st < 100 || st > 999 {
				h.malformed = true
			}
			h.status = st
		default:
			h.malformed = true
		}
		return
	}
	c.pseudo = false
	if len(h.fields) < 64 {
		h.fields = append(h.fields, f)
	}
}

// onRequest opens the stream a client's HEADERS started (server).
func (c *h2conn) onRequest(sid uint32, h *h2headers, end bool) error {
	c.mu.Lock()
	if st := c.streams[sid]; st != nil {
		// Trailers: they end the stream's upload.
		c.mu.Unlock()
		if !end {
			return &h2Error{code: http2.ErrCodeProtocol, why: "trailers without END_STREAM"}
		}
		st.deliver(nil, 0, true)
		return nil
	}
	if sid%2 == 0 || sid <= c.maxPeerID {
		c.mu.Unlock()
		return &h2Error{code: http2.ErrCodeProtocol, why: "stream ID not new"}
	}
	c.maxPeerID = sid
	// Open streams count against the limit the peer was told; handlers still
	// running for streams already reset count against twice that, so a peer that
	// opens and resets streams at once (rapid reset) cannot pile up handlers.
	refuse := c.goAwayOut || c.closed || uint32(len(c.streams)) >= c.cfg.maxStreams || uint32(c.running) >= 2*c.cfg.maxStreams
	if refuse {
		c.refusedBurst++
		burst := c.refusedBurst
		c.mu.Unlock()
		if burst > 4*int(c.cfg.maxStreams)+100 {
			return &h2Error{code: http2.ErrCodeEnhanceYourCalm, why: "too many refused streams"}
		}
		c.queue(appendRST(nil, sid, http2.ErrCodeRefusedStream))
		return nil
	}
	st := c.newStreamLocked(sid)
	st.recvEnd = end
	if end {
		st.rerr = io.EOF
	}
	c.running++
	c.mu.Unlock()
	go func() {
		c.cfg.onStream(st, h)
		c.mu.Lock()
		c.running--
		c.refusedBurst = 0
		if c.running == 0 && len(c.streams) == 0 {
			c.idleSince = time.Now()
		}
		c.mu.Unlock()
		c.closeIfDone()
	}()
	return nil
}

// onResponse hands a stream's answer to openStream (client).
func (c *h2conn) onResponse(sid uint32, h *h2headers, end bool) {
	c.mu.Lock()
	st := c.streams[sid]
	c.mu.Unlock()
	if st == nil {
		return
	}
	if !st.gotResp {
		if h.status >= 100 && h.status < 200 && !end {
			return // informational
		}
		st.gotResp = true
		if h.malformed || h.status == 0 {
			st.fail(&h2Error{code: http2.ErrCodeProtocol, why: "malformed response"}, true)
			return
		}
		st.resp <- h
	}
	if end {
		st.deliver(nil, 0, true)
	}
}

func (c *h2conn) onReset(sid uint32, code http2.ErrCode) {
	c.mu.Lock()
	st := c.streams[sid]
	c.mu.Unlock()
	if st == nil {
		return
	}
	var err error = &h2Error{code: code, remote: true, why: "stream reset"}
	if code == http2.ErrCodeRefusedStream {
		err = &errRetry{err}
	}
	st.fail(err, false)
}

func (c *h2conn) onSettings(flags uint8, sid uint32, p []byte) error {
	if sid != 0 {
		return &h2Error{code: http2.ErrCodeProtocol, why: "SETTINGS on a stream"}
	}
	if flags&flagAck != 0 {
		if len(p) != 0 {
			return &h2Error{code: http2.ErrCodeFrameSize, why: "SETTINGS ack with a payload"}
		}
		return nil
	}
	if len(p)%6 != 0 {
		return &h2Error{code: http2.ErrCodeFrameSize, why: "SETTINGS length"}
	}
	c.mu.Lock()
	for ; len(p) > 0; p = p[6:] {
		id, v := http2.SettingID(binary.BigEndian.Uint16(p)), binary.BigEndian.Uint32(p[2:])
		switch id {
		case http2.SettingHeaderTableSize:
			c.tableSize.Store(min(v, 4096))
		case http2.SettingEnablePush:
			if v > 1 || v == 1 && !c.cfg.server {
				c.mu.Unlock()
				return &h2Error{code: http2.ErrCodeProtocol, why: "SETTINGS_ENABLE_PUSH"}
			}
		case http2.SettingMaxConcurrentStreams:
			c.peerMaxStreams = v
		case http2.SettingInitialWindowSize:
			if v > maxWindow {
				c.mu.Unlock()
				return &h2Error{code: http2.ErrCodeFlowControl, why: "SETTINGS_INITIAL_WINDOW_SIZE"}
			}
			delta := int64(v) - c.peerInitWindow
			c.peerInitWindow = int64(v)
			for _, st := range c.streams {
				st.sendWindow += delta
			}
		case http2.SettingMaxFrameSize:
			if v < defaultFrameSize || v > 1<<24-1 {
				c.mu.Unlock()
				return &h2Error{code: http2.ErrCodeProtocol, why: "SETTINGS_MAX_FRAME_SIZE"}
			}
			c.peerMaxFrame = int(min(v, maxFrameSize))
		}
	}
	c.cond.Broadcast()
	c.mu.Unlock()
	if !c.queue(appendFrame(nil, http2.FrameSettings, flagAck, 0, nil)) {
		return &h2Error{code: http2.ErrCodeEnhanceYourCalm, why: "control frames unanswered"}
	}
	return nil
}

func (c *h2conn) onGoAway(last uint32, code http2.ErrCode) {
	c.mu.Lock()
	c.goAwayIn = true
	var unprocessed []*h2stream
	if !c.cfg.server {
		for id, st := range c.streams {
			if id > last {
				unprocessed = append(unprocessed, st)
			}
		}
	}
	c.cond.Broadcast()
	c.mu.Unlock()
	for _, st := range unprocessed {
		st.fail(&errRetry{&h2Error{code: code, remote: true, why: "stream past the peer's GOAWAY"}}, false)
	}
	c.closeIfDone()
}

func (c *h2conn) onWindowUpdate(sid uint32, inc uint32) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if sid == 0 {
		if inc == 0 {
			return &h2Error{code: http2.ErrCodeProtocol, why: "WINDOW_UPDATE of 0"}
		}
		if c.sendWindow+int64(inc) > maxWindow {
			return &h2Error{code: http2.ErrCodeFlowControl, why: "connection window overflow"}
		}
		c.sendWindow += int64(inc)
		c.cond.Broadcast()
		return nil
	}
	st := c.streams[sid]
	if st == nil {
		return nil
	}
	if inc == 0 || st.sendWindow+int64(inc) > maxWindow {
		c.mu.Unlock()
		st.fail(&h2Error{code: http2.ErrCodeFlowControl, why: "bad stream WINDOW_UPDATE"}, true)
		c.mu.Lock()
		return nil
	}
	st.sendWindow += int64(inc)
	c.cond.Broadcast()
	return nil
}

// h2stream is one CONNECT stream as a net.Conn. Read and Write may run at once;
// CloseWrite sends END_STREAM; Close ends both ways (a reset unless both ended).
type h2stream struct {
	c   *h2conn
	id  uint32
	ctx context.Context // ends when the stream is reset or closed
	// cancel ends ctx.
	cancel context.CancelFunc

	// Under c.mu.
	sendWindow  int64
	recvWindow  int64
	recvUnacked int64
	sentEnd     bool
	recvEnd     bool
	failed      error
	closed      bool

	resp    chan *h2headers // client: the answer
	gotResp bool            // read loop only

	rmu      sync.Mutex // the receive buffer
	buf      recvBuf
	sink     *rawsock.Writer // WriteTo's destination, written to directly while it waits
	writing  bool            // WriteTo is writing to sink: the read loop must not
	dropped  bool            // closed: what arrives goes back to the connection's window
	rerr     error           // after the buffer: io.EOF, or why the stream ended
	readable chan struct{}

	wmu sync.Mutex // one Write at a time

	dmu      sync.Mutex // the read deadline
	deadline time.Time
	dwake    chan struct{} // closed when the deadline changes or passes
	dtimer   *time.Timer

	local, remote net.Addr
	in, out       atomic.Int64
}

// deliver appends DATA for the reader; false if the stream no longer reads.
func (st *h2stream) deliver(data []byte, flowed int, end bool) bool {
	c := st.c
	c.mu.Lock()
	if st.recvEnd || st.failed != nil {
		c.mu.Unlock()
		return false
	}
	if int64(flowed) > st.recvWindow {
		c.mu.Unlock()
		st.fail(&h2Error{code: http2.ErrCodeFlowControl, why: "stream window exceeded"}, true)
		return false
	}
	st.recvWindow -= int64(flowed)
	if end {
		st.recvEnd = true
	}
	done := st.sentEnd && st.recvEnd
	c.mu.Unlock()
	st.rmu.Lock()
	if st.dropped {
		st.rmu.Unlock()
		return false
	}
	direct := 0
	if st.sink != nil && !st.writing && st.buf.empty() && len(data) > 0 {
		// WriteTo waits with nothing to write: try the destination socket at once,
		// from this goroutine, and hand over only what it did not take.
		direct, _ = st.sink.TryWrite(data)
		data = data[direct:]
	}
	st.buf.write(data)
	if end && st.rerr == nil {
		st.rerr = io.EOF
	}
	st.rmu.Unlock()
	if direct > 0 {
		st.in.Add(int64(direct))
		c.returnWindow(st, int64(direct))
	}
	if len(data) > 0 || end {
		st.wake()
	}
	if done {
		c.forget(st)
	}
	return true
}

// WriteTo copies the stream to w until the peer ends it (nil) or it fails: the
// proxy's copy loop (pipe.Copy) takes it. While it waits, the read loop writes what
// arrives straight to w's socket when the socket takes it all, so a message costs
// no hand-off between goroutines; what the socket does not take at once is written
// here.
func (st *h2stream) WriteTo(w io.Writer) (int64, error) {
	var sink *rawsock.Writer
	if sc, ok := w.(syscall.Conn); ok {
		if sink, _ = rawsock.NewWriter(sc); sink != nil {
			w = sink
		}
	}
	bp := recvChunks.Get().(*[]byte)
	defer recvChunks.Put(bp)
	buf := (*bp)[:recvChunk]
	st.rmu.Lock()
	st.sink = sink
	st.rmu.Unlock()
	defer func() {
		st.rmu.Lock()
		st.sink = nil
		st.rmu.Unlock()
	}()
	start := st.in.Load()
	for {
		st.rmu.Lock()
		n := st.buf.read(buf)
		if n == 0 {
			err := st.rerr
			st.rmu.Unlock()
			if err == io.EOF {
				return st.in.Load() - start, nil
			}
			if err != nil {
				return st.in.Load() - start, err
			}
			if err := st.waitReadable(); err != nil {
				return st.in.Load() - start, err
			}
			continue
		}
		st.writing = true
		st.rmu.Unlock()
		st.in.Add(int64(n))
		st.c.returnWindow(st, int64(n))
		nw, err := w.Write(buf[:n])
		st.rmu.Lock()
		st.writing = false
		st.rmu.Unlock()
		if err == nil && nw != n {
			err = io.ErrShortWrite
		}
		if err != nil {
			return st.in.Load() - start, err
		}
	}
}

func (st *h2stream) wake() {
	select {
	case st.readable <- struct{}{}:
	default:
	}
}

// fail ends the stream with err; send resets it on the wire (a local error).
func (st *h2stream) fail(err error, send bool) {
	c := st.c
	c.mu.Lock()
	if st.failed != nil || st.sentEnd && st.recvEnd {
		c.mu.Unlock()
		return
	}
	st.failed = err
	c.cond.Broadcast()
	c.mu.Unlock()
	st.rmu.Lock()
	if st.rerr == nil || st.rerr == io.EOF && st.buf.empty() {
		st.rerr = err
	}
	st.rmu.Unlock()
	st.cancel()
	st.wake()
	if send {
		code := http2.ErrCodeCancel
		var he *h2Error
		if errors.As(err, &he) {
			code = he.code
		}
		c.queue(appendRST(nil, st.id, code))
	}
	c.forget(st)
}

// failure is why the stream ended early.
func (st *h2stream) failure() error {
	st.c.mu.Lock()
	defer st.c.mu.Unlock()
	if st.failed != nil {
		return st.failed
	}
	return net.ErrClosed
}

func (st *h2stream) Read(b []byte) (int, error) {
	for {
		st.rmu.Lock()
		if n := st.buf.read(b); n > 0 {
			st.rmu.Unlock()
			st.in.Add(int64(n))
			st.c.returnWindow(st, int64(n))
			return n, nil
		}
		err := st.rerr
		st.rmu.Unlock()
		if err != nil {
			return 0, err
		}
		if err := st.waitReadable(); err != nil {
			return 0, err
		}
	}
}

// waitReadable waits for data, the stream's end or the read deadline.
func (st *h2stream) waitReadable() error {
	st.dmu.Lock()
	if st.dwake == nil {
		st.dwake = make(chan struct{}) // SetReadDeadline closes it
	}
	dl, dwake := st.deadline, st.dwake
	st.dmu.Unlock()
	if !dl.IsZero() && !time.Now().Before(dl) {
		return os.ErrDeadlineExceeded
	}
	select {
	case <-st.readable:
	case <-dwake: // the deadline changed or passed
	}
	return nil
}

func (st *h2stream) Write(b []byte) (int, error) {
	st.wmu.Lock()
	defer st.wmu.Unlock()
	c := st.c
	n := 0
	for len(b) > 0 {
		c.mu.Lock()
		for {
			if st.failed != nil {
				err := st.failed
				c.mu.Unlock()
				return n, err
			}
			if st.sentEnd || st.closed {
				c.mu.Unlock()
				return n, net.ErrClosed
			}
			if c.closed {
				c.mu.Unlock()
				return n, errConnClosed
			}
			if c.sendWindow > 0 && st.sendWindow > 0 {
				break
			}
			c.cond.Wait()
		}
		k := int64(min(len(b), c.peerMaxFrame))
		k = min(k, c.sendWindow, st.sendWindow)
		c.sendWindow -= k
		st.sendWindow -= k
		c.mu.Unlock()
		chunk := b[:k]
		if err := c.write(func() { c.wbuf = appendFrame(c.wbuf, http2.FrameData, 0, st.id, chunk) }); err != nil {
			return n, err
		}
		n += int(k)
		b = b[k:]
	}
	st.out.Add(int64(n))
	return n, nil
}

// CloseWrite sends END_STREAM: the peer reads EOF; this side still reads.
func (st *h2stream) CloseWrite() error {
	st.wmu.Lock()
	defer st.wmu.Unlock()
	c := st.c
	c.mu.Lock()
	if st.sentEnd || st.failed != nil {
		c.mu.Unlock()
		return nil
	}
	st.sentEnd = true
	done := st.recvEnd
	c.mu.Unlock()
	err := c.write(func() { c.wbuf = appendFrame(c.wbuf, http2.FrameData, flagEndStream, st.id, nil) })
	if done {
		st.cancel()
		c.forget(st)
	}
	return err
}

// respond answers a request (server): status and header pairs, END_STREAM if end.
func (st *h2stream) respond(status int, end bool, fields ...string) error {
	c := st.c
	c.mu.Lock()
	if st.failed != nil {
		err := st.failed
		c.mu.Unlock()
		return err
	}
	if end {
		st.sentEnd = true
	}
	c.mu.Unlock()
	all := append([]string{":status", strconv.Itoa(status)}, fields...)
	err := c.write(func() { c.encodeHeaders(st.id, end, all...) })
	if end {
		// A refusal ends the stream both ways: what the peer sends is not read
		// (RST_STREAM NO_ERROR, RFC 9113 section 8.1).
		st.fail(&h2Error{code: http2.ErrCodeNo, why: "answered"}, true)
		st.Close()
	}
	return err
}

// Close ends the stream: both ways ended, it is forgotten; otherwise it is reset.
func (st *h2stream) Close() error {
	c := st.c
	c.mu.Lock()
	if st.closed {
		c.mu.Unlock()
		return nil
	}
	st.closed = true
	clean := st.sentEnd && st.recvEnd
	c.cond.Broadcast()
	c.mu.Unlock()
	// What nobody will read goes back to the connection's window, or every stream
	// closed with bytes unread would shrink it for the others until it stalled.
	st.rmu.Lock()
	st.dropped = true
	n := st.buf.discard()
	st.rmu.Unlock()
	if n > 0 {
		c.returnWindow(nil, int64(n))
	}
	if clean {
		st.cancel()
		c.forget(st)
		return nil
	}
	st.fail(net.ErrClosed, true)
	return nil
}

func (st *h2stream) LocalAddr() net.Addr  { return st.local }
func (st *h2stream) RemoteAddr() net.Addr { return st.remote }

func (st *h2stream) SetDeadline(t time.Time) error { return st.SetReadDeadline(t) }

// SetReadDeadline wakes a Read in progress, which then honours t. net/http's
// server sets one in the past to stop a background read between requests, then
// clears it: the stream carries on.
func (st *h2stream) SetReadDeadline(t time.Time) error {
	st.dmu.Lock()
	defer st.dmu.Unlock()
	if st.dtimer != nil {
		st.dtimer.Stop()
		st.dtimer = nil
	}
	st.deadline = t
	// A Read waiting now, with or without a deadline, wakes and looks again.
	if st.dwake != nil {
		close(st.dwake)
	}
	wake := make(chan struct{})
	st.dwake = wake
	if d := time.Until(t); !t.IsZero() && d > 0 {
		st.dtimer = time.AfterFunc(d, func() {
			st.dmu.Lock()
			defer st.dmu.Unlock()
			if st.dwake == wake {
				close(wake)
				st.dwake = make(chan struct{})
			}
		})
	}
	return nil
}

// SetWriteDeadline does nothing: flow control, not a deadline, bounds a write,
// and nothing that writes to a stream sets one.
func (st *h2stream) SetWriteDeadline(time.Time) error { return nil }

// recvChunk is the size of a receive buffer's chunks: a stream holds none while
// its reader keeps up, and as many as flow control lets the peer send ahead.
const recvChunk = 32 << 10

var recvChunks = sync.Pool{New: func() any { b := make([]byte, 0, recvChunk); return &b }}

// recvBuf is a stream's received bytes not yet read, in pooled chunks, so neither a
// burst nor a slow reader makes it grow by copying.
type recvBuf struct {
	chunks []*[]byte
	off    int // read offset into chunks[0]
}

func (r *recvBuf) empty() bool { return len(r.chunks) == 0 }

func (r *recvBuf) write(p []byte) {
	for len(p) > 0 {
		if len(r.chunks) == 0 || len(*r.chunks[len(r.chunks)-1]) == recvChunk {
			r.chunks = append(r.chunks, recvChunks.Get().(*[]byte))
		}
		last := r.chunks[len(r.chunks)-1]
		n := min(len(p), recvChunk-len(*last))
		*last = append(*last, p[:n]...)
		p = p[n:]
	}
}

// discard empties the buffer and says how many bytes it held.
func (r *recvBuf) discard() int {
	n := -r.off
	for _, c := range r.chunks {
		n += len(*c)
		*c = (*c)[:0]
		recvChunks.Put(c)
	}
	r.chunks, r.off = nil, 0
	return n
}

func (r *recvBuf) read(b []byte) int {
	n := 0
	for n < len(b) && len(r.chunks) > 0 {
		first := r.chunks[0]
		k := copy(b[n:], (*first)[r.off:])
		n += k
		r.off += k
		if r.off < len(*first) {
			break
		}
		// Used up: back to the pool, even the tail (a later write takes a fresh one).
		*first = (*first)[:0]
		recvChunks.Put(first)
		m := copy(r.chunks, r.chunks[1:])
		r.chunks[m] = nil
		r.chunks = r.chunks[:m]
		r.off = 0
	}
	return n
}
