package proxy

import (
	"bufio"
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
	"github.com/ferrymesh/ferry/api/mesh"
	"github.com/ferrymesh/ferry/internal/loopback"
)

// decisions collects what the proxy tells an AuthzObserver.
type decisions struct {
	requests
	mu  sync.Mutex
	got []string // "policy action"
}

func (d *decisions) Authorized(policy, action string) {
	d.mu.Lock()
	d.got = append(d.got, policy+" "+action)
	d.mu.Unlock()
}

func (d *decisions) list() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]string(nil), d.got...)
}

func pfx(s string) netip.Prefix { return netip.MustParsePrefix(s) }

func TestAuthzDecide(t *testing.T) {
	fromA := callerOf(wa.Identity, wa.IPs[0])
	fromC := callerOf(wc.Identity, wc.IPs[0])
	other := callerOf("spiffe://cluster.local/ns/test/sa/x", netip.MustParseAddr("10.1.3.7"))
	plain := callerOf("", netip.MustParseAddr("192.0.2.9"))
	get := &authzRequest{method: "GET", path: "/api/v1", host: "b.default.svc", header: http.Header{"X-Tenant": {"t1", "t2"}}}
	post := &authzRequest{method: "POST", path: "/admin", host: "b.default.svc", header: http.Header{}}
	for _, tc := range []struct {
		name     string
		policies []AuthzPolicy
		c        caller
		port     uint16
		req      *authzRequest
		denied   string // the deciding policy, "" allowed
		audits   []string
	}{
		{name: "no policy allows", c: plain, port: 80},
		{name: "allow by identity suffix", c: fromA, port: 80,
			policies: []AuthzPolicy{{Name: "ns/allow", Action: AuthzAllow, Rules: []AuthzRule{{From: []AuthzSource{{Identities: []string{"*/sa/a"}}}}}}}},
		{name: "allow denies the rest", c: fromC, port: 80, denied: "ns/allow",
			policies: []AuthzPolicy{{Name: "ns/allow", Action: AuthzAllow, Rules: []AuthzRule{{From: []AuthzSource{{Identities: []string{"*/sa/a"}}}}}}}},
		{name: "allow by prefix", c: fromC, port: 80,
			policies: []AuthzPolicy{{Name: "ns/allow", Action: AuthzAllow, Rules: []AuthzRule{{From: []AuthzSource{{Identities: []string{"spiffe://cluster.local/ns/default/*"}}}}}}}},
		{name: "default deny: an allow without rules", c: fromA, port: 80, denied: "ferry-system/deny-all",
			policies: []AuthzPolicy{{Name: "ferry-system/deny-all", Action: AuthzAllow}}},
		{name: "default deny lifted by another allow", c: fromA, port: 80,
			policies: []AuthzPolicy{{Name: "ferry-system/deny-all", Action: AuthzAllow},
				{Name: "default/a-in", Action: AuthzAllow, Rules: []AuthzRule{{From: []AuthzSource{{Namespaces: []string{"default"}}}}}}}},
		{name: "deny before allow", c: fromA, port: 80, denied: "ns/deny",
			policies: []AuthzPolicy{{Name: "ns/allow", Action: AuthzAllow, Rules: []AuthzRule{{}}},
				{Name: "ns/deny", Action: AuthzDeny, Rules: []AuthzRule{{From: []AuthzSource{{Namespaces: []string{"default"}}}}}}}},
		{name: "notNamespaces", c: other, port: 80, denied: "ns/deny",
			policies: []AuthzPolicy{{Name: "ns/deny", Action: AuthzDeny, Rules: []AuthzRule{{From: []AuthzSource{{NotNamespaces: []string{"default"}}}}}}}},
		{name: "notNamespaces spares its own", c: fromA, port: 80,
			policies: []AuthzPolicy{{Name: "ns/deny", Action: AuthzDeny, Rules: []AuthzRule{{From: []AuthzSource{{NotNamespaces: []string{"default"}}}}}}}},
		{name: "notIdentities * denies plaintext", c: plain, port: 80, denied: "ns/mtls-only",
			policies: []AuthzPolicy{{Name: "ns/mtls-only", Action: AuthzDeny, Rules: []AuthzRule{{From: []AuthzSource{{NotIdentities: []string{"*"}}}}}}}},
		{name: "notIdentities * spares mTLS", c: fromA, port: 80,
			policies: []AuthzPolicy{{Name: "ns/mtls-only", Action: AuthzDeny, Rules: []AuthzRule{{From: []AuthzSource{{NotIdentities: []string{"*"}}}}}}}},
		{name: "plaintext matches no namespace", c: plain, port: 80, denied: "ns/allow",
			policies: []AuthzPolicy{{Name: "ns/allow", Action: AuthzAllow, Rules: []AuthzRule{{From: []AuthzSource{{Namespaces: []string{"default"}}}}}}}},
		{name: "plaintext allowed by ipBlocks", c: plain, port: 80,
			policies: []AuthzPolicy{{Name: "ns/allow", Action: AuthzAllow, Rules: []AuthzRule{{From: []AuthzSource{{IPBlocks: []netip.Prefix{pfx("192.0.2.0/24")}}}}}}}},
		{name: "notIPBlocks", c: plain, port: 80, denied: "ns/allow",
			policies: []AuthzPolicy{{Name: "ns/allow", Action: AuthzAllow, Rules: []AuthzRule{{From: []AuthzSource{{IPBlocks: []netip.Prefix{pfx("192.0.0.0/8")}, NotIPBlocks: []netip.Prefix{pfx("192.0.2.0/24")}}}}}}}},
		{name: "port", c: fromA, port: 9090, denied: "ns/deny",
			policies: []AuthzPolicy{{Name: "ns/deny", Action: AuthzDeny, Rules: []AuthzRule{{To: []AuthzOperation{{Ports: []uint16{9090}}}}}}}},
		{name: "notPorts", c: fromA, port: 9090,
			policies: []AuthzPolicy{{Name: "ns/deny", Action: AuthzDeny, Rules: []AuthzRule{{To: []AuthzOperation{{NotPorts: []uint16{9090}}}}}}}},
		// HTTP conditions on a TCP connection: an Allow cannot match, a Deny matches
		// on the rest of its rule (Istio).
		{name: "tcp: allow with methods does not allow", c: fromA, port: 80, denied: "ns/allow-get",
			policies: []AuthzPolicy{{Name: "ns/allow-get", Action: AuthzAllow, Rules: []AuthzRule{{To: []AuthzOperation{{Methods: []string{"GET"}}}}}}}},
		{name: "tcp: deny with paths denies", c: fromA, port: 80, denied: "ns/deny-admin",
			policies: []AuthzPolicy{{Name: "ns/deny-admin", Action: AuthzDeny, Rules: []AuthzRule{{To: []AuthzOperation{{Paths: []string{"/admin"}}}}}}}},
		{name: "tcp: deny with paths on another port", c: fromA, port: 80,
			policies: []AuthzPolicy{{Name: "ns/deny-admin", Action: AuthzDeny, Rules: []AuthzRule{{To: []AuthzOperation{{Ports: []uint16{8080}, Paths: []string{"/admin"}}}}}}}},
		{name: "http: allow get", c: fromA, port: 80, req: get,
			policies: []AuthzPolicy{{Name: "ns/allow-get", Action: AuthzAllow, Rules: []AuthzRule{{To: []AuthzOperation{{Methods: []string{"GET"}, Paths: []string{"/api/*"}, Hosts: []string{"*.svc"}}}}}}}},
		{name: "http: allow get, not post", c: fromA, port: 80, req: post, denied: "ns/allow-get",
			policies: []AuthzPolicy{{Name: "ns/allow-get", Action: AuthzAllow, Rules: []AuthzRule{{To: []AuthzOperation{{Methods: []string{"GET"}}}}}}}},
		{name: "http: header's second value does not hide", c: fromA, port: 80, req: get, denied: "ns/deny-t2",
			policies: []AuthzPolicy{{Name: "ns/deny-t2", Action: AuthzDeny, Rules: []AuthzRule{{To: []AuthzOperation{{Headers: []AuthzHeader{{Name: "x-tenant", Values: []string{"t2"}}}}}}}}}},
		{name: "http: header absent", c: fromA, port: 80, req: post,
			policies: []AuthzPolicy{{Name: "ns/deny-t", Action: AuthzDeny, Rules: []AuthzRule{{To: []AuthzOperation{{Headers: []AuthzHeader{{Name: "x-tenant"}}}}}}}}},
		{name: "audit decides nothing", c: fromA, port: 80, audits: []string{"ns/audit"},
			policies: []AuthzPolicy{{Name: "ns/audit", Action: AuthzAudit, Rules: []AuthzRule{{}}}}},
		{name: "audit with a deny", c: fromA, port: 80, denied: "ns/deny", audits: []string{"ns/audit"},
			policies: []AuthzPolicy{{Name: "ns/audit", Action: AuthzAudit, Rules: []AuthzRule{{}}}, {Name: "ns/deny", Action: AuthzDeny, Rules: []AuthzRule{{}}}}},
		{name: "a deny without rules matches nothing", c: fromA, port: 80,
			policies: []AuthzPolicy{{Name: "ns/deny", Action: AuthzDeny}}},
		{name: "another workload's policy", c: fromA, port: 80,
			policies: []AuthzPolicy{{Name: "ns/deny", Action: AuthzDeny, Workloads: []string{"uc"}, Rules: []AuthzRule{{}}}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := &Proxy{}
			for i := range tc.policies {
				if tc.policies[i].Workloads == nil {
					tc.policies[i].Workloads = []string{"ub"}
				}
			}
			p.SetAuthorization(tc.policies)
			d := p.decideAuthz("ub", tc.c, tc.port, tc.req)
			audits, denied := d.Audits, d.Denied
			got := ""
			if denied != nil {
				got = denied.Policy
			}
			if got != tc.denied || strings.Join(audits, ",") != strings.Join(tc.audits, ",") {
				t.Fatalf("denied by %q, audits %v; want %q, %v", got, audits, tc.denied, tc.audits)
			}
		})
	}
}

func TestNormalizePath(t *testing.T) {
	for in, want := range map[string]string{
		"/admin":          "/admin",
		"/admin/":         "/admin/",
		"//admin":         "/admin",
		"/./admin":        "/admin",
		"/x/../admin":     "/admin",
		"/x/%2E%2E/admin": "/admin",
		"/../../admin":    "/admin",
		"/%61dmin":        "/admin",
		"/admin?x=1":      "/admin",
		"/admin#frag":     "/admin",
		"/a%2fb":          "/a%2Fb", // an encoded slash stays in its segment
		"/a%5cb":          "/a%5Cb",
		"/a/b/.":          "/a/b/",
		"/a/b/..":         "/a/",
		"/":               "/",
		"/..":             "/",
		"/a b":            "/a b",
	} {
		got, err := normalizePath(in, mesh.EscapedKeep)
		if err != nil || got != want {
			t.Errorf("normalizePath(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	// OPTIONS * has no path: it is left alone, not refused.
	r := httptest.NewRequest(http.MethodOptions, "*", nil)
	if err := normalizeRequest(r, mesh.EscapedKeep); err != nil || r.RequestURI != "*" {
		t.Errorf("OPTIONS *: %v, %q", err, r.RequestURI)
	}
	r = httptest.NewRequest(http.MethodGet, "/a//b/%2e%2e/c?x=%2e#f", nil)
	if err := normalizeRequest(r, mesh.EscapedKeep); err != nil || r.RequestURI != "/a/c?x=%2e" || r.URL.Path != "/a/c" {
		t.Errorf("GET: %v, %q, %q", err, r.RequestURI, r.URL.Path)
	}
	for _, bad := range []string{"/a%zz", "/a%2", "admin"} {
		if got, err := normalizePath(bad, mesh.EscapedKeep); err == nil {
			t.Errorf("normalizePath(%q) = %q, want an error", bad, got)
		}
	}
}

// A connection from a to b on this node meets b's policies in a's proxy: denied,
// it is reset before b's app is dialled, and its record names the policy.
func TestSameNodeDeniedByPolicy(t *testing.T) {
	tp := newTestProxy(t)
	obs := &decisions{}
	tp.cfg.Observer = obs
	tp.SetAuthorization([]AuthzPolicy{{Name: "default/deny-a", Action: AuthzDeny, Workloads: []string{"ub"},
		Rules: []AuthzRule{{From: []AuthzSource{{Identities: []string{wa.Identity}}}, To: []AuthzOperation{{Ports: []uint16{8080}}}}}}})
	_, err, rec := tp.outbound(t, tp.a, netip.AddrPortFrom(wb.IPs[0], 8080), "ping")
	if err == nil {
		t.Fatal("denied connection not reset")
	}
	if rec.Verdict != admin.VerdictDenied || rec.Reason != admin.ReasonPolicy || rec.Policy != "default/deny-a" {
		t.Fatalf("record %+v", rec)
	}
	if d := tp.netB.dials(); len(d) != 0 {
		t.Fatalf("b's app dialled: %v", d)
	}
	if got := obs.list(); len(got) != 1 || got[0] != "default/deny-a deny" {
		t.Fatalf("decisions %v", got)
	}
	// Another port is not the policy's.
	if reply, err, rec := tp.outbound(t, tp.a, netip.AddrPortFrom(wb.IPs[0], 8081), "ping"); err != nil || reply != "ping" || rec.Verdict != admin.VerdictForwarded {
		t.Fatalf("port 8081: %q, %v, %+v", reply, err, rec)
	}
}

// Plaintext into a pod has no identity: an Allow by namespace refuses it, one by
// address lets it through.
func TestPlaintextInboundPolicy(t *testing.T) {
	tp := newTestProxy(t)
	app := loopback.Serve(t, loopback.Echo)
	local := Workload{UID: "ul", Name: "default/l", Identity: "spiffe://cluster.local/ns/default/sa/l", Node: "node1", IPs: []netip.Addr{netip.MustParseAddr("127.0.0.1")}}
	pd := tp.pod(local, &loopNet{app: app})
	ln := loopback.Listen(t)
	go tp.serveInbound(pd, ln)
	try := func() (string, Conn) {
		t.Helper()
		_, before := tp.Connections()
		var reply []byte
		// On loopback a reset can come back before connect returns.
		if c, err := net.Dial("tcp", ln.Addr().String()); err == nil {
			_, _ = c.Write([]byte("hi"))
			_ = c.(*net.TCPConn).CloseWrite()
			reply, _ = io.ReadAll(c)
			c.Close()
		}
		deadline := time.Now().Add(5 * time.Second)
		for {
			_, ended := tp.Connections()
			if len(ended) > len(before) || time.Now().After(deadline) {
				if len(ended) == len(before) {
					t.Fatal("no record")
				}
				return string(reply), ended[len(ended)-1]
			}
			time.Sleep(time.Millisecond)
		}
	}
	tp.SetAuthorization([]AuthzPolicy{{Name: "default/same-ns", Action: AuthzAllow, Workloads: []string{"ul"},
		Rules: []AuthzRule{{From: []AuthzSource{{Namespaces: []string{"default"}}}}}}})
	if reply, rec := try(); reply != "" || rec.Reason != admin.ReasonPolicy || rec.Policy != "default/same-ns" || rec.Security != admin.Plaintext {
		t.Fatalf("by namespace: %q, %+v", reply, rec)
	}
	tp.SetAuthorization([]AuthzPolicy{{Name: "default/loopback", Action: AuthzAllow, Workloads: []string{"ul"},
		Rules: []AuthzRule{{From: []AuthzSource{{IPBlocks: []netip.Prefix{pfx("127.0.0.0/8")}}}}}}})
	if reply, rec := try(); reply != "hi" || rec.Verdict != admin.VerdictForwarded {
		t.Fatalf("by address: %q, %+v", reply, rec)
	}
}

// Requests a tunnel stream carries into b are decided one by one on the
// normalised path, which is also what b's app receives.
func TestL7InboundPolicy(t *testing.T) {
	tp := newTestProxy(t)
	obs := &decisions{}
	tp.cfg.Observer, tp.conns.obs = obs, obs
	var mu sync.Mutex
	var seen []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen = append(seen, r.URL.RequestURI())
		mu.Unlock()
	}))
	t.Cleanup(srv.Close)
	tp.netB.app = netip.MustParseAddrPort(srv.Listener.Addr().String())
	tp.SetAuthorization([]AuthzPolicy{{Name: "default/no-admin", Action: AuthzDeny, Workloads: []string{"ub"},
		Rules: []AuthzRule{{To: []AuthzOperation{{Paths: []string{"/admin", "/admin/*"}}}}}}})
	send := inboundHTTP(t, tp)
	tricks := []string{"/admin", "/admin/", "//admin", "/./admin", "/x/../admin", "/%61dmin", "/admin/users", "/%2e%2e/admin", "/admin?x=1"}
	for _, p := range tricks {
		if s := send(p); s != http.StatusForbidden {
			t.Errorf("%s: %d, want 403", p, s)
		}
	}
	for _, p := range []string{"/adminx", "/public//a/./b/../c?q=1"} {
		if s := send(p); s != http.StatusOK {
			t.Errorf("%s: %d, want 200", p, s)
		}
	}
	recs := obs.wait(t, len(tricks)+2)
	for _, r := range recs[:len(tricks)] {
		if r.Verdict != admin.VerdictDenied || r.Reason != admin.ReasonPolicy || r.Policy != "default/no-admin" || r.HTTP.Status != 403 {
			t.Errorf("denied request's record %+v %+v", r, r.HTTP)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if strings.Join(seen, " ") != "/adminx /public/a/c?q=1" {
		t.Fatalf("the app saw %v; want only the allowed requests, normalised", seen)
	}
	if n := len(obs.list()); n != len(tricks) {
		t.Fatalf("%d decisions counted, want %d", n, len(tricks))
	}
}

// inboundHTTP opens a tunnel stream from a into b that carries HTTP and returns
// a function sending GET target on it, which returns the status.
func inboundHTTP(t *testing.T, tp *testProxy) func(target string) int {
	client, accepted := loopback.Pair(t)
	tp.serveInboundHTTP(tp.b, tunnel.StreamInfo{PeerID: wa.Identity, Remote: netip.AddrPortFrom(wa.IPs[0], 40000), Target: netip.AddrPortFrom(wb.IPs[0], 8080)}, accepted)
	br := bufio.NewReader(client)
	return func(target string) int {
		t.Helper()
		if _, err := io.WriteString(client, "GET "+target+" HTTP/1.1\r\nHost: b\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		res, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("%s: %v", target, err)
		}
		_, _ = io.Copy(io.Discard, res.Body)
		res.Body.Close()
		return res.StatusCode
	}
}

// A request from a to a Service endpoint on this node (b) meets b's policies in
// a's L7 proxy, per request: no destination proxy will see it.
func TestSameNodeL7Policy(t *testing.T) {
	tp, obs, seen := newL7Proxy(t, RoundRobin, "http")
	svc := web
	svc.Ports = []ServicePort{{Port: 80, AppProtocol: "http"}, {Port: 9000}}
	svc.Backends = svc.Backends[:1] // b only
	tp.SetServices([]Service{svc})
	tp.SetAuthorization([]AuthzPolicy{{Name: "default/b-reads", Action: AuthzAllow, Workloads: []string{"ub"},
		Rules: []AuthzRule{{From: []AuthzSource{{Identities: []string{wa.Identity}}}, To: []AuthzOperation{{Methods: []string{"GET"}, Paths: []string{"/ok"}}}}}}})
	c := tp.client(t, netip.AddrPortFrom(vip, 80), false)
	if res, _ := get(t, c, "http://web.default/admin"); res.StatusCode != http.StatusForbidden {
		t.Fatalf("/admin: %d, want 403", res.StatusCode)
	}
	if res, body := get(t, c, "http://web.default//ok"); res.StatusCode != http.StatusOK || !strings.HasSuffix(body, " /ok 0") {
		t.Fatalf("//ok: %d %q, want 200 from the app for /ok", res.StatusCode, body)
	}
	recs := obs.wait(t, 2)
	if r := recs[0]; r.Verdict != admin.VerdictDenied || r.Reason != admin.ReasonPolicy || r.Policy != "default/b-reads" {
		t.Fatalf("denied request's record %+v", r)
	}
	if len(*seen) != 1 {
		t.Fatalf("the app saw %d requests, want 1", len(*seen))
	}
}
