// This file detects, from a client's first bytes, whether a connection to an
// undeclared Service port speaks HTTP.

package proxy

import (
	"bufio"
	"bytes"
	"net"
	"time"

	"github.com/ferrymesh/ferry/api/admin"
)

const (
	// detectWait bounds how long the proxy waits for a client's first bytes on an
	// undeclared port: a server-first protocol (the client waits for a banner) must
	// not stall, so silence past it means TCP.
	detectWait = 100 * time.Millisecond
	// maxRequestLine is the longest HTTP/1.x request line detection reads; a longer
	// one is treated as TCP (net/http's own header limit is 1 MiB, but a request
	// line this long is not what an app sends).
	maxRequestLine = 8 << 10
)

var h2Preface = []byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")

// detect reads the client's first bytes through r (which keeps them for whoever
// reads next) and says whether they are HTTP/1.x or an HTTP/2 preface; anything
// else, an early EOF, or silence for wait, is TCP.
func detect(c net.Conn, r *bufio.Reader, wait time.Duration) admin.Protocol {
	if err := c.SetReadDeadline(time.Now().Add(wait)); err != nil {
		return admin.TCP
	}
	defer c.SetReadDeadline(time.Time{})
	n := 1
	for {
		_, err := r.Peek(n) // waits for n bytes; what arrived with them is buffered too
		if b, _ := r.Peek(r.Buffered()); len(b) > 0 {
			proto, more := classify(b)
			if !more {
				return proto
			}
		}
		if err != nil {
			return admin.TCP // silence, EOF, or a line too long for the buffer
		}
		n = r.Buffered() + 1
	}
}

// classify says what b, a client's first bytes, are; more when b is a prefix of
// something that could still turn out to be HTTP.
func classify(b []byte) (proto admin.Protocol, more bool) {
	if len(b) <= len(h2Preface) && bytes.HasPrefix(h2Preface, b) {
		if len(b) == len(h2Preface) {
			return admin.HTTP2, false
		}
		return "", true
	}
	if bytes.HasPrefix(b, h2Preface) {
		return admin.HTTP2, false
	}
	return classifyRequestLine(b)
}

// classifyRequestLine recognises "METHOD SP request-target SP HTTP/1.x CRLF" (RFC
// 9112 section 3), with a bare LF accepted at the end as net/http does.
func classifyRequestLine(b []byte) (admin.Protocol, bool) {
	i := 0
	for i < len(b) && isTokenChar(b[i]) {
		i++
	}
	switch {
	case i == len(b) && i < 32:
		return "", true // a method, so far
	case i == len(b):
		return admin.TCP, false // no method is this long
	case i == 0 || b[i] != ' ':
		return admin.TCP, false
	}
	rest := b[i+1:]
	sp := bytes.IndexByte(rest, ' ')
	if eol := bytes.IndexAny(rest, "\r\n"); eol >= 0 && (sp < 0 || eol < sp) {
		// The line ended inside the request target, whatever comes after: the
		// verdict must not depend on how the bytes were split into reads.
		return admin.TCP, false
	}
	if sp < 0 {
		return "", len(b) < maxRequestLine
	}
	if sp == 0 {
		return admin.TCP, false
	}
	version := rest[sp+1:]
	const v = "HTTP/1.x\r\n"
	for k := 0; k < len(version) && k < len(v); k++ {
		switch {
		case k == 7 && version[k] >= '0' && version[k] <= '9':
		case k == 8 && version[k] == '\n':
			return admin.HTTP1, false
		case k < len(v) && version[k] == v[k] && k != 7:
		default:
			return admin.TCP, false
		}
	}
	if len(version) >= len(v) {
		return admin.HTTP1, false
	}
	return "", true
}

// isTokenChar reports whether c may appear in a method (RFC 9110 tchar).
func isTokenChar(c byte) bool {
	switch {
	case c >= 'A' && c <= 'Z', c >= 'a' && c <= 'z', c >= '0' && c <= '9':
		return true
	}
	return bytes.IndexByte([]byte("!#$%&'*+-.^_`|~"), c) >= 0
}
