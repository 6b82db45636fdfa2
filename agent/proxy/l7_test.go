package proxy

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/api/admin"
	"github.com/ferrymesh/ferry/internal/loopback"
)

// requests collects the proxy's request records.
type requests struct {
	mu  sync.Mutex
	got []Conn
}

func (r *requests) ConnOpened(Conn) {}
func (r *requests) ConnClosed(Conn) {}
func (r *requests) Request(c Conn) {
	r.mu.Lock()
	r.got = append(r.got, c)
	r.mu.Unlock()
}

// wait returns the records once there are n: a request is recorded when its
// handler returns, just after the client has its answer.
func (r *requests) wait(t *testing.T, n int) []Conn {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		r.mu.Lock()
		got := append([]Conn(nil), r.got...)
		r.mu.Unlock()
		if len(got) >= n || time.Now().After(deadline) {
			if len(got) != n {
				t.Fatalf("%d request records, want %d", len(got), n)
			}
			return got
		}
		time.Sleep(time.Millisecond)
	}
}

// newL7Proxy is a test proxy whose every endpoint is one HTTP app (HTTP/1.1 and h2c)
// answering with the status in ?status=, and recording what it received.
func newL7Proxy(t testing.TB, lb LoadBalancer, appProtocol string) (*testProxy, *requests, *[]*http.Request) {
	t.Helper()
	var mu sync.Mutex
	var seen []*http.Request
	app := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		mu.Lock()
		seen = append(seen, r)
		mu.Unlock()
		w.Header()["Date"] = nil // an app that sends no Date: the mesh must not add one
		if strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc") {
			w.Header().Set("Content-Type", "application/grpc")
			w.Header().Set("Trailer", "Grpc-Status")
			w.Write(body)
			w.Header().Set("Grpc-Status", "5")
			return
		}
		status := http.StatusOK
		fmt.Sscan(r.URL.Query().Get("status"), &status)
		w.WriteHeader(status)
		fmt.Fprintf(w, "%s %s %d", r.Proto, r.URL.Path, len(body))
	}))
	app.Config.Protocols = new(http.Protocols)
	app.Config.Protocols.SetHTTP1(true)
	app.Config.Protocols.SetUnencryptedHTTP2(true)
	app.Start()
	t.Cleanup(app.Close)
	addr := netip.MustParseAddrPort(app.Listener.Addr().String())

	tp := newTestProxy(t)
	tp.netA.app, tp.netB.app, tp.tunnels.app = addr, addr, addr
	obs := &requests{}
	tp.conns.obs = obs
	svc := web
	svc.LoadBalancer = lb
	svc.Ports = []ServicePort{{Port: 80, AppProtocol: appProtocol}, {Port: 9000}}
	tp.SetServices([]Service{svc})
	return tp, obs, &seen
}

// client is an HTTP client whose one connection is captured from pod a to dst. It
// is a ClientConn, not a Transport: a Transport may dial a second HTTP/2
// connection for a request that follows the first one's answer before the first
// dial has pooled its connection (net/http's dialConnFor delivers the connection
// to the waiting request, then pools it), which a loaded machine makes happen.
func (tp *testProxy) client(t testing.TB, dst netip.AddrPort, h2 bool) *http.Client {
	t.Helper()
	tp.capture.setDst(dst)
	var once sync.Once
	tr := &http.Transport{DialContext: func(context.Context, string, string) (net.Conn, error) {
		var c net.Conn
		var err error = fmt.Errorf("one connection only")
		once.Do(func() {
			client, accepted := loopback.Pair(t)
			go tp.handleOutbound(tp.a, accepted)
			c, err = client, nil
		})
		return c, err
	}}
	tr.Protocols = new(http.Protocols)
	if h2 {
		tr.Protocols.SetUnencryptedHTTP2(true)
	} else {
		tr.Protocols.SetHTTP1(true)
	}
	cc, err := tr.NewClientConn(context.Background(), "http", dst.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return &http.Client{Transport: cc}
}

func get(t *testing.T, c *http.Client, url string) (*http.Response, string) {
	t.Helper()
	res, err := c.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(res.Body)
	res.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	return res, string(body)
}

// Requests on one keep-alive connection each go to an endpoint of their own, and
// each is recorded with what a user would filter on.
func TestL7BalancesEachRequest(t *testing.T) {
	for _, tc := range []struct {
		name        string
		appProtocol string // "" is detected from the bytes
		h2          bool
	}{
		{"HTTP/1.1 declared", "http", false},
		{"HTTP/1.1 detected", "", false},
		{"h2c declared", "kubernetes.io/h2c", true},
		{"h2c detected", "", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tp, obs, seen := newL7Proxy(t, RoundRobin, tc.appProtocol)
			c := tp.client(t, netip.AddrPortFrom(vip, 80), tc.h2)
			for i := range 9 {
				res, body := get(t, c, fmt.Sprintf("http://web.default/p/%d?status=%d", i, 200+i%2*303))
				want := 200 + i%2*303
				if res.StatusCode != want || !strings.HasSuffix(body, fmt.Sprintf("/p/%d 0", i)) {
					t.Fatalf("request %d: %d %q, want %d", i, res.StatusCode, body, want)
				}
				if _, ok := res.Header["Date"]; ok {
					t.Errorf("the mesh added a Date header")
				}
			}
			per := map[netip.AddrPort]int{}
			for _, r := range obs.wait(t, 9) {
				per[r.Dst]++
				if r.Service != netip.AddrPortFrom(vip, 80) || r.HTTP == nil || r.HTTP.Method != "GET" || r.HTTP.Authority != "web.default" ||
					!strings.HasPrefix(r.HTTP.Path, "/p/") || r.Verdict != admin.VerdictForwarded {
					t.Errorf("record %+v %+v", r, r.HTTP)
				}
			}
			if len(per) != 3 || per[netip.AddrPortFrom(wb.IPs[0], 8080)] != 3 || per[netip.AddrPortFrom(wc.IPs[0], 8081)] != 3 {
				t.Errorf("requests per endpoint %v, want 3 on each of the 3 ready ones", per)
			}
			for _, r := range *seen {
				if _, ok := r.Header["X-Forwarded-For"]; ok {
					t.Errorf("the app received X-Forwarded-For: the mesh invents none")
				}
				if (r.ProtoMajor == 2) != tc.h2 {
					t.Errorf("the app heard %s", r.Proto)
				}
			}
		})
	}
}

// gRPC's trailers reach the client and the record has the call's status.
func TestL7GRPCTrailers(t *testing.T) {
	tp, obs, _ := newL7Proxy(t, RoundRobin, "grpc")
	c := tp.client(t, netip.AddrPortFrom(vip, 80), true)
	req, _ := http.NewRequest("POST", "http://web.default/pkg.Svc/Call", strings.NewReader("\x00\x00\x00\x00\x01x"))
	req.Header.Set("Content-Type", "application/grpc")
	req.Header.Set("Te", "trailers")
	res, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if string(body) != "\x00\x00\x00\x00\x01x" || res.Trailer.Get("Grpc-Status") != "5" {
		t.Fatalf("body %q trailer %v", body, res.Trailer)
	}
	rs := obs.wait(t, 1)
	if rs[0].Protocol != admin.GRPC || rs[0].HTTP.GRPCStatus != "5" || rs[0].BytesSent != 6 || rs[0].BytesRecv != 6 {
		t.Fatalf("records %+v", rs)
	}
}

// A Service that loses its endpoints while a client's connection is open answers
// its next request 503 itself, and says why.
func TestL7NoEndpointAnswers503(t *testing.T) {
	tp, obs, _ := newL7Proxy(t, "", "http")
	c := tp.client(t, netip.AddrPortFrom(vip, 80), false)
	if res, _ := get(t, c, "http://web.default/"); res.StatusCode != 200 {
		t.Fatalf("status %d", res.StatusCode)
	}
	none := web
	none.Backends = nil
	tp.SetServices([]Service{none})
	res, body := get(t, c, "http://web.default/")
	if res.StatusCode != http.StatusServiceUnavailable || body != "no healthy upstream\n" {
		t.Fatalf("%d %q, want 503 no healthy upstream", res.StatusCode, body)
	}
	rs := obs.wait(t, 2)
	if last := rs[len(rs)-1]; last.Reason != admin.ReasonNoEndpoints || last.Verdict != admin.VerdictError || last.HTTP.Status != 503 {
		t.Fatalf("record %+v", last)
	}
}

// An Upgrade (WebSocket's handshake) answered 101 goes on as a byte stream both ways.
func TestL7Upgrade(t *testing.T) {
	tp, _, _ := newL7Proxy(t, "", "kubernetes.io/ws")
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") != "echo" {
			http.Error(w, "want Upgrade: echo", 400)
			return
		}
		c, rw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer c.Close()
		rw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
		rw.Flush()
		io.Copy(c, rw)
	}))
	t.Cleanup(app.Close)
	addr := netip.MustParseAddrPort(app.Listener.Addr().String())
	tp.netA.app, tp.netB.app, tp.tunnels.app = addr, addr, addr

	tp.capture.setDst(netip.AddrPortFrom(vip, 80))
	client, accepted := loopback.Pair(t)
	go tp.handleOutbound(tp.a, accepted)
	fmt.Fprint(client, "GET /ws HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
	br := bufio.NewReader(client)
	res, err := http.ReadResponse(br, nil)
	if err != nil || res.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("%v %v", res, err)
	}
	for i := range 100 {
		msg := fmt.Sprintf("message %d\n", i)
		client.Write([]byte(msg))
		line, err := br.ReadString('\n')
		if err != nil || line != msg {
			t.Fatalf("echo %d: %q %v", i, line, err)
		}
	}
	client.Close()
}

// Expect: 100-continue: the client hears 100 Continue and then the answer.
func TestL7ExpectContinue(t *testing.T) {
	tp, obs, _ := newL7Proxy(t, "", "http")
	tp.capture.setDst(netip.AddrPortFrom(vip, 80))
	client, accepted := loopback.Pair(t)
	go tp.handleOutbound(tp.a, accepted)
	fmt.Fprint(client, "PUT /up HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
	br := bufio.NewReader(client)
	line, err := br.ReadString('\n')
	if err != nil || line != "HTTP/1.1 100 Continue\r\n" {
		t.Fatalf("first line %q %v, want 100 Continue before the body", line, err)
	}
	for line != "\r\n" {
		line, _ = br.ReadString('\n')
	}
	client.Write([]byte("hello"))
	for {
		res, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		if res.StatusCode == http.StatusContinue {
			continue // the app's own 100, relayed
		}
		body, _ := io.ReadAll(res.Body)
		if res.StatusCode != 200 || string(body) != "HTTP/1.1 /up 5" {
			t.Fatalf("%d %q", res.StatusCode, body)
		}
		break
	}
	client.Close()
	if rs := obs.wait(t, 1); rs[0].BytesSent != 5 {
		t.Fatalf("records %+v", rs)
	}
}
