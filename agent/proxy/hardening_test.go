package proxy

// Known attacks on HTTP proxies, sent with raw clients at the proxy's HTTP server
// (a pod's connection to a Service port, as its outbound capture hands it over):
// each is refused or contained, the app never sees what the proxy did not, the
// heap stays bounded, and an innocent client keeps being served meanwhile.

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/h2attack"
	"github.com/ferrymesh/ferry/internal/loopback"
	"golang.org/x/net/http2/hpack"
)

// rawApp is every endpoint of the Service: a Go HTTP server (HTTP/1.1 and h2c)
// that records the bytes it read and each request it parsed with its whole body.
type rawApp struct {
	mu       sync.Mutex
	raw      bytes.Buffer
	requests []appRequest
	inFlight atomic.Int64
	maxIn    atomic.Int64
	hold     chan struct{} // when set, requests to /hold wait for it (or their end)
}

type appRequest struct {
	method, path string
	header       http.Header
	body         string
	bodyErr      error
}

func (a *rawApp) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	n := a.inFlight.Add(1)
	defer a.inFlight.Add(-1)
	for m := a.maxIn.Load(); n > m && !a.maxIn.CompareAndSwap(m, n); m = a.maxIn.Load() {
	}
	body, err := io.ReadAll(r.Body)
	a.mu.Lock()
	a.requests = append(a.requests, appRequest{r.Method, r.URL.Path, r.Header.Clone(), string(body), err})
	a.mu.Unlock()
	if r.URL.Path == "/hold" && a.hold != nil {
		select {
		case <-a.hold:
		case <-r.Context().Done():
		}
	}
	fmt.Fprintf(w, "ok %s %d", r.URL.Path, len(body))
}

func (a *rawApp) seen() []appRequest {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]appRequest(nil), a.requests...)
}

type recordingConn struct {
	net.Conn
	app *rawApp
}

func (c recordingConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.app.mu.Lock()
	c.app.raw.Write(b[:n])
	c.app.mu.Unlock()
	return n, err
}

type recordingListener struct {
	net.Listener
	app *rawApp
}

func (l recordingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return recordingConn{c, l.app}, nil
}

// newHardenedProxy is a test proxy with limits lim whose Service web (port 80
// declared HTTP, 9000 detected) has a rawApp behind every endpoint.
func newHardenedProxy(t *testing.T, lim Limits) (*testProxy, *rawApp) {
	t.Helper()
	app := &rawApp{}
	srv := &http.Server{Handler: app, Protocols: new(http.Protocols)}
	srv.Protocols.SetHTTP1(true)
	srv.Protocols.SetUnencryptedHTTP2(true)
	ln := loopback.Listen(t)
	go srv.Serve(recordingListener{ln, app})
	t.Cleanup(func() { srv.Close() })
	addr := netip.MustParseAddrPort(ln.Addr().String())

	tp := newTestProxyWith(t, lim)
	tp.netA.app, tp.netB.app, tp.tunnels.app = addr, addr, addr
	svc := web
	svc.Ports = []ServicePort{{Port: 80, AppProtocol: "http"}, {Port: 9000}}
	tp.SetServices([]Service{svc})
	tp.capture.setDst(netip.AddrPortFrom(vip, 80))
	return tp, app
}

// raw is a connection from pod a to the Service, as the capture hands it over.
func (tp *testProxy) raw(t *testing.T) net.Conn {
	t.Helper()
	client, accepted := loopback.Pair(t)
	// Small socket buffers, so a flood's unread answers back up in the proxy
	// within a bounded number of frames.
	client.SetReadBuffer(4 << 10)
	accepted.SetWriteBuffer(4 << 10)
	go tp.handleOutbound(tp.a, accepted)
	client.SetDeadline(time.Now().Add(20 * time.Second))
	return client
}

// exchange writes req on a new connection and returns the first response's
// status (0: none, the connection ended) and whether the connection then closed.
func (tp *testProxy) exchange(t *testing.T, req string) (status int, closed bool) {
	t.Helper()
	c := tp.raw(t)
	defer c.Close()
	if _, err := io.WriteString(c, req); err != nil {
		t.Fatalf("write: %v", err)
	}
	br := bufio.NewReader(c)
	res, err := http.ReadResponse(br, nil)
	if err != nil {
		return 0, true
	}
	io.Copy(io.Discard, res.Body)
	res.Body.Close()
	// Anything after the response (a second one) or EOF.
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	_, err = br.ReadByte()
	var ne net.Error
	return res.StatusCode, err != nil && !(errors.As(err, &ne) && ne.Timeout())
}

const smuggled = "GET /smuggled HTTP/1.1\r\nHost: web.default\r\n\r\n"

// Request smuggling: what Go's parser refuses is refused (400/501, the connection
// closed; a malformed chunked body, found after the headers went on, is cut short
// at the app and answered 400); what it accepts reaches the app in one canonical
// form (never both Content-Length and Transfer-Encoding), and nothing after a
// chunked request is read, so the request hidden behind one never reaches the app.
func TestHardeningSmuggling(t *testing.T) {
	tp, app := newHardenedProxy(t, Limits{})
	for _, tc := range []struct {
		name   string
		req    string
		status int // 0: the connection ends without an answer
		// app: what the app gets of it: "" nothing, "one" one whole request (no
		// Content-Length beside chunked), "cut" a request whose body ends short.
		app string
	}{
		{"CL.TE", "POST /a HTTP/1.1\r\nHost: web.default\r\nContent-Length: 50\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + smuggled, 200, "one"},
		{"TE.CL", "POST /a HTTP/1.1\r\nHost: web.default\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n" +
			fmt.Sprintf("%x\r\n%s\r\n0\r\n\r\n", len(smuggled), smuggled), 200, "one"},
		{"TE.TE xchunked", "POST /a HTTP/1.1\r\nHost: web.default\r\nTransfer-Encoding: xchunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n" + smuggled, 501, ""},
		{"TE.TE two headers", "POST /a HTTP/1.1\r\nHost: web.default\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n" + smuggled, 501, ""},
		{"TE.TE list", "POST /a HTTP/1.1\r\nHost: web.default\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n" + smuggled, 501, ""},
		{"TE.TE trailing space", "POST /a HTTP/1.1\r\nHost: web.default\r\nTransfer-Encoding: chunked \r\nContent-Length: 4\r\n\r\n0\r\n\r\n" + smuggled, 200, "one"},
		{"TE.TE space before colon", "POST /a HTTP/1.1\r\nHost: web.default\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n" + smuggled, 400, ""},
		{"TE.TE folded", "POST /a HTTP/1.1\r\nHost: web.default\r\nTransfer-Encoding:\r\n chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n" + smuggled, 200, "one"},
		{"TE on HTTP/1.0", "POST /a HTTP/1.0\r\nHost: web.default\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n" + smuggled, 200, "one"},
		{"two Content-Lengths", "POST /a HTTP/1.1\r\nHost: web.default\r\nContent-Length: 0\r\nContent-Length: 46\r\n\r\n" + smuggled, 400, ""},
		{"Content-Length list", "POST /a HTTP/1.1\r\nHost: web.default\r\nContent-Length: 0, 46\r\n\r\n" + smuggled, 400, ""},
		{"signed Content-Length", "POST /a HTTP/1.1\r\nHost: web.default\r\nContent-Length: +0\r\n\r\n" + smuggled, 400, ""},
		{"bare LF in chunk line", "POST /a HTTP/1.1\r\nHost: web.default\r\nTransfer-Encoding: chunked\r\n\r\n2\nxx\r\n0\r\n\r\n" + smuggled, 400, "cut"},
		{"bare CR in chunk line", "POST /a HTTP/1.1\r\nHost: web.default\r\nTransfer-Encoding: chunked\r\n\r\n2\rxx\r\n0\r\n\r\n" + smuggled, 400, "cut"},
		{"chunk extension flood", "POST /a HTTP/1.1\r\nHost: web.default\r\nTransfer-Encoding: chunked\r\n\r\n" +
			strings.Repeat("1;"+strings.Repeat("e", 4000)+"\r\nx\r\n", 64) + "0\r\n\r\n" + smuggled, 400, "cut"},
		{"bare CR in request line", "GET /a\rGET /smuggled HTTP/1.1\r\nHost: web.default\r\n\r\n", 400, ""},
		{"bare CR in header value", "GET /a HTTP/1.1\r\nHost: web.default\r\nX: 1\rTransfer-Encoding: chunked\r\n\r\n", 400, ""},
		{"NUL in header value", "GET /a HTTP/1.1\r\nHost: web.default\r\nX: 1\x00\r\n\r\n", 400, ""},
		{"space in method", "GE T /a HTTP/1.1\r\nHost: web.default\r\n\r\n", 400, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := len(app.seen())
			status, closed := tp.exchange(t, tc.req)
			t.Logf("status %d, closed %v", status, closed)
			if status != tc.status {
				t.Errorf("status %d, want %d", status, tc.status)
			}
			if !closed {
				t.Error("the connection stayed open after the attack: a request behind it would be read")
			}
			got := app.seen()[before:]
			for deadline := time.Now().Add(5 * time.Second); tc.app == "cut" && len(got) == 0 && time.Now().Before(deadline); {
				// The app's read of the cut body ends when the proxy drops the
				// upstream connection, after the client's answer.
				time.Sleep(5 * time.Millisecond)
				got = app.seen()[before:]
			}
			switch {
			case tc.app == "" && len(got) != 0:
				t.Errorf("the app got %+v, want nothing", got)
			case tc.app != "" && len(got) != 1:
				t.Errorf("the app got %d requests, want 1", len(got))
			case tc.app == "one" && (got[0].bodyErr != nil || got[0].path != "/a"):
				t.Errorf("the app got %+v, want the whole request in one framing", got[0])
			case tc.app == "cut" && got[0].bodyErr == nil:
				t.Errorf("the app read a whole body the proxy could not parse: %q", got[0].body)
			}
		})
	}
	teCL := false
	for _, r := range app.seen() {
		teCL = teCL || r.body == smuggled // TE.CL's chunk, as the app's body
		if r.path == "/smuggled" {
			t.Errorf("the app saw a smuggled request: %+v", r)
		}
	}
	if !teCL {
		t.Error("TE.CL: the app did not get the chunked body the proxy read")
	}
	app.mu.Lock()
	raw := app.raw.String()
	app.mu.Unlock()
	for _, head := range strings.Split(raw, "\r\n\r\n") {
		if strings.Contains(head, "Transfer-Encoding") && strings.Contains(head, "Content-Length") {
			t.Errorf("a request reached the app with both Content-Length and Transfer-Encoding:\n%s", head)
		}
	}
	// And a complete request with bare LF line ends (RFC 9112 allows them) reaches
	// the app in CRLF form.
	if status, _ := tp.exchange(t, "GET /lf HTTP/1.1\nHost: web.default\nConnection: close\n\n"); status != 200 {
		t.Fatalf("bare-LF request: %d", status)
	}
	app.mu.Lock()
	raw = app.raw.String()
	app.mu.Unlock()
	if !strings.Contains(raw, "GET /lf HTTP/1.1\r\nHost: web.default\r\n") {
		t.Errorf("the bare-LF request did not reach the app in canonical form:\n%s", raw)
	}
}

// attack runs fn, an attack, while an innocent client of the same pod keeps
// asking the same Service: every innocent request is answered 200, and the heap
// in use grows by less than 64 MiB (what the attack's connections may hold).
func (tp *testProxy) attack(t *testing.T, fn func()) {
	t.Helper()
	c := tp.client(t, netip.AddrPortFrom(vip, 80), false)
	h2attack.WhileServing(t, 64<<20, fn, func() error {
		res, err := c.Get("http://web.default/innocent")
		if err != nil {
			return err
		}
		io.Copy(io.Discard, res.Body)
		res.Body.Close()
		if res.StatusCode != http.StatusOK {
			return fmt.Errorf("status %d", res.StatusCode)
		}
		return nil
	})
}

// Oversized header blocks, too many headers and an oversized request line are
// answered 431 before the app sees anything, in HTTP/1.1 and HTTP/2; an HPACK
// bomb (a 3 KiB value entered once and referenced 200 times: ~600 KiB decoded
// from a ~3.3 KiB block) too.
func TestHardeningHeaderLimits(t *testing.T) {
	tp, app := newHardenedProxy(t, Limits{MaxHeaderBytes: 8 << 10, MaxHeaderCount: 20})
	var many strings.Builder
	for i := range 30 {
		fmt.Fprintf(&many, "X-H%d: v\r\n", i)
	}
	for _, tc := range []struct{ name, req string }{
		{"large header", "GET /a HTTP/1.1\r\nHost: web.default\r\nX-Big: " + strings.Repeat("x", 16<<10) + "\r\n\r\n"},
		{"many headers", "GET /a HTTP/1.1\r\nHost: web.default\r\n" + many.String() + "\r\n"},
		{"many repeated headers", "GET /a HTTP/1.1\r\nHost: web.default\r\n" + strings.Repeat("X-Same: v\r\n", 30) + "\r\n"},
		{"long request line", "GET /" + strings.Repeat("a", 16<<10) + " HTTP/1.1\r\nHost: web.default\r\n\r\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if status, closed := tp.exchange(t, tc.req); status != http.StatusRequestHeaderFieldsTooLarge || !closed {
				t.Errorf("status %d, closed %v; want 431 and the connection closed", status, closed)
			}
		})
	}
	// Within the limits, the same shapes pass.
	if status, _ := tp.exchange(t, "GET /a HTTP/1.1\r\nHost: web.default\r\nX-Big: "+strings.Repeat("x", 4<<10)+"\r\n"+strings.Repeat("X-Same: v\r\n", 15)+"\r\n"); status != 200 {
		t.Fatalf("request within the limits: %d", status)
	}
	n := len(app.seen())
	r := h2attack.Request{Method: "GET", Scheme: "http", Authority: "web.default", Path: "/a"}
	var fields []hpack.HeaderField
	for i := range 30 {
		fields = append(fields, hpack.HeaderField{Name: fmt.Sprintf("x-h%d", i), Value: "v"})
	}
	for _, tc := range []struct {
		name   string
		attack func(c net.Conn) (h2attack.Outcome, error)
	}{
		{"h2 many headers", func(c net.Conn) (h2attack.Outcome, error) { return h2attack.Send(c, r, fields, time.Second) }},
		{"h2 headers past the limit", func(c net.Conn) (h2attack.Outcome, error) { return h2attack.HPACKBomb(c, r, 16<<10, time.Second) }},
		{"h2 hpack bomb", func(c net.Conn) (h2attack.Outcome, error) { return h2attack.HPACKBomb(c, r, 200*3000, time.Second) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := tc.attack(tp.raw(t))
			if err != nil {
				t.Fatal(err)
			}
			t.Log(out)
			if out.Statuses["431"] != 1 {
				t.Errorf("%v; want 431", out)
			}
		})
	}
	if got := app.seen()[n:]; len(got) != 0 {
		t.Errorf("the app saw %d requests past the limits", len(got))
	}
}

// Slowloris on the app side: headers that never end are cut off at
// ReadHeaderTimeout, a request body that stops is answered 408 at BodyIdleTimeout,
// while another client of the pod is served throughout. A keep-alive connection
// between requests is not cut by the header timeout.
func TestHardeningSlowloris(t *testing.T) {
	lim := Limits{ReadHeaderTimeout: 300 * time.Millisecond, BodyIdleTimeout: 300 * time.Millisecond}
	tp, app := newHardenedProxy(t, lim)
	tp.attack(t, func() {
		var wg sync.WaitGroup
		for range 20 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				c := tp.raw(t)
				defer c.Close()
				io.WriteString(c, "GET /slow HTTP/1.1\r\nHost: web.default\r\n")
				start := time.Now()
				for i := 0; ; i++ {
					// One header line a byte at a time, never ending the block.
					if _, err := fmt.Fprintf(c, "%c", 'a'+i%26); err != nil {
						break
					}
					if time.Since(start) > 15*time.Second {
						t.Error("slow headers: the connection is still open after 15 s")
						return
					}
					time.Sleep(50 * time.Millisecond)
				}
			}()
		}
		wg.Wait()
	})
	n := len(app.seen())
	c := tp.raw(t)
	defer c.Close()
	io.WriteString(c, "POST /body HTTP/1.1\r\nHost: web.default\r\nContent-Length: 100\r\n\r\n0123456789")
	res, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("stalled body: %v", err)
	}
	if res.StatusCode != http.StatusRequestTimeout {
		t.Errorf("stalled body: %d, want 408", res.StatusCode)
	}
	for _, r := range app.seen()[n:] {
		if r.bodyErr == nil {
			t.Errorf("the app read a whole body from a client that stalled: %q", r.body)
		}
	}
	for _, r := range app.seen() {
		if r.path == "/slow" {
			t.Error("the app saw the slow headers' request")
		}
	}
	// An idle keep-alive connection outlives the header timeout.
	kc := tp.client(t, netip.AddrPortFrom(vip, 80), false)
	get(t, kc, "http://web.default/first")
	time.Sleep(4 * lim.ReadHeaderTimeout)
	if res, _ := get(t, kc, "http://web.default/second"); res.StatusCode != 200 {
		t.Errorf("second request on an idle keep-alive connection: %d", res.StatusCode)
	}
}

// HTTP/2 attacks on h2c (a pod's connection to a Service port): rapid reset,
// CONTINUATION flood, PING and SETTINGS floods, an HPACK bomb and more streams than allowed are
// each contained (the connection ended, or held to MaxConcurrentStreams), the
// app never has more requests in flight than the limit, the heap stays within
// the bound, and another client is served meanwhile.
func TestHardeningHTTP2(t *testing.T) {
	const maxStreams = 8
	tp, app := newHardenedProxy(t, Limits{MaxConcurrentStreams: maxStreams, MaxHeaderBytes: 16 << 10})
	app.hold = make(chan struct{})
	defer close(app.hold)
	r := h2attack.Request{Method: "GET", Scheme: "http", Authority: "web.default", Path: "/hold"}
	for _, tc := range h2attack.Cases(r, maxStreams) {
		t.Run(tc.Name, func(t *testing.T) {
			app.maxIn.Store(0)
			tp.attack(t, func() {
				tc.Check(t, tp.raw(t))
			})
			// The attack's streams, and one innocent request at a time.
			if m := app.maxIn.Load(); m > maxStreams+1 {
				t.Errorf("the app had %d requests in flight; the limit is %d a connection", m, maxStreams)
			}
		})
	}
}
