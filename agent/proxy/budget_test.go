package proxy

import (
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/agent/tunnel"
	"github.com/ferrymesh/ferry/api/admin"
	"github.com/ferrymesh/ferry/internal/loopback"
)

// fixedCapture says every outbound connection was going to dst; it never changes,
// so connections held open may read it while others start.
type fixedCapture struct {
	*fakeCapture
	dst netip.AddrPort
}

func (f fixedCapture) OutboundDst(uint64, *net.TCPConn) (netip.AddrPort, error) { return f.dst, nil }

// budgetProxy is a test proxy with budgets b whose outbound connections all go to
// c's app, and whose ended records arrive on the channel (the admin snapshot would
// read records of connections held open while they end).
func budgetProxy(t *testing.T, b Budgets) (*testProxy, <-chan Conn) {
	tp := newTestProxy(t)
	tp.budgets = newLedger(b)
	tp.cfg.Capture = fixedCapture{tp.capture, netip.AddrPortFrom(wc.IPs[0], 8080)}
	ended := make(chan Conn, 16)
	tp.conns.obs = observerFunc(func(c Conn) { ended <- c })
	return tp, ended
}

// once carries one connection of pod pd, sending msg; it returns the reply, the
// client's first error and the record.
func (tp *testProxy) once(t *testing.T, pd *pod, msg string, ended <-chan Conn) (string, error, Conn) {
	t.Helper()
	client, accepted := loopback.Pair(t)
	go tp.serveConn(pd, accepted, func(c *net.TCPConn) { tp.handleOutbound(pd, c) })
	_, werr := client.Write([]byte(msg))
	client.CloseWrite()
	reply, rerr := io.ReadAll(client)
	if werr != nil {
		rerr = werr
	}
	select {
	case c := <-ended:
		return string(reply), rerr, c
	case <-time.After(10 * time.Second):
		t.Fatal("no record")
	}
	return "", nil, Conn{}
}

// openOutbound carries one connection of pod pd and leaves it open: the echo app
// has answered once it returns. end closes it and waits for its record.
func (tp *testProxy) openOutbound(t *testing.T, pd *pod, ended <-chan Conn) (end func()) {
	t.Helper()
	client, accepted := loopback.Pair(t)
	done := make(chan struct{})
	go func() {
		defer close(done)
		tp.serveConn(pd, accepted, func(c *net.TCPConn) { tp.handleOutbound(pd, c) })
	}()
	if _, err := client.Write([]byte("hold")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(client, buf); err != nil {
		t.Fatalf("held connection: %v", err)
	}
	return func() {
		client.Close()
		<-done
		<-ended
	}
}

// A pod at its connection budget is refused at once with the reason on the record,
// while another pod's connections go on; a connection that ends gives its place back.
func TestOutboundConnectionBudget(t *testing.T) {
	tp, ended := budgetProxy(t, Budgets{OutboundConns: 2})
	first, second := tp.openOutbound(t, tp.a, ended), tp.openOutbound(t, tp.a, ended)
	defer second()

	start := time.Now()
	_, err, rec := tp.once(t, tp.a, "over", ended)
	if err == nil || rec.Reason != admin.ReasonPodBudget || rec.Budget != BudgetOutboundConns || rec.Verdict != admin.VerdictDenied {
		t.Fatalf("third connection of a: err %v, record %s/%s budget %q; want a reset, denied pod_budget outbound_connections", err, rec.Verdict, rec.Reason, rec.Budget)
	}
	t.Logf("refused in %s: %s", time.Since(start), rec.Error)
	if reply, err, rec := tp.once(t, tp.b, "b", ended); err != nil || reply != "b" || rec.Reason != admin.ReasonNone {
		t.Fatalf("pod b beside a at its budget: %q %v %s", reply, err, rec.Reason)
	}
	first()
	if reply, err, _ := tp.once(t, tp.a, "again", ended); err != nil || reply != "again" {
		t.Fatalf("a after one of its connections ended: %q %v", reply, err)
	}
	if n := tp.IsolationStats().Refusals[wa.Name][BudgetOutboundConns]; n != 1 {
		t.Errorf("refusals of a %v, want 1 of outbound_connections", tp.IsolationStats().Refusals)
	}
}

// The buffer budget counts what each connection holds: one below two connections'
// worth admits one.
func TestBufferBudget(t *testing.T) {
	tp, ended := budgetProxy(t, Budgets{BufferBytes: 2*connBufferCost - 1})
	defer tp.openOutbound(t, tp.a, ended)()
	if _, err, rec := tp.once(t, tp.a, "x", ended); err == nil || rec.Budget != BudgetBufferMemory {
		t.Fatalf("second connection: %v budget %q, want refused by buffer_memory", err, rec.Budget)
	}
}

// Inbound, the tenant is the source identity: a tunnel stream over its budget is
// answered 503 with the reason, which the source side reads back as pod_budget.
func TestInboundBudgetByIdentity(t *testing.T) {
	tp := newTestProxy(t)
	tp.budgets = newLedger(Budgets{InboundConns: 1})
	h, over := tp.takeInbound(wa.Identity)
	if over != nil {
		t.Fatal(over)
	}
	if _, over := tp.takeInbound(wb.Identity); over != nil {
		t.Fatalf("another identity refused: %v", over)
	}
	_, over = tp.takeInbound(wa.Identity)
	if over == nil || over.Budget != BudgetInboundConns || over.Tenant != wa.Identity {
		t.Fatalf("second stream of a: %v, want inbound_connections of %s", over, wa.Identity)
	}
	refused := &tunnel.RefusedError{Status: http.StatusServiceUnavailable, Reason: over.Error()}
	if b, ok := refusedByBudget(refused); !ok || b != BudgetInboundConns {
		t.Fatalf("the source reads %q as %q %v", refused.Reason, b, ok)
	}
	h.release()
	h.release() // once only
	if _, over := tp.takeInbound(wa.Identity); over != nil {
		t.Fatalf("after release: %v", over)
	}
	if len(tp.budgets.use) != 2 {
		t.Errorf("ledger holds %d tenants, want 2", len(tp.budgets.use))
	}
}

// blockingL7 is a test proxy whose every endpoint answers /slow only once release
// is closed, and the rest at once.
func blockingL7(t *testing.T, b Budgets) (tp *testProxy, obs *requests, unblock func()) {
	t.Helper()
	tp, obs, _ = newL7Proxy(t, RoundRobin, "http")
	release := make(chan struct{})
	var once sync.Once
	unblock = func() { once.Do(func() { close(release) }) }
	t.Cleanup(unblock)
	app := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			<-release
		}
		io.WriteString(w, "ok")
	}))
	app.Config.Protocols = new(http.Protocols)
	app.Config.Protocols.SetHTTP1(true)
	app.Config.Protocols.SetUnencryptedHTTP2(true)
	app.Start()
	t.Cleanup(app.Close)
	addr := netip.MustParseAddrPort(app.Listener.Addr().String())
	tp.netA.app, tp.netB.app, tp.tunnels.app = addr, addr, addr
	tp.budgets = newLedger(b)
	return tp, obs, unblock
}

// A pod with its pending requests all waiting on a slow endpoint gets 503 at once
// for the next, with the budget named; once the slow one ends it is served again.
func TestPendingRequestBudget(t *testing.T) {
	tp, obs, unblock := blockingL7(t, Budgets{PendingRequests: 1})
	c := tp.client(t, netip.AddrPortFrom(vip, 80), true) // h2c: both requests share the connection
	slow := make(chan error, 1)
	go func() {
		res, err := c.Get("http://web.default/slow")
		if err == nil {
			res.Body.Close()
		}
		slow <- err
	}()
	waitPending(t, tp, 1, "the slow request never took its place")
	res, body := get(t, c, "http://web.default/fast")
	if res.StatusCode != http.StatusServiceUnavailable || !strings.Contains(body, "pending_requests") {
		t.Fatalf("request over the budget: %d %q, want 503 naming pending_requests", res.StatusCode, body)
	}
	recs := obs.wait(t, 1)
	if r := recs[0]; r.Reason != admin.ReasonPodBudget || r.Budget != BudgetPendingRequests || r.HTTP.Status != http.StatusServiceUnavailable {
		t.Errorf("record %s %q status %d", r.Reason, r.Budget, r.HTTP.Status)
	}
	unblock()
	if err := <-slow; err != nil {
		t.Fatal(err)
	}
	// The client has the whole reply a moment before the proxy's handler returns
	// and gives the place back.
	waitPending(t, tp, 0, "the slow request kept its place after it ended")
	if res, _ := get(t, c, "http://web.default/fast"); res.StatusCode != http.StatusOK {
		t.Fatalf("after the slow one ended: %d", res.StatusCode)
	}
}

// waitPending waits until pod a's outbound requests in flight number n.
func waitPending(t *testing.T, tp *testProxy, n int, failure string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		tp.budgets.mu.Lock()
		held := 0
		if u := tp.budgets.use[outboundTenant(tp.a)]; u != nil {
			held = u.requests
		}
		tp.budgets.mu.Unlock()
		if held == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %d in flight, want %d", failure, held, n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// panicCapture panics for every outbound connection, as a bug in one handler would.
type panicCapture struct{ *fakeCapture }

func (panicCapture) OutboundDst(uint64, *net.TCPConn) (netip.AddrPort, error) {
	panic("injected: outbound handler")
}

// A panic in one connection's handler resets that connection only: it is logged,
// counted and recorded, and the proxy goes on serving.
func TestPanicInConnectionRecovered(t *testing.T) {
	tp := newTestProxy(t)
	tp.cfg.Capture = panicCapture{tp.capture}
	client, accepted := loopback.Pair(t)
	tp.serveConn(tp.a, accepted, func(c *net.TCPConn) { tp.handleOutbound(tp.a, c) })
	if _, err := io.ReadAll(client); err == nil {
		t.Error("the client of the panicked connection saw a clean end, want a reset")
	}
	if n := tp.IsolationStats().Panics; n != 1 {
		t.Fatalf("panics %d, want 1", n)
	}
	_, ended := tp.Connections()
	if r := ended[len(ended)-1]; r.Reason != admin.ReasonPanic || r.Pod != wa.Name {
		t.Errorf("record %s of %s, want proxy_panic of %s", r.Reason, r.Pod, wa.Name)
	}
	tp.cfg.Capture = tp.capture
	if reply, err, _ := tp.outbound(t, tp.b, netip.AddrPortFrom(wc.IPs[0], 8080), "still"); err != nil || reply != "still" {
		t.Fatalf("after the panic: %q %v", reply, err)
	}
}

// A panic in one request's handler ends that request's connection; the next
// connection is served, and the panic is counted once (ReverseProxy's own aborts
// are not panics of the proxy's).
func TestPanicInRequestRecovered(t *testing.T) {
	tp, obs, _ := newL7Proxy(t, RoundRobin, "http")
	tp.onRequest = func(r *http.Request) {
		if r.URL.Path == "/boom" {
			panic("injected: request handler")
		}
	}
	c := tp.client(t, netip.AddrPortFrom(vip, 80), false)
	if res, err := c.Get("http://web.default/boom"); err == nil {
		res.Body.Close()
		t.Fatalf("a panicked request answered %d, want its connection closed", res.StatusCode)
	}
	if r := obs.wait(t, 1)[0]; r.Reason != admin.ReasonPanic {
		t.Errorf("record reason %q, want proxy_panic", r.Reason)
	}
	if n := tp.IsolationStats().Panics; n != 1 {
		t.Fatalf("panics %d, want 1", n)
	}
	c = tp.client(t, netip.AddrPortFrom(vip, 80), false)
	if res, _ := get(t, c, "http://web.default/ok"); res.StatusCode != http.StatusOK {
		t.Fatalf("after the panic: %d", res.StatusCode)
	}
}

// BudgetExceeded is found through wrapping, as the tunnel's StreamInfo.Err carries it.
func TestAsBudgetExceeded(t *testing.T) {
	err := errors.Join(errors.New("x"), &BudgetExceeded{Tenant: "t", Budget: BudgetInboundConns, Limit: 1})
	if be, ok := asBudgetExceeded(err); !ok || be.Budget != BudgetInboundConns {
		t.Fatal("not found")
	}
}
