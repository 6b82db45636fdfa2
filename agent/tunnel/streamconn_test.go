package tunnel

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"testing"
	"time"

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

// net/http's server stops its background read before a hijack (a WebSocket
// upgrade) by setting a read deadline in the past on a connection that had none,
// and waits for that Read to return: a Read waiting without a deadline must wake,
// and the stream must read on once the deadline is cleared.
func TestStreamDeadlineWakesWaitingRead(t *testing.T) {
	st, _ := pipeStream(t)
	done := make(chan error, 1)
	go func() {
		_, err := st.Read(make([]byte, 1))
		done <- err
	}()
	time.Sleep(50 * time.Millisecond) // the Read is waiting
	st.SetReadDeadline(time.Unix(1, 0))
	select {
	case err := <-done:
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("Read woken with %v, want a deadline error", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a Read waiting without a deadline was not woken by one set in the past")
	}
	st.SetReadDeadline(time.Time{})
	st.deliver([]byte("x"), 1, false)
	b := make([]byte, 1)
	if n, err := st.Read(b); n != 1 || err != nil || b[0] != 'x' {
		t.Fatalf("after the deadline was cleared: %d %q %v", n, b, err)
	}
}
