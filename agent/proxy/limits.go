// This file holds the limits and timeouts of the proxy's HTTP server (what one
// client connection may cost the node before it is refused or cut off), in one
// place, with their defaults.

package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"sync/atomic"
	"time"

	"github.com/ferrymesh/ferry/agent/tunnel"
	"github.com/ferrymesh/ferry/api/admin"
)

// Limits bounds the proxy's HTTP server (pods' connections to Service ports and the
// HTTP streams of inbound tunnels) and the pods' tunnel servers. Each zero field
// takes its default (DefaultLimits). Go's net/http already refuses, before any of
// this: two Content-Lengths that differ, a Transfer-Encoding other than one
// "chunked" (501), a chunk line ending in a bare LF, chunk extensions larger than
// their data, control characters in the request line and header values; and it
// forwards a request that had both Content-Length and Transfer-Encoding with the
// Content-Length removed, so the app reads the body as the proxy did.
type Limits struct {
	// MaxHeaderBytes bounds a request's line and header block (HTTP/1.1: Go adds
	// 4 KiB of slack for the request line; HTTP/2: the decoded header list, which
	// also bounds an HPACK bomb); past it the answer is 431.
	MaxHeaderBytes int
	// MaxHeaderCount bounds a request's header fields (each value of a repeated
	// header counts); past it the answer is 431.
	MaxHeaderCount int
	// ReadHeaderTimeout bounds the time from a request's first byte to the end of
	// its headers (HTTP/1.1): a slow client's connection is closed (slowloris).
	ReadHeaderTimeout time.Duration
	// BodyIdleTimeout: an HTTP/1.1 request body from which no byte arrives for this
	// long fails, and its connection is closed. HTTP/2 bodies are not bounded so:
	// a gRPC stream may rightly be quiet for hours, and its cost is one of
	// MaxConcurrentStreams under flow control.
	BodyIdleTimeout time.Duration
	// IdleTimeout closes a client connection with no request in progress for this
	// long (HTTP/1.1 keep-alive, HTTP/2 with no open stream).
	IdleTimeout time.Duration
	// MaxConcurrentStreams is the streams one HTTP/2 client connection may have
	// open; Go's server answers a rapid reset flood past 4× this with GOAWAY
	// ENHANCE_YOUR_CALM.
	MaxConcurrentStreams int
	// MaxDecoderHeaderTableSize bounds the HPACK dynamic table an HTTP/2 client
	// may make the proxy keep.
	MaxDecoderHeaderTableSize int
	// Tunnel is the pods' tunnel servers' (port 15008).
	Tunnel tunnel.ServerLimits
}

// DefaultLimits are the limits of a proxy whose Config sets none: Envoy's
// defaults where it has them (60 KiB of headers, 100 headers, 5 minutes of stream
// idleness, 1 hour of connection idleness).
func DefaultLimits() Limits {
	return Limits{
		MaxHeaderBytes:            60 << 10,
		MaxHeaderCount:            100,
		ReadHeaderTimeout:         10 * time.Second,
		BodyIdleTimeout:           5 * time.Minute,
		IdleTimeout:               time.Hour,
		MaxConcurrentStreams:      250,
		MaxDecoderHeaderTableSize: 4 << 10,
		Tunnel:                    tunnel.DefaultServerLimits(),
	}
}

// withDefaults fills the zero fields of l from DefaultLimits; Tunnel's are the
// tunnel server's business.
func (l Limits) withDefaults() Limits {
	d := DefaultLimits()
	set := func(v *int, def int) {
		if *v <= 0 {
			*v = def
		}
	}
	setD := func(v *time.Duration, def time.Duration) {
		if *v <= 0 {
			*v = def
		}
	}
	set(&l.MaxHeaderBytes, d.MaxHeaderBytes)
	set(&l.MaxHeaderCount, d.MaxHeaderCount)
	set(&l.MaxConcurrentStreams, d.MaxConcurrentStreams)
	set(&l.MaxDecoderHeaderTableSize, d.MaxDecoderHeaderTableSize)
	setD(&l.ReadHeaderTimeout, d.ReadHeaderTimeout)
	setD(&l.BodyIdleTimeout, d.BodyIdleTimeout)
	setD(&l.IdleTimeout, d.IdleTimeout)
	return l
}

// apply sets the limits on the proxy's HTTP server. No ReadTimeout or
// WriteTimeout: those bound a whole request, and a WebSocket, a gRPC stream or a
// long download rightly lasts.
func (l Limits) apply(srv *http.Server) {
	srv.MaxHeaderBytes = l.MaxHeaderBytes
	srv.ReadHeaderTimeout = l.ReadHeaderTimeout
	srv.IdleTimeout = l.IdleTimeout
	srv.HTTP2 = &http.HTTP2Config{
		MaxConcurrentStreams:      l.MaxConcurrentStreams,
		MaxDecoderHeaderTableSize: l.MaxDecoderHeaderTableSize,
	}
}

// limitRequest refuses a request past the header count limit (431), closes an
// HTTP/1.1 connection after a chunked request, and bounds the idleness of an
// HTTP/1.1 request's body; it returns the request to serve, nil when it answered.
func (p *Proxy) limitRequest(w http.ResponseWriter, r *http.Request, rec *Conn) *http.Request {
	lim := p.l7.limits
	n := 0
	for _, vs := range r.Header {
		n += len(vs)
	}
	if n > lim.MaxHeaderCount {
		rec.Verdict, rec.Reason = admin.VerdictDenied, admin.ReasonOther
		rec.Error = fmt.Sprintf("%d header fields, the limit is %d", n, lim.MaxHeaderCount)
		if r.ProtoMajor == 1 {
			w.Header().Set("Connection", "close")
		}
		meshAnswer(w, http.StatusRequestHeaderFieldsTooLarge, "too many header fields")
		return nil
	}
	if r.ProtoMajor == 1 && len(r.TransferEncoding) > 0 {
		// A chunked request is the one whose framing a component in front of the
		// proxy may have read otherwise (by a Content-Length Go dropped, say):
		// nothing after it on this connection is read, so nothing can be smuggled
		// behind it.
		w.Header().Set("Connection", "close")
	}
	if r.ProtoMajor == 1 && r.ContentLength != 0 && r.Body != nil && r.Body != http.NoBody {
		b := &requestBody{ReadCloser: r.Body, rc: http.NewResponseController(w), idle: lim.BodyIdleTimeout}
		r = r.WithContext(context.WithValue(r.Context(), requestBodyKey{}, b))
		r.Body = b
	}
	return r
}

type requestBodyKey struct{}

// bodyFailure is how the client's request body failed, if it did: a failed read
// on the connection also cancels the request, so the transport's error may be
// only that.
func bodyFailure(r *http.Request) *requestBodyError {
	if b, _ := r.Context().Value(requestBodyKey{}).(*requestBody); b != nil {
		return b.failed.Load()
	}
	return nil
}

// requestBody is an HTTP/1.1 request body whose every read must see a byte within
// idle: the connection's read deadline moves with each read. Go's server sets the
// connection's deadlines again before it reads the next request, so none is left
// behind for it. A failed read is a requestBodyError, which the transport returns
// as it is, so the client is told its body was at fault (upstreamError).
type requestBody struct {
	io.ReadCloser
	rc     *http.ResponseController
	idle   time.Duration
	failed atomic.Pointer[requestBodyError]
}

func (b *requestBody) Read(p []byte) (int, error) {
	_ = b.rc.SetReadDeadline(time.Now().Add(b.idle))
	n, err := b.ReadCloser.Read(p)
	switch {
	case err == io.EOF:
		// The body is done: the response may rightly take longer than idle, while
		// the server watches the connection for the client going away.
		_ = b.rc.SetReadDeadline(time.Time{})
	case err != nil:
		// The deadline stays: the server, which would read what is left of the
		// body before answering, gives up at once and closes the connection.
		be := &requestBodyError{err}
		b.failed.CompareAndSwap(nil, be)
		err = be
	}
	return n, err
}

// requestBodyError is a client's request body that could not be read: malformed
// (a bad chunk line, too much chunk extension) or too slow.
type requestBodyError struct{ err error }

func (e *requestBodyError) Error() string { return "read request body: " + e.err.Error() }
func (e *requestBodyError) Unwrap() error { return e.err }

// answer is the status and line the client gets.
func (e *requestBodyError) answer() (int, string) {
	if errors.Is(e.err, os.ErrDeadlineExceeded) {
		return http.StatusRequestTimeout, "request body timeout"
	}
	return http.StatusBadRequest, "malformed request body"
}

// handshakeRefused records a tunnel handshake into pod pd that its server refused
// (an expired certificate, another CA, none...): a denied inbound connection,
// reason tunnel, whose error starts with the handshake's typed reason.
func (p *Proxy) handshakeRefused(pd *pod, remote netip.AddrPort, he *tunnel.HandshakeError) {
	c := p.conns.open(Conn{
		Direction: admin.Inbound, Pod: pd.w.Name, Src: remote,
		Dst: netip.AddrPortFrom(pd.w.IPs[0], p.cfg.Ports.Tunnel), DstIdentity: pd.w.Identity, Security: admin.MTLS,
		Verdict: admin.VerdictDenied, Reason: admin.ReasonTunnel,
	})
	p.conns.end(c, 0, 0, he)
}
