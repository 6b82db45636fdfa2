// Package h2attack sends the known HTTP/2 attacks on a server, frame by frame, for
// tests that prove Ferry's servers contain them: rapid reset (CVE-2023-44487),
// CONTINUATION flood (CVE-2023-45288), PING and SETTINGS floods (CVE-2019-9512,
// CVE-2019-9515), an HPACK bomb, and more streams than the server allows. Each
// attack is bounded in frames and time and returns what the server answered.
package h2attack

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// Request is what each attacking stream asks for: an ordinary request (Method,
// Scheme, Authority, Path) or, with Method CONNECT and no Scheme and Path, a tunnel.
type Request struct {
	Method, Scheme, Authority, Path string
}

// Outcome is what the server did with an attack.
type Outcome struct {
	// GoAway is set when the server sent GOAWAY; GoAwayCode is its error code.
	GoAway     bool
	GoAwayCode http2.ErrCode
	// Closed: the connection ended (after GOAWAY or without).
	Closed bool
	// Resets counts the RST_STREAM frames by error code.
	Resets map[http2.ErrCode]int
	// Statuses counts the responses by :status.
	Statuses map[string]int
	// Written is how many attack frames were written before the server stopped
	// taking them.
	Written int
}

func (o Outcome) String() string {
	return fmt.Sprintf("goaway=%v(%v) closed=%v resets=%v statuses=%v written=%d", o.GoAway, o.GoAwayCode, o.Closed, o.Resets, o.Statuses, o.Written)
}

// conn is one attacking HTTP/2 connection: the preface and SETTINGS are sent,
// and a reader collects the server's frames into the outcome.
type conn struct {
	c    net.Conn
	w    *bufio.Writer
	fr   *http2.Framer
	wmu  sync.Mutex
	enc  *hpack.Encoder
	hbuf bytes.Buffer

	mu    sync.Mutex
	out   Outcome
	done  chan struct{}
	noAck bool // set before read starts: SETTINGS go unacknowledged
}

func start(c net.Conn) (*conn, error) {
	if _, err := io.WriteString(c, http2.ClientPreface); err != nil {
		return nil, fmt.Errorf("write preface: %w", err)
	}
	w := bufio.NewWriterSize(c, 64<<10)
	a := &conn{c: c, w: w, fr: http2.NewFramer(w, c), done: make(chan struct{}),
		out: Outcome{Resets: map[http2.ErrCode]int{}, Statuses: map[string]int{}}}
	a.enc = hpack.NewEncoder(&a.hbuf)
	a.fr.ReadMetaHeaders = hpack.NewDecoder(64<<10, nil)
	a.fr.MaxHeaderListSize = 1 << 20
	if err := a.fr.WriteSettings(); err != nil {
		return nil, fmt.Errorf("write settings: %w", err)
	}
	return a, nil
}

// read collects the server's frames until the connection ends.
func (a *conn) read() {
	defer close(a.done)
	for {
		f, err := a.fr.ReadFrame()
		if err != nil {
			a.mu.Lock()
			a.out.Closed = true
			a.mu.Unlock()
			return
		}
		a.mu.Lock()
		switch f := f.(type) {
		case *http2.GoAwayFrame:
			a.out.GoAway, a.out.GoAwayCode = true, f.ErrCode
		case *http2.RSTStreamFrame:
			a.out.Resets[f.ErrCode]++
		case *http2.MetaHeadersFrame:
			a.out.Statuses[f.PseudoValue("status")]++
		case *http2.SettingsFrame:
			if !f.IsAck() && !a.noAck {
				a.wmu.Lock()
				if a.fr.WriteSettingsAck() == nil {
					_ = a.w.Flush()
				}
				a.wmu.Unlock()
			}
		}
		a.mu.Unlock()
	}
}

// header encodes r's pseudo-headers and extra fields as one header block.
func (a *conn) header(r Request, extra ...hpack.HeaderField) []byte {
	a.hbuf.Reset()
	a.enc.WriteField(hpack.HeaderField{Name: ":method", Value: r.Method})
	if r.Scheme != "" {
		a.enc.WriteField(hpack.HeaderField{Name: ":scheme", Value: r.Scheme})
	}
	a.enc.WriteField(hpack.HeaderField{Name: ":authority", Value: r.Authority})
	if r.Path != "" {
		a.enc.WriteField(hpack.HeaderField{Name: ":path", Value: r.Path})
	}
	for _, f := range extra {
		a.enc.WriteField(f)
	}
	return append([]byte(nil), a.hbuf.Bytes()...)
}

// finish waits up to wait for the server to end the connection, then closes it
// and returns the outcome.
func (a *conn) finish(wait time.Duration, written int) Outcome {
	select {
	case <-a.done:
	case <-time.After(wait):
	}
	a.c.Close()
	<-a.done
	a.mu.Lock()
	defer a.mu.Unlock()
	a.out.Written = written
	return a.out
}

// run starts an attack on c, writes frames with write until it returns false or
// fails, and waits up to wait for the server's answer. A flood writes in batches
// and reads nothing until it is over, so the server's answers back up.
func run(c net.Conn, wait time.Duration, flood bool, write func(a *conn, i int) (bool, error)) (Outcome, error) {
	a, err := start(c)
	if err != nil {
		return Outcome{}, err
	}
	if !flood {
		if err := a.w.Flush(); err != nil {
			return Outcome{}, fmt.Errorf("write settings: %w", err)
		}
		go a.read()
	}
	n := 0
	for {
		a.wmu.Lock()
		more, err := write(a, n)
		if err == nil && (!flood || n%1024 == 0 || !more) {
			err = a.w.Flush()
		}
		a.wmu.Unlock()
		if err != nil || !more {
			break // the server closed the connection, or the attack is over
		}
		n++
	}
	if flood {
		go a.read()
	}
	return a.finish(wait, n), nil
}

// RapidReset opens n streams with r, resetting each at once.
func RapidReset(c net.Conn, r Request, n int, wait time.Duration) (Outcome, error) {
	return run(c, wait, false, func(a *conn, i int) (bool, error) {
		if i == n {
			return false, nil
		}
		id := uint32(2*i + 1)
		if err := a.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: a.header(r), EndHeaders: true, EndStream: true}); err != nil {
			return false, err
		}
		return true, a.fr.WriteRSTStream(id, http2.ErrCodeCancel)
	})
}

// ContinuationFlood sends one HEADERS without END_HEADERS and then up to n
// CONTINUATION frames of 16 KiB of header fields each, never ending the block.
func ContinuationFlood(c net.Conn, r Request, n int, wait time.Duration) (Outcome, error) {
	var frag []byte
	return run(c, wait, false, func(a *conn, i int) (bool, error) {
		switch {
		case i == 0:
			return true, a.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: a.header(r), EndHeaders: false})
		case i > n:
			return false, nil
		}
		if frag == nil {
			var b bytes.Buffer
			enc := hpack.NewEncoder(&b)
			for b.Len() < 16<<10-128 {
				enc.WriteField(hpack.HeaderField{Name: "x-flood", Value: strings.Repeat("a", 100), Sensitive: true})
			}
			frag = b.Bytes()
		}
		return true, a.fr.WriteContinuation(1, false, frag)
	})
}

// PingFlood sends n PINGs without reading the acknowledgements, which back up in
// the server.
func PingFlood(c net.Conn, n int, wait time.Duration) (Outcome, error) {
	return run(c, wait, true, func(a *conn, i int) (bool, error) {
		if i == n {
			return false, nil
		}
		return true, a.fr.WritePing(false, [8]byte{byte(i), byte(i >> 8), byte(i >> 16)})
	})
}

// SettingsFlood sends n SETTINGS frames, each of which the server must
// acknowledge, without reading the acknowledgements.
func SettingsFlood(c net.Conn, n int, wait time.Duration) (Outcome, error) {
	return run(c, wait, true, func(a *conn, i int) (bool, error) {
		if i == n {
			return false, nil
		}
		return true, a.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: uint32(65535 + i%2)})
	})
}

// HPACKBomb sends one request whose header list decodes to about decoded bytes
// from a block of a few KiB: one large value entered in the dynamic table, then
// referenced by index, one byte each.
func HPACKBomb(c net.Conn, r Request, decoded int, wait time.Duration) (Outcome, error) {
	big := hpack.HeaderField{Name: "x-bomb", Value: strings.Repeat("b", 3000)}
	fields := []hpack.HeaderField{big}
	for n := len(big.Value); n < decoded; n += len(big.Value) {
		fields = append(fields, big) // the encoder refers to the table entry
	}
	return Send(c, r, fields, wait)
}

// Send sends one request with the extra header fields, in one HEADERS frame.
func Send(c net.Conn, r Request, fields []hpack.HeaderField, wait time.Duration) (Outcome, error) {
	return run(c, wait, false, func(a *conn, i int) (bool, error) {
		if i == 1 {
			return false, nil
		}
		block := a.header(r, fields...)
		if len(block) > 16<<10 {
			return false, errors.New("header block larger than one frame")
		}
		return true, a.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block, EndHeaders: true, EndStream: true})
	})
}

// ManyStreams opens n streams with r and keeps them open (no END_STREAM), so
// the server must refuse those past its limit.
func ManyStreams(c net.Conn, r Request, n int, wait time.Duration) (Outcome, error) {
	return run(c, wait, false, func(a *conn, i int) (bool, error) {
		if i == n {
			return false, nil
		}
		return true, a.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: uint32(2*i + 1), BlockFragment: a.header(r), EndHeaders: true})
	})
}

// StalledHeaders acknowledges the server's SETTINGS, then sends HEADERS without
// END_HEADERS and nothing more: inside a header block the client may send no
// other frame, so it cannot answer the server's PINGs either.
func StalledHeaders(c net.Conn, r Request, wait time.Duration) (Outcome, error) {
	a, err := start(c)
	if err != nil {
		return Outcome{}, err
	}
	if err := a.w.Flush(); err != nil {
		return Outcome{}, fmt.Errorf("write settings: %w", err)
	}
	for {
		f, err := a.fr.ReadFrame()
		if err != nil {
			return Outcome{}, fmt.Errorf("read settings: %w", err)
		}
		if sf, ok := f.(*http2.SettingsFrame); ok && !sf.IsAck() {
			break
		}
	}
	a.noAck = true
	go a.read()
	a.wmu.Lock()
	err = a.fr.WriteSettingsAck()
	if err == nil {
		err = a.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: a.header(r), EndHeaders: false})
	}
	if err == nil {
		err = a.w.Flush()
	}
	a.wmu.Unlock()
	if err != nil {
		return Outcome{}, fmt.Errorf("write headers: %w", err)
	}
	return a.finish(wait, 1), nil
}

// Case is one attack with the check that says the server contained it.
type Case struct {
	Name      string
	Run       func(c net.Conn) (Outcome, error)
	Contained func(o Outcome) bool
}

// Cases are the flood and stream attacks on a server that allows maxStreams
// streams a connection, each stream asking r. Floods give the server 5 s: it
// closes the connection, or stops reading it (its answers cannot be written),
// and either way the flood cannot be sent.
func Cases(r Request, maxStreams int) []Case {
	const flood = 1_000_000
	floodCase := func(name string, send func(net.Conn, int, time.Duration) (Outcome, error)) Case {
		return Case{name, func(c net.Conn) (Outcome, error) {
			c.SetDeadline(time.Now().Add(5 * time.Second))
			return send(c, flood, 5*time.Second)
		}, func(o Outcome) bool { return o.Closed && o.Written < flood }}
	}
	return []Case{
		{"rapid reset", func(c net.Conn) (Outcome, error) { return RapidReset(c, r, 5000, 2*time.Second) },
			// Go answers GOAWAY ENHANCE_YOUR_CALM once more than 4×max reset
			// streams wait for handlers; otherwise it keeps up, each reset
			// ending its handler.
			func(o Outcome) bool { return !o.GoAway || o.GoAwayCode == http2.ErrCodeEnhanceYourCalm }},
		{"continuation flood", func(c net.Conn) (Outcome, error) { return ContinuationFlood(c, r, 10000, 5*time.Second) },
			func(o Outcome) bool { return o.Closed && o.Written < 10000 }},
		floodCase("ping flood", PingFlood),
		floodCase("settings flood", SettingsFlood),
		{"hpack bomb", func(c net.Conn) (Outcome, error) { return HPACKBomb(c, r, 200*3000, time.Second) },
			func(o Outcome) bool { return o.Statuses["431"] == 1 }},
		{"many streams", func(c net.Conn) (Outcome, error) { return ManyStreams(c, r, 100, 2*time.Second) },
			func(o Outcome) bool {
				return o.Resets[http2.ErrCodeRefusedStream]+o.Resets[http2.ErrCodeProtocol] >= 100-maxStreams || o.GoAway
			}},
	}
}

// HeapInUse is the heap in use after a collection, for tests that bound what an
// attack makes the server hold.
func HeapInUse() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse
}

// Check runs the attack on conn and fails t unless the server contained it.
func (c Case) Check(t testing.TB, conn net.Conn) {
	t.Helper()
	out, err := c.Run(conn)
	if err != nil {
		t.Fatal(err)
	}
	t.Log(out)
	if !c.Contained(out) {
		t.Errorf("%s not contained: %v", c.Name, out)
	}
}

// WhileServing runs attack while innocent, one request of another client, runs
// again and again (at least once after the attack, so a short attack is still
// measured against one), and fails t if any innocent request failed or the heap
// in use grew by heapBound or more.
func WhileServing(t testing.TB, heapBound int64, attack func(), innocent func() error) {
	t.Helper()
	before := HeapInUse()
	stop := make(chan struct{})
	var ok, failed int
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				if ok > 0 {
					return
				}
			default:
			}
			if err := innocent(); err != nil {
				failed++
				t.Logf("innocent request: %v", err)
			} else {
				ok++
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()
	attack()
	grown := int64(HeapInUse()) - int64(before)
	close(stop)
	<-done
	t.Logf("heap grew by %d KiB during the attack; innocent requests: %d answered, %d failed", grown>>10, ok, failed)
	if failed != 0 {
		t.Errorf("innocent requests: %d failed", failed)
	}
	if grown >= heapBound {
		t.Errorf("heap grew by %d MiB, the bound is %d MiB", grown>>20, heapBound>>20)
	}
}
