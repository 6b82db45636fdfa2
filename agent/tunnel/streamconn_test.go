package tunnel

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"testing"

	"github.com/ferrymesh/ferry/internal/loopback"
)

// A stream that says it carries HTTP is served by ServeHTTP as a connection of its
// own: several requests on it, each answered, and a plain stream still goes to Dial.
func TestStreamOfHTTPRequests(t *testing.T) {
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		fmt.Fprintf(w, "%s %s %d", r.Method, r.URL.Path, len(body))
	})}
	served := make(chan StreamInfo, 1)
	e := newEnv(t, envOpt{serveHTTP: func(si StreamInfo, c net.Conn) {
		served <- si
		go srv.Serve(&oneConn{c: c})
	}})
	t.Cleanup(func() { srv.Close() })
	target := netip.MustParseAddrPort("127.0.0.1:8080")
	s, err := e.pool.Connect(t.Context(), e.src, serverID, e.tunnelAddr, target, ProtocolHTTP)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if si := <-served; si.Target != target || si.PeerID != clientID || !si.HTTP {
		t.Fatalf("ServeHTTP got %+v", si)
	}
	br := bufio.NewReader(s)
	for i := range 3 {
		fmt.Fprintf(s, "POST /r%d HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi", i)
		res, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(res.Body)
		if want := fmt.Sprintf("POST /r%d 2", i); string(body) != want {
			t.Fatalf("request %d: %q, want %q", i, body, want)
		}
	}
	// Without the header the stream is the app's byte stream, as before.
	app := e.connect(t, loopback.Serve(t, loopback.Echo))
	defer app.Close()
	fmt.Fprint(app, "ping")
	app.CloseWrite()
	if b, _ := io.ReadAll(app); string(b) != "ping" {
		t.Fatalf("plain stream: %q", b)
	}
}

// oneConn is a listener that yields one connection, then waits until closed.
type oneConn struct {
	c    net.Conn
	done chan struct{}
}

func (l *oneConn) Accept() (net.Conn, error) {
	if l.c != nil {
		c := l.c
		l.c, l.done = nil, make(chan struct{})
		return c, nil
	}
	<-l.done
	return nil, net.ErrClosed
}
func (l *oneConn) Close() error {
	if l.done != nil {
		select {
		case <-l.done:
		default:
			close(l.done)
		}
	}
	return nil
}
func (l *oneConn) Addr() net.Addr { return &net.TCPAddr{} }
