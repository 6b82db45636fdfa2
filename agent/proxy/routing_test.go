package proxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/api/admin"
	"github.com/ferrymesh/ferry/internal/loopback"
)

// A routing lab: three Services, each with one endpoint outside the mesh (so the
// source pod dials it itself) served by an app of its own that says who it is.
// default/front has no pod of its own: it is only routed (a GAMMA frontend).
var (
	webVIP    = netip.MustParseAddr("10.96.1.1")
	canaryVIP = netip.MustParseAddr("10.96.1.2")
	shadowVIP = netip.MustParseAddr("10.96.1.3")
	frontVIP  = netip.MustParseAddr("10.96.1.4")
	routedEPs = map[string]netip.AddrPort{
		"web":    netip.MustParseAddrPort("192.0.2.1:8080"),
		"canary": netip.MustParseAddrPort("192.0.2.2:8080"),
		"shadow": netip.MustParseAddrPort("192.0.2.3:8080"),
	}
	wx = Workload{UID: "ux", Name: "shop/x", Identity: "spiffe://cluster.local/ns/shop/sa/x", Node: "node1", IPs: []netip.Addr{netip.MustParseAddr("10.1.1.12")}}
)

// routedApp is one Service's app: it records what it received and answers with its
// name, or as handle says.
type routedApp struct {
	name   string
	mu     sync.Mutex
	seen   []seenRequest
	got    chan seenRequest // every request, as it arrives
	handle func(w http.ResponseWriter, r *http.Request)
}

type seenRequest struct {
	method, host, path, query, body string
	header                          http.Header
}

func (a *routedApp) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	s := seenRequest{method: r.Method, host: r.Host, path: r.URL.Path, query: r.URL.RawQuery, body: string(body), header: r.Header.Clone()}
	a.mu.Lock()
	a.seen = append(a.seen, s)
	a.mu.Unlock()
	select {
	case a.got <- s:
	default:
	}
	if a.handle != nil {
		a.handle(w, r)
		return
	}
	w.Header().Set("X-App", a.name)
	fmt.Fprintf(w, "%s %s", a.name, r.URL.Path)
}

func (a *routedApp) requests() []seenRequest {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]seenRequest(nil), a.seen...)
}

// appNet is a pod's namespace in which each routed endpoint is its app.
type appNet map[netip.AddrPort]netip.AddrPort

func (n appNet) Listen(netip.AddrPort) (net.Listener, error) {
	return nil, errors.New("appNet: no listeners")
}

func (n appNet) Dial(ctx context.Context, _ netip.Addr, dst netip.AddrPort) (*net.TCPConn, error) {
	app, ok := n[dst]
	if !ok {
		return nil, fmt.Errorf("appNet: nothing at %s", dst)
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", app.String())
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// routeCapture says where each of the test clients' connections was going.
type routeCapture struct {
	*fakeCapture
	mu  sync.Mutex
	dst map[netip.AddrPort]netip.AddrPort // by the client's address
}

func (c *routeCapture) OutboundDst(_ uint64, conn *net.TCPConn) (netip.AddrPort, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.dst[conn.RemoteAddr().(*net.TCPAddr).AddrPort()], nil
}

type routeLab struct {
	*testProxy
	obs     *requests
	apps    map[string]*routedApp
	x       *pod // a client in namespace shop; tp.a is in default
	capture *routeCapture
}

// newRouteLab starts the apps, with the handlers given by app name (the others
// answer with their name), and the proxy.
func newRouteLab(t *testing.T, handlers map[string]http.HandlerFunc) *routeLab {
	t.Helper()
	l := &routeLab{apps: map[string]*routedApp{}}
	nets := appNet{}
	for name, ep := range routedEPs {
		a := &routedApp{name: name, got: make(chan seenRequest, 100), handle: handlers[name]}
		srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			a.ServeHTTP(w, r)
		}))
		srv.Config.Protocols = new(http.Protocols)
		srv.Config.Protocols.SetHTTP1(true)
		srv.Config.Protocols.SetUnencryptedHTTP2(true)
		srv.Start()
		t.Cleanup(srv.Close)
		nets[ep] = netip.MustParseAddrPort(srv.Listener.Addr().String())
		l.apps[name] = a
	}
	// Created after the apps, so stopped before them: a mirror or request the
	// proxy still has in flight ends first.
	l.testProxy = newTestProxy(t)
	l.capture = &routeCapture{fakeCapture: l.testProxy.capture, dst: map[netip.AddrPort]netip.AddrPort{}}
	l.cfg.Capture = l.capture // no connection yet reads it
	l.obs = &requests{}
	l.conns.obs = l.obs
	l.a.net = nets
	l.x = l.pod(wx, nets)
	l.setRoutes()
	return l
}

// setRoutes gives default/web's and default/front's port 80 the tables.
func (l *routeLab) setRoutes(tables ...RouteTable) {
	svc := func(name string, vip netip.Addr, ep string) Service {
		s := Service{Name: "default/" + name, VIPs: []netip.Addr{vip}, Ports: []ServicePort{{Port: 80, AppProtocol: "http"}, {Port: 81, AppProtocol: "http"}}}
		if ep != "" {
			e := routedEPs[ep]
			s.Backends = []Backend{{IPs: []netip.Addr{e.Addr()}, Ready: true, Ports: []uint16{e.Port(), e.Port()}}}
		}
		return s
	}
	web, front := svc("web", webVIP, "web"), svc("front", frontVIP, "")
	web.Routes, front.Routes = tables, tables
	l.SetServices([]Service{web, front, svc("canary", canaryVIP, "canary"), svc("shadow", shadowVIP, "shadow")})
}

// client is an HTTP client of pod pd whose connections are captured to dst.
func (l *routeLab) client(t *testing.T, pd *pod, dst netip.AddrPort, h2 bool) *http.Client {
	t.Helper()
	tr := &http.Transport{DialContext: func(context.Context, string, string) (net.Conn, error) {
		client, accepted := loopback.Pair(t)
		l.capture.mu.Lock()
		l.capture.dst[accepted.RemoteAddr().(*net.TCPAddr).AddrPort()] = dst
		l.capture.mu.Unlock()
		go l.handleOutbound(pd, accepted)
		return client, nil
	}}
	tr.Protocols = new(http.Protocols)
	if h2 {
		tr.Protocols.SetUnencryptedHTTP2(true)
	} else {
		tr.Protocols.SetHTTP1(true)
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
}

// do sends one request and returns the response with its body read.
func do(t *testing.T, c *http.Client, method, url string, body io.Reader, header http.Header) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest(method, url, body)
	if err != nil {
		t.Fatal(err)
	}
	for k, vs := range header {
		req.Header[k] = vs
	}
	res, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(res.Body)
	res.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	return res, string(b)
}

func to(service string, weight uint32) WeightedBackend {
	return WeightedBackend{Service: "default/" + service, Port: 80, Weight: weight}
}

func rule(i int, backends ...WeightedBackend) RouteRule {
	return RouteRule{Route: "HTTPRoute default/r", Index: i, Backends: backends}
}

func exact(v string) *StringMatch  { return &StringMatch{Type: MatchExact, Value: v} }
func prefix(v string) *StringMatch { return &StringMatch{Type: MatchPathPrefix, Value: v} }
func regex(v string) *StringMatch {
	return &StringMatch{Type: MatchRegex, Value: v, Regex: regexp.MustCompile("^(?:" + v + ")$")}
}

// Each kind of match, in the table's order: the first that matches wins, and a
// request matching none is answered 404 by the mesh.
func TestRouteMatches(t *testing.T) {
	l := newRouteLab(t, nil)
	var rules []RouteRule
	for i := range 9 {
		rules = append(rules, rule(i, to("web", 1)))
	}
	l.setRoutes(RouteTable{Port: 80, Rules: rules, Matches: []RouteMatch{
		{Rule: 0, Path: exact("/exact")},
		{Rule: 1, Path: prefix("/api")},
		{Rule: 2, Path: regex(`/v[0-9]+/items`)},
		{Rule: 3, Headers: []NamedMatch{{Name: "X-Canary", StringMatch: *exact("yes")}}},
		{Rule: 4, Headers: []NamedMatch{{Name: "X-Tier", StringMatch: *regex("gold|silver")}}},
		{Rule: 5, Headers: []NamedMatch{{Name: "X-Multi", StringMatch: *exact("a, b")}}},
		{Rule: 6, Query: []NamedMatch{{Name: "q", StringMatch: *exact("1")}}},
		{Rule: 7, Method: http.MethodPost, Path: prefix("/")},
		{Rule: 8, Path: prefix("/all/"), Headers: []NamedMatch{{Name: "X-A", StringMatch: *exact("1")}, {Name: "X-B", StringMatch: *regex("[0-9]+")}}},
	}})
	c := l.client(t, l.a, netip.AddrPortFrom(webVIP, 80), false)
	for i, tc := range []struct {
		method, path string
		header       http.Header
		rule         int // -1: no route
	}{
		{"GET", "/exact", nil, 0},
		{"GET", "/exact/", nil, -1},
		{"GET", "/exact?x=1", nil, 0},
		{"GET", "/api", nil, 1},
		{"GET", "/api/", nil, 1},
		{"GET", "/api/x/y", nil, 1},
		{"GET", "/apix", nil, -1},
		{"GET", "/v2/items", nil, 2},
		{"GET", "/v2/items?page=3", nil, 2},
		{"GET", "/v2/items/1", nil, -1}, // the whole path must match
		{"GET", "/x/v2/items", nil, -1},
		{"GET", "/other", http.Header{"X-Canary": {"yes"}}, 3},
		{"GET", "/other", http.Header{"X-Canary": {"Yes"}}, -1},
		{"GET", "/exact", http.Header{"X-Canary": {"yes"}}, 0}, // earlier match first
		{"GET", "/other", http.Header{"X-Tier": {"silver"}}, 4},
		{"GET", "/other", http.Header{"X-Tier": {"gold", "bronze"}}, -1}, // "gold, bronze"
		{"GET", "/other", http.Header{"X-Multi": {"a", "b"}}, 5},
		{"GET", "/other?q=1", nil, 6},
		{"GET", "/other?q=2", nil, -1},
		{"GET", "/other?q=1&q=2", nil, 6},
		{"GET", "/other?q=2&q=1", nil, -1}, // the first value counts
		{"POST", "/other", nil, 7},
		{"PUT", "/other", nil, -1},
		{"GET", "/all", http.Header{"X-A": {"1"}, "X-B": {"42"}}, 8},
		{"GET", "/all/x", http.Header{"X-A": {"1"}}, -1}, // every part must match
		{"GET", "/all/x", http.Header{"X-A": {"1"}, "X-B": {"4x"}}, -1},
	} {
		res, body := do(t, c, tc.method, "http://web.default"+tc.path, nil, tc.header)
		rec := l.obs.wait(t, i+1)[i]
		if tc.rule < 0 {
			if res.StatusCode != http.StatusNotFound || body != "no route\n" || rec.Reason != admin.ReasonNoRoute || rec.HTTP.Route != "" {
				t.Errorf("%s %s %v: %d %q, record %s %q; want 404 no route", tc.method, tc.path, tc.header, res.StatusCode, body, rec.Reason, rec.HTTP.Route)
			}
			continue
		}
		if res.StatusCode != 200 || rec.HTTP.Route != "HTTPRoute default/r" || rec.HTTP.RouteRule != tc.rule || rec.Reason != "" {
			t.Errorf("%s %s %v: %d %q, rule %q %d; want rule %d", tc.method, tc.path, tc.header, res.StatusCode, body, rec.HTTP.Route, rec.HTTP.RouteRule, tc.rule)
		}
	}
}

// A namespace's consumer routes replace the producer routes for its clients only;
// a port without a table goes to the Service's own endpoints, as without routes.
func TestRouteConsumerOverProducer(t *testing.T) {
	l := newRouteLab(t, nil)
	all := []RouteMatch{{Rule: 0}}
	l.setRoutes(
		RouteTable{Port: 80, Rules: []RouteRule{rule(0, to("canary", 1))}, Matches: all},
		RouteTable{Port: 80, ClientNamespace: "shop", Rules: []RouteRule{rule(0, to("shadow", 1))}, Matches: all},
		RouteTable{Port: 81, ClientNamespace: "shop", Rules: []RouteRule{rule(0, to("shadow", 1))}, Matches: all},
	)
	for _, tc := range []struct {
		pd   *pod
		port uint16
		want string
	}{
		{l.a, 80, "canary"}, // default: the producer routes
		{l.x, 80, "shadow"}, // shop: its consumer routes
		{l.a, 81, "web"},    // no table for default on 81: web's own pods
		{l.x, 81, "shadow"},
	} {
		c := l.client(t, tc.pd, netip.AddrPortFrom(webVIP, tc.port), false)
		if res, body := do(t, c, "GET", "http://web.default/", nil, nil); res.StatusCode != 200 || res.Header.Get("X-App") != tc.want {
			t.Errorf("%s to port %d: %d %q from %q, want %s", tc.pd.w.Name, tc.port, res.StatusCode, body, res.Header.Get("X-App"), tc.want)
		}
	}
	// A request is recorded just after its answer, so the records may come in
	// another order.
	for _, r := range l.obs.wait(t, 4) {
		routed := r.Pod == "shop/x" || r.Service.Port() == 80
		if r.Service.Addr() != webVIP || (r.HTTP.Route != "") != routed || (r.Pod == "default/a" && r.Service.Port() == 81 && r.Dst != routedEPs["web"]) ||
			(r.Pod == "shop/x" && r.Dst != routedEPs["shadow"]) {
			t.Errorf("record %+v %+v", r, r.HTTP)
		}
	}
}

// Backends are drawn in proportion to their weights, 0 never.
func TestRouteWeights(t *testing.T) {
	got := map[string]int{}
	const n = 10_000
	for range n {
		b, ok := pickBackend([]WeightedBackend{to("web", 90), to("shadow", 0), to("canary", 10)})
		if !ok {
			t.Fatal("no backend")
		}
		got[b.Service]++
	}
	if share := float64(got["default/canary"]) * 100 / n; share < 8 || share > 12 || got["default/shadow"] != 0 {
		t.Errorf("%v: canary %.1f%%, want 10 ± 2, and none to the 0 weight", got, share)
	}
	if _, ok := pickBackend([]WeightedBackend{to("web", 0)}); ok {
		t.Error("a backend drawn from weights summing to 0")
	}

	// Through the proxy, to a frontend with no pods of its own.
	l := newRouteLab(t, nil)
	l.setRoutes(RouteTable{Port: 80, Rules: []RouteRule{rule(0, to("web", 90), to("canary", 10))}, Matches: []RouteMatch{{Rule: 0}}})
	c := l.client(t, l.a, netip.AddrPortFrom(frontVIP, 80), false)
	const requests = 1000
	per := map[string]int{}
	for range requests {
		res, _ := do(t, c, "GET", "http://front.default/", nil, nil)
		if res.StatusCode != 200 {
			t.Fatalf("status %d", res.StatusCode)
		}
		per[res.Header.Get("X-App")]++
	}
	if share := float64(per["canary"]) * 100 / requests; share < 5 || share > 15 || per["web"]+per["canary"] != requests {
		t.Errorf("%v over %d requests: canary %.1f%%, want about 10", per, requests, share)
	}
}

// Every filter, as the app and the client see it.
func TestRouteFilters(t *testing.T) {
	l := newRouteLab(t, map[string]http.HandlerFunc{"web": func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-App", "web")
		w.Header().Set("X-Internal", "secret")
		w.Header().Add("X-Resp-Add", "app")
		fmt.Fprint(w, r.URL.Path)
	}})
	rules := []RouteRule{
		rule(0, to("web", 1)), rule(1, to("web", 1)), rule(2), rule(3), rule(4), rule(5, to("web", 1)), rule(6, to("web", 1)), rule(7),
	}
	rules[0].Filters = []RouteFilter{{RequestHeaders: &HeaderModifier{
		Set: []Header{{"X-Set", "mesh"}}, Add: []Header{{"X-Add", "mesh"}}, Remove: []string{"X-Remove"},
	}}}
	rules[1].Filters = []RouteFilter{{ResponseHeaders: &HeaderModifier{
		Set: []Header{{"X-Resp-Set", "mesh"}}, Add: []Header{{"X-Resp-Add", "mesh"}}, Remove: []string{"X-Internal"},
	}}}
	rules[2].Filters = []RouteFilter{{Redirect: &Redirect{Scheme: "https", Hostname: "example.com", StatusCode: 301}}}
	rules[3].Filters = []RouteFilter{{Redirect: &Redirect{Path: &PathModifier{Type: ReplacePrefixMatch, Value: "/new"}, StatusCode: 302}}}
	rules[4].Filters = []RouteFilter{{Redirect: &Redirect{Port: 8443, Path: &PathModifier{Type: ReplaceFullPath, Value: "/moved"}, StatusCode: 302}}}
	rules[5].Filters = []RouteFilter{{URLRewrite: &URLRewrite{Hostname: "rewritten.example", Path: &PathModifier{Type: ReplacePrefixMatch, Value: "/v2"}}}}
	rules[6].Filters = []RouteFilter{{URLRewrite: &URLRewrite{Path: &PathModifier{Type: ReplaceFullPath, Value: "/full"}}}}
	// No backend and no redirect: the mesh answers 500, with the response filter.
	rules[7].Filters = []RouteFilter{{ResponseHeaders: &HeaderModifier{Set: []Header{{"X-Resp-Set", "mesh"}}}}}
	l.setRoutes(RouteTable{Port: 80, Rules: rules, Matches: []RouteMatch{
		{Rule: 0, Path: prefix("/req")}, {Rule: 1, Path: prefix("/resp")}, {Rule: 2, Path: prefix("/https")},
		{Rule: 3, Path: prefix("/old/")}, {Rule: 4, Path: prefix("/port")}, {Rule: 5, Path: prefix("/api")},
		{Rule: 6, Path: prefix("/full")}, {Rule: 7, Path: prefix("/nowhere")},
	}})
	c := l.client(t, l.a, netip.AddrPortFrom(webVIP, 80), false)
	web := l.apps["web"]

	do(t, c, "GET", "http://web.default/req", nil, http.Header{"X-Set": {"client"}, "X-Add": {"client"}, "X-Remove": {"client"}, "X-Keep": {"client"}})
	h := web.requests()[0].header
	if h.Get("X-Set") != "mesh" || strings.Join(h["X-Add"], ",") != "client,mesh" || h["X-Remove"] != nil || h.Get("X-Keep") != "client" {
		t.Errorf("request headers the app saw: %v", h)
	}

	res, _ := do(t, c, "GET", "http://web.default/resp", nil, nil)
	if res.Header.Get("X-Resp-Set") != "mesh" || strings.Join(res.Header["X-Resp-Add"], ",") != "app,mesh" || res.Header["X-Internal"] != nil || res.Header.Get("X-App") != "web" {
		t.Errorf("response headers the client saw: %v", res.Header)
	}

	for _, tc := range []struct{ path, location string }{
		{"/https/a?x=1", "https://example.com/https/a?x=1"},
		{"/old/a/b?x=1", "http://web.default/new/a/b?x=1"},
		{"/old", "http://web.default/new"},
		{"/port/a", "http://web.default:8443/moved"},
	} {
		n := len(web.requests())
		res, _ := do(t, c, "GET", "http://web.default"+tc.path, nil, nil)
		want := 302
		if strings.HasPrefix(tc.path, "/https") {
			want = 301
		}
		if res.StatusCode != want || res.Header.Get("Location") != tc.location {
			t.Errorf("%s: %d to %q, want %d to %q", tc.path, res.StatusCode, res.Header.Get("Location"), want, tc.location)
		}
		if len(web.requests()) != n {
			t.Errorf("%s: a redirect reached the app", tc.path)
		}
	}

	for _, tc := range []struct{ path, host, seen string }{
		{"/api/items?id=7", "rewritten.example", "/v2/items"},
		{"/api", "rewritten.example", "/v2"},
		{"/full/x?id=7", "web.default", "/full"},
	} {
		res, body := do(t, c, "GET", "http://web.default"+tc.path, nil, nil)
		seen := web.requests()
		last := seen[len(seen)-1]
		if res.StatusCode != 200 || body != tc.seen || last.path != tc.seen || last.host != tc.host || (strings.Contains(tc.path, "?") && last.query != "id=7") {
			t.Errorf("%s: %d %q; the app saw %s %s?%s, want %s %s", tc.path, res.StatusCode, body, last.host, last.path, last.query, tc.host, tc.seen)
		}
	}

	res, body := do(t, c, "GET", "http://web.default/nowhere", nil, nil)
	if res.StatusCode != 500 || body != "no backend\n" || res.Header.Get("X-Resp-Set") != "mesh" {
		t.Errorf("rule without backends: %d %q %v", res.StatusCode, body, res.Header)
	}
	rs := l.obs.wait(t, 10)
	if last := rs[9]; last.Reason != admin.ReasonNoRoute || last.HTTP.RouteRule != 7 || last.Verdict != admin.VerdictError {
		t.Errorf("record %+v %+v", last, last.HTTP)
	}
}

// ReplacePrefixMatch replaces whole segments, as Gateway API's table shows.
func TestReplacePrefixMatch(t *testing.T) {
	for _, tc := range []struct{ path, prefix, value, want string }{
		{"/foo/bar", "/foo", "/xyz", "/xyz/bar"},
		{"/foo/bar", "/foo", "/xyz/", "/xyz/bar"},
		{"/foo/bar", "/foo/", "/xyz", "/xyz/bar"},
		{"/foo/bar", "/foo/", "/xyz/", "/xyz/bar"},
		{"/foo", "/foo", "/xyz", "/xyz"},
		{"/foo/", "/foo", "/xyz", "/xyz/"},
		{"/foo/bar", "/foo", "", "/bar"},
		{"/foo/", "/foo", "", "/"},
		{"/foo", "/foo", "", "/"},
		{"/foo/", "/foo", "/", "/"},
		{"/foo", "/foo", "/", "/"},
		{"/bar", "/", "/xyz", "/xyz/bar"},
	} {
		pm := PathModifier{Type: ReplacePrefixMatch, Value: tc.value}
		if got := pm.apply(tc.path, tc.prefix); got != tc.want {
			t.Errorf("%s with prefix %q replaced by %q: %q, want %q", tc.path, tc.prefix, tc.value, got, tc.want)
		}
	}
}

// A mirror gets a copy of each request, body included up to 64 KiB; the client's
// answer comes from the primary alone, and a slow or failing mirror is not felt.
func TestRouteMirror(t *testing.T) {
	var mode atomic.Int32
	l := newRouteLab(t, map[string]http.HandlerFunc{"shadow": func(w http.ResponseWriter, r *http.Request) {
		switch mode.Load() {
		case mirrorHangs:
			select {
			case <-r.Context().Done():
			case <-time.After(10 * time.Second):
			}
		case mirrorBreaks:
			if c, _, err := http.NewResponseController(w).Hijack(); err == nil {
				c.Close()
			}
		default:
			fmt.Fprint(w, "shadow")
		}
	}})
	r := rule(0, to("web", 1))
	r.Filters = []RouteFilter{{RequestHeaders: &HeaderModifier{Set: []Header{{"X-Routed", "1"}}}}, {Mirror: &Mirror{Backend: to("shadow", 1), Percent: 100}}}
	l.setRoutes(RouteTable{Port: 80, Rules: []RouteRule{r}, Matches: []RouteMatch{{Rule: 0}}})
	shadow := l.apps["shadow"]
	mirrored := func(what string) seenRequest {
		t.Helper()
		select {
		case s := <-shadow.got:
			return s
		case <-time.After(5 * time.Second):
			t.Fatalf("%s: no mirrored copy", what)
			return seenRequest{}
		}
	}
	for _, h2 := range []bool{false, true} {
		c := l.client(t, l.a, netip.AddrPortFrom(webVIP, 80), h2)
		res, body := do(t, c, "GET", "http://web.default/get?a=1", nil, nil)
		if res.StatusCode != 200 || body != "web /get" {
			t.Fatalf("h2 %v: %d %q, want web's answer", h2, res.StatusCode, body)
		}
		if s := mirrored("GET"); s.method != "GET" || s.path != "/get" || s.query != "a=1" || s.host != "web.default" || s.header.Get("X-Routed") != "1" {
			t.Errorf("h2 %v: mirror saw %+v", h2, s)
		}
		res, body = do(t, c, "POST", "http://web.default/post", strings.NewReader("hello"), nil)
		if res.StatusCode != 200 || body != "web /post" {
			t.Fatalf("h2 %v: %d %q", h2, res.StatusCode, body)
		}
		if s := mirrored("POST"); s.body != "hello" || s.path != "/post" {
			t.Errorf("h2 %v: mirror saw %+v", h2, s)
		}
		// A body of unknown length, read whole by the primary, is mirrored too.
		res, _ = do(t, c, "POST", "http://web.default/chunked", io.MultiReader(strings.NewReader("chun"), strings.NewReader("ked")), nil)
		if s := mirrored("chunked POST"); res.StatusCode != 200 || s.body != "chunked" {
			t.Errorf("h2 %v: mirror saw %+v", h2, s)
		}
	}

	// Over 64 KiB: not mirrored (the next request's copy arrives, this one's never).
	c := l.client(t, l.a, netip.AddrPortFrom(webVIP, 80), false)
	big := bytes.Repeat([]byte("x"), maxMirrorBody+1)
	if res, _ := do(t, c, "POST", "http://web.default/big", bytes.NewReader(big), nil); res.StatusCode != 200 {
		t.Fatalf("big: %d", res.StatusCode)
	}
	if res, _ := do(t, c, "POST", "http://web.default/big", io.NopCloser(bytes.NewReader(big)), nil); res.StatusCode != 200 {
		t.Fatalf("big, unknown length: %d", res.StatusCode)
	}
	do(t, c, "GET", "http://web.default/after", nil, nil)
	if s := mirrored("after big"); s.path != "/after" {
		t.Errorf("a body over 64 KiB was mirrored: %s", s.path)
	}

	// A mirror that hangs, then one that breaks the connection: neither is felt.
	for _, m := range []int32{mirrorHangs, mirrorBreaks} {
		mode.Store(m)
		for i := range 5 {
			start := time.Now()
			res, body := do(t, c, "GET", "http://web.default/slow", nil, nil)
			if res.StatusCode != 200 || body != "web /slow" || time.Since(start) > time.Second {
				t.Fatalf("mode %d, request %d: %d %q after %s", m, i, res.StatusCode, body, time.Since(start))
			}
			mirrored("failing mirror")
		}
	}
	if n := len(l.apps["web"].requests()); n != 6+3+10 {
		t.Errorf("the primary got %d requests, want each once", n)
	}

	// A share of 0 mirrors nothing.
	mode.Store(0)
	none := rule(0, to("web", 1)) // a new rule: the tables in force are not changed in place
	none.Filters = []RouteFilter{{Mirror: &Mirror{Backend: to("shadow", 1), Percent: 0}}}
	l.setRoutes(RouteTable{Port: 80, Rules: []RouteRule{none}, Matches: []RouteMatch{{Rule: 0}}})
	for range 20 {
		do(t, c, "GET", "http://web.default/none", nil, nil)
	}
	select {
	case s := <-shadow.got:
		t.Errorf("mirrored at 0%%: %+v", s)
	case <-time.After(100 * time.Millisecond):
	}
}

// What the test's shadow app does with a mirrored request.
const (
	mirrorAnswers int32 = iota
	mirrorHangs
	mirrorBreaks
)

// A rule's request timeout answers 504 at the deadline and cancels the upstream
// request, which the app sees.
func TestRouteRequestTimeout(t *testing.T) {
	canceled := make(chan time.Time, 4)
	l := newRouteLab(t, map[string]http.HandlerFunc{"web": func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Query().Get("fast") != "" {
			fmt.Fprint(w, "fast")
			return
		}
		select {
		case <-r.Context().Done():
			canceled <- time.Now()
		case <-time.After(2 * time.Second):
			fmt.Fprint(w, "late")
		}
	}})
	const timeout = 300 * time.Millisecond
	r := rule(0, to("web", 1))
	r.RequestTimeout = timeout
	r.Filters = []RouteFilter{{ResponseHeaders: &HeaderModifier{Set: []Header{{"X-Resp-Set", "mesh"}}}}}
	l.setRoutes(RouteTable{Port: 80, Rules: []RouteRule{r}, Matches: []RouteMatch{{Rule: 0}}})
	for i, h2 := range []bool{false, true} {
		c := l.client(t, l.a, netip.AddrPortFrom(webVIP, 80), h2)
		if res, body := do(t, c, "GET", "http://web.default/?fast=1", nil, nil); res.StatusCode != 200 || body != "fast" {
			t.Fatalf("h2 %v: a request within the timeout: %d %q", h2, res.StatusCode, body)
		}
		start := time.Now()
		res, body := do(t, c, "GET", "http://web.default/slow", nil, nil)
		took := time.Since(start)
		if res.StatusCode != http.StatusGatewayTimeout || body != "upstream request timeout\n" || res.Header.Get("X-Resp-Set") != "mesh" {
			t.Errorf("h2 %v: %d %q %v, want 504 upstream request timeout", h2, res.StatusCode, body, res.Header)
		}
		// A few ms past the deadline; the bound is loose for a loaded, race-checked run.
		if took < timeout || took > timeout+150*time.Millisecond {
			t.Errorf("h2 %v: answered after %s, want at %s", h2, took, timeout)
		}
		select {
		case at := <-canceled:
			if at.Sub(start) < timeout {
				t.Errorf("h2 %v: upstream canceled after %s, before the deadline", h2, at.Sub(start))
			}
		case <-time.After(time.Second):
			t.Errorf("h2 %v: the app never saw its request canceled", h2)
		}
		rec := l.obs.wait(t, 2*i+2)[2*i+1]
		if rec.Verdict != admin.VerdictError || rec.Reason != admin.ReasonTimeout || rec.HTTP.Status != 504 || rec.HTTP.Route != "HTTPRoute default/r" {
			t.Errorf("h2 %v: record %+v %+v", h2, rec, rec.HTTP)
		}
	}
}

// A new state swaps the tables at once: a request in flight keeps the rule and
// Service it started with, the next takes the new one, and none fails.
func TestRouteSwap(t *testing.T) {
	release := make(chan struct{})
	parked := make(chan struct{}, 1)
	l := newRouteLab(t, map[string]http.HandlerFunc{"web": func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/park" {
			parked <- struct{}{}
			<-release
		}
		w.Header().Set("X-App", "web")
	}})
	table := func(web, canary uint32) RouteTable {
		return RouteTable{Port: 80, Rules: []RouteRule{rule(0, to("web", web), to("canary", canary))}, Matches: []RouteMatch{{Rule: 0}}}
	}
	l.setRoutes(table(1, 0))
	c := l.client(t, l.a, netip.AddrPortFrom(frontVIP, 80), false)
	inFlight := make(chan string, 1)
	go func() {
		res, err := c.Get("http://front.default/park")
		if err != nil {
			inFlight <- err.Error()
			return
		}
		res.Body.Close()
		inFlight <- fmt.Sprint(res.StatusCode, " ", res.Header.Get("X-App"))
	}()
	<-parked
	l.setRoutes(table(0, 1))
	if res, _ := do(t, c, "GET", "http://front.default/", nil, nil); res.Header.Get("X-App") != "canary" {
		t.Errorf("after the swap: from %q, want canary", res.Header.Get("X-App"))
	}
	close(release)
	if got := <-inFlight; got != "200 web" {
		t.Errorf("the request in flight during the swap: %s, want 200 from web", got)
	}

	// Clients busy while the weights change ten times.
	var wg sync.WaitGroup
	var failed, total atomic.Int64
	stop := make(chan struct{})
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := l.client(t, l.a, netip.AddrPortFrom(frontVIP, 80), false)
			for {
				select {
				case <-stop:
					return
				default:
				}
				res, err := c.Get("http://front.default/")
				total.Add(1)
				if err != nil {
					failed.Add(1)
					continue
				}
				io.Copy(io.Discard, res.Body)
				res.Body.Close()
				if res.StatusCode != 200 {
					failed.Add(1)
				}
			}
		}()
	}
	// Each swap waits for requests to have run since the last one, so every table
	// carries some however slow the machine is.
	deadline := time.Now().Add(30 * time.Second)
	for i := range 10 {
		for seen := total.Load(); total.Load() < seen+4 && time.Now().Before(deadline); {
			time.Sleep(time.Millisecond)
		}
		l.setRoutes(table(uint32(i%2), uint32(1-i%2)))
	}
	close(stop)
	wg.Wait()
	if failed.Load() != 0 || total.Load() < 40 {
		t.Errorf("%d of %d requests failed during the swaps", failed.Load(), total.Load())
	}
}
