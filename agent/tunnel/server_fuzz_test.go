package tunnel

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// FuzzConnectRequest feeds the tunnel server's stream handler arbitrary CONNECT
// requests (method, :authority, Ferry-Protocol) on a listener at local: a stream
// reaches the app (a dial or ServeHTTP) only for CONNECT to a unicast ip:port that
// is the listener's own pod, with exactly the authority's address; everything else
// is refused with a status and a Ferry-Error reason, never hung.
func FuzzConnectRequest(f *testing.F) {
	for _, s := range [][4]string{
		{"CONNECT", "10.0.0.1:8080", "10.0.0.1", ""},
		{"CONNECT", "10.0.0.1:8080", "10.0.0.1", "http"},
		{"CONNECT", "10.0.0.2:8080", "10.0.0.1", ""},
		{"CONNECT", "[::ffff:10.0.0.1]:80", "10.0.0.1", ""},
		{"CONNECT", "[fd00::1%eth0]:80", "fd00::1", ""},
		{"CONNECT", "[fd00::1]:80", "::", "HTTP"},
		{"CONNECT", "10.0.0.1:0", "10.0.0.1", ""},
		{"CONNECT", "0.0.0.0:80", "", ""},
		{"CONNECT", "224.0.0.1:80", "", ""},
		{"CONNECT", "web.shop:80", "10.0.0.1", ""},
		{"CONNECT", "10.0.0.1", "10.0.0.1", ""},
		{"CONNECT", "10.0.0.1:65536", "10.0.0.1", ""},
		{"CONNECT", "010.0.0.1:80", "10.0.0.1", ""},
		{"GET", "10.0.0.1:8080", "10.0.0.1", ""},
		{"connect", "10.0.0.1:8080", "10.0.0.1", ""},
	} {
		f.Add(s[0], s[1], s[2], s[3])
	}
	f.Fuzz(func(t *testing.T, method, authority, local, protocol string) {
		var dialled, served []netip.AddrPort
		var ended []StreamInfo
		s, err := NewServer(ServerConfig{
			TLS: func(net.Addr) (*tls.Config, error) { return &tls.Config{}, nil },
			Dial: func(_ context.Context, target netip.AddrPort) (net.Conn, error) {
				dialled = append(dialled, target)
				return nil, errors.New("connection refused")
			},
			ServeHTTP: func(si StreamInfo, c net.Conn) {
				served = append(served, si.Target)
				c.Close()
			},
			OnStream: func(si StreamInfo) { ended = append(ended, si) },
		})
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		la, _ := netip.ParseAddr(local) // invalid: a listener on no particular address
		ci := &connInfo{peerID: "spiffe://cluster.local/ns/a/sa/a", remote: netip.MustParseAddrPort("10.0.0.9:40000"), local: netip.AddrPortFrom(la, 15008)}
		h := &h2headers{method: method, authority: authority}
		if protocol != "" {
			h.fields = append(h.fields, hpack.HeaderField{Name: protocolField, Value: protocol})
		}
		st, answer := pipeStream(t)
		s.handle(st, h, ci)
		w := answer()

		if len(ended) != 1 || ended[0].Status != w.code {
			t.Fatalf("stream reports %+v for status %d", ended, w.code)
		}
		reached := append(dialled, served...)
		if len(reached) > 1 {
			t.Fatalf("one stream reached the app %d times", len(reached))
		}
		if len(reached) == 0 {
			if w.code != http.StatusBadRequest && w.code != http.StatusForbidden {
				t.Fatalf("refused with %d", w.code)
			}
			if w.reason == "" {
				t.Fatalf("refused with %d and no reason", w.code)
			}
			return
		}
		target := reached[0]
		want, err := netip.ParseAddrPort(authority)
		switch {
		case method != http.MethodConnect:
			t.Fatalf("%s request reached the app", method)
		case err != nil:
			t.Fatalf("authority %q reached %s though it is no ip:port", authority, target)
		case target != netip.AddrPortFrom(want.Addr().Unmap(), want.Port()):
			t.Fatalf("authority %q reached %s", authority, target)
		case target.Port() == 0 || target.Addr().IsUnspecified() || target.Addr().IsMulticast() || target.Addr().Is4In6():
			t.Fatalf("authority %q reached %s", authority, target)
		case la.IsValid() && !la.IsUnspecified() && la.Unmap() != target.Addr():
			t.Fatalf("listener %s reached another pod's %s", la, target)
		case (len(served) == 1) != (protocol == ProtocolHTTP):
			t.Fatalf("Ferry-Protocol %q: served as HTTP %v", protocol, len(served) == 1)
		case len(dialled) == 1 && (w.code != http.StatusBadGateway || w.reason == ""):
			t.Fatalf("refused dial answered %d %q", w.code, w.reason)
		case len(served) == 1 && w.code != http.StatusOK:
			t.Fatalf("HTTP stream answered %d", w.code)
		}
	})
}

// answer is the response a stream was given.
type answer struct {
	code   int
	reason string
}

// pipeStream is a server stream on a connection over net.Pipe, without TLS, and a
// function that returns the response the stream was given, as a client reads it.
func pipeStream(t *testing.T) (*h2stream, func() answer) {
	t.Helper()
	client, server := net.Pipe()
	t.Cleanup(func() { client.Close(); server.Close() })
	answers := make(chan answer, 1)
	go func() {
		fr := http2.NewFramer(client, client)
		fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
		for {
			f, err := fr.ReadFrame()
			if err != nil {
				return
			}
			if mh, ok := f.(*http2.MetaHeadersFrame); ok {
				var a answer
				fmt.Sscan(mh.PseudoValue("status"), &a.code)
				for _, f := range mh.RegularFields() {
					if f.Name == reasonField {
						a.reason = f.Value
					}
				}
				answers <- a
			}
		}
	}()
	c, err := newH2conn(server, newBatchConn(server), h2config{server: true, maxStreams: 8, maxHeaderBytes: 16 << 10, headerTable: 4096, readIdle: time.Minute, pingTimeout: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.close(errConnClosed) })
	c.mu.Lock()
	st := c.newStreamLocked(1)
	c.maxPeerID = 1
	c.mu.Unlock()
	return st, func() answer {
		select {
		case a := <-answers:
			return a
		case <-time.After(10 * time.Second):
			t.Fatal("no answer")
			return answer{}
		}
	}
}
