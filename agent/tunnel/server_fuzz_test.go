package tunnel

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"testing"
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
		r := (&http.Request{Method: method, Host: authority, Header: http.Header{}, Body: http.NoBody}).
			WithContext(context.WithValue(context.Background(), connInfoKey{}, ci))
		if protocol != "" {
			r.Header.Set(ProtocolHeader, protocol)
		}
		w := httptest.NewRecorder()
		s.handle(w, r)

		if len(ended) != 1 || ended[0].Status != w.Code {
			t.Fatalf("stream reports %+v for status %d", ended, w.Code)
		}
		reached := append(dialled, served...)
		if len(reached) > 1 {
			t.Fatalf("one stream reached the app %d times", len(reached))
		}
		if len(reached) == 0 {
			if w.Code != http.StatusBadRequest && w.Code != http.StatusForbidden {
				t.Fatalf("refused with %d", w.Code)
			}
			if w.Header().Get(ReasonHeader) == "" {
				t.Fatalf("refused with %d and no reason", w.Code)
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
		case len(dialled) == 1 && (w.Code != http.StatusBadGateway || w.Header().Get(ReasonHeader) == ""):
			t.Fatalf("refused dial answered %d %q", w.Code, w.Header().Get(ReasonHeader))
		case len(served) == 1 && w.Code != http.StatusOK:
			t.Fatalf("HTTP stream answered %d", w.Code)
		}
	})
}
