package proxy

import (
	"bytes"
	"testing"

	"github.com/ferrymesh/ferry/api/admin"
)

// FuzzClassify checks protocol detection on a client's first bytes as detect feeds
// them, one read at a time: a verdict, once given for a prefix, never changes as
// more bytes arrive; "need more" is given only without a verdict; HTTP/2 only for
// the preface, HTTP/1 only for a request line with a version.
func FuzzClassify(f *testing.F) {
	for _, s := range []string{
		"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
		"GET / HTTP/1.0\n",
		"POST /x?y HTTP/1.1\r\n",
		"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
		"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04",
		"PRI * HTTP/1.1\r\n",
		"\x16\x03\x01\x02\x00\x01",
		"SSH-2.0-OpenSSH_9.6\r\n",
		"GET  HTTP/1.1\r\n",
		"GET / HTTP/2.0\r\n",
		"GET /\r\n",
		"CONNECT a:1 HTTP/1.1\r\n",
	} {
		f.Add([]byte(s), uint8(3))
	}
	f.Fuzz(func(t *testing.T, b []byte, step uint8) {
		if step == 0 {
			step = 1
		}
		var verdict admin.Protocol
		at := -1
		for n := 1; n <= len(b); n += int(step) {
			proto, more := classify(b[:n])
			if more {
				if proto != "" {
					t.Fatalf("classify(%q) = %q but wants more bytes", b[:n], proto)
				}
				if at >= 0 {
					t.Fatalf("classify(%q) wants more bytes after classify(%q) = %q", b[:n], b[:at], verdict)
				}
				continue
			}
			switch proto {
			case admin.TCP, admin.HTTP1, admin.HTTP2:
			default:
				t.Fatalf("classify(%q) = %q, no protocol and no more wanted", b[:n], proto)
			}
			if at < 0 {
				verdict, at = proto, n
			} else if proto != verdict {
				t.Fatalf("classify(%q) = %q, but its prefix %q was %q", b[:n], proto, b[:at], verdict)
			}
		}
		if at < 0 {
			return
		}
		seen := b[:at]
		switch verdict {
		case admin.HTTP2:
			if !bytes.HasPrefix(seen, h2Preface) {
				t.Fatalf("HTTP/2 without the preface: %q", seen)
			}
		case admin.HTTP1:
			line, _, _ := bytes.Cut(seen, []byte("\n"))
			method, rest, ok := bytes.Cut(line, []byte(" "))
			target, version, ok2 := bytes.Cut(rest, []byte(" "))
			if !ok || !ok2 || len(method) == 0 || len(target) == 0 || !bytes.HasPrefix(version, []byte("HTTP/1.")) {
				t.Fatalf("HTTP/1 for %q, which is no request line", seen)
			}
		}
	})
}
