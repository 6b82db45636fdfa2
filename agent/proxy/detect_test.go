package proxy

import (
	"bufio"
	"net"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/api/admin"
)

func TestClassify(t *testing.T) {
	for _, tc := range []struct {
		in    string
		proto admin.Protocol
		more  bool
	}{
		{"GET / HTTP/1.1\r\n", admin.HTTP1, false},
		{"POST /upload?x=1 HTTP/1.0\r\nHost: a\r\n", admin.HTTP1, false},
		{"GET / HTTP/1.1\n", admin.HTTP1, false},
		{"OPTIONS * HTTP/1.1\r\n", admin.HTTP1, false},
		{"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", admin.HTTP2, false},
		{"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00", admin.HTTP2, false},
		{"PRI * HTTP/2", "", true},
		{"GET", "", true},
		{"GET /index", "", true},
		{"GET / HTTP/1.", "", true},
		{"GET / HTTP/1.1\r", "", true},
		{"GET / HTTP/2.0\r\n", admin.TCP, false},
		{"GET / FTP/1.1\r\n", admin.TCP, false},
		{"GET  / HTTP/1.1\r\n", admin.TCP, false},
		{"GET /\r\n", admin.TCP, false},
		{"hello\n", admin.TCP, false},
		{"\x16\x03\x01\x02\x00", admin.TCP, false}, // a TLS ClientHello
		{"*1\r\n$4\r\nPING\r\n", admin.TCP, false}, // redis
		{"ping", "", true},                         // could still be a method
	} {
		proto, more := classify([]byte(tc.in))
		if proto != tc.proto || more != tc.more {
			t.Errorf("classify(%q) = %q, %v; want %q, %v", tc.in, proto, more, tc.proto, tc.more)
		}
	}
}

// Detection waits for bytes a client sends in pieces, gives up on a silent client
// (a server-first protocol) after the bound, and leaves every byte for the next reader.
func TestDetect(t *testing.T) {
	for _, tc := range []struct {
		name   string
		chunks []string
		want   admin.Protocol
	}{
		{"request line in pieces", []string{"GE", "T /a HT", "TP/1.1\r\nHost: x\r\n\r\n"}, admin.HTTP1},
		{"h2 preface in pieces", []string{"PRI * HTTP", "/2.0\r\n\r\nSM\r\n\r\n"}, admin.HTTP2},
		{"echo client", []string{"ping\n"}, admin.TCP},
		{"silent client", nil, admin.TCP},
		{"request in one write", []string{"GET / HTTP/1.1\r\nHost: x\r\n\r\n"}, admin.HTTP1},
		{"stops half way", []string{"GET /"}, admin.TCP},
	} {
		t.Run(tc.name, func(t *testing.T) {
			client, server := net.Pipe()
			defer client.Close()
			defer server.Close()
			go func() {
				for _, c := range tc.chunks {
					client.Write([]byte(c))
					time.Sleep(5 * time.Millisecond)
				}
			}()
			r := bufio.NewReaderSize(server, 16<<10)
			start := time.Now()
			got := detect(server, r, time.Second)
			if got != tc.want {
				t.Fatalf("detect = %q, want %q", got, tc.want)
			}
			// Bytes that decide are decided on when they arrive, never at the bound
			// (only silence and a request line cut short wait for it).
			if d := time.Since(start); tc.name != "silent client" && tc.name != "stops half way" && d > 500*time.Millisecond {
				t.Fatalf("detect took %v: it waited for the bound", d)
			}
			var all string
			for _, c := range tc.chunks {
				all += c
			}
			if tc.want == admin.TCP {
				return // the rest may still be in flight
			}
			peeked, _ := r.Peek(r.Buffered())
			if string(peeked) != all[:len(peeked)] || len(peeked) == 0 {
				t.Fatalf("kept %q, want a prefix of %q", peeked, all)
			}
		})
	}
}
