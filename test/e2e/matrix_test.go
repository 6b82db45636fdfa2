package e2e

// The connectivity matrix, on a lab of its own (prefix "mx", pods in
// 10.115.0.0/16) with the operator in local mode, paths decoded (escaped
// slashes Decode) and policy paths case-insensitive: same node and across nodes
// × enrolled and not-enrolled client × pod IP and Service cluster IP × allowed
// and denied, at L4 and at L7. Every cell gives what a user expects (bytes
// echoed, a refused or reset connection, HTTP 403), a flow that says so with the
// deciding policy, and `ferry explain` gives the same decision and rule.
//
// The not-enrolled client has no cell with a cluster IP: nothing captures its
// connections and the lab has no kube-proxy, so nothing routes a cluster IP for
// it (in a cluster kube-proxy sends it to a pod IP: the pod IP cells).

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/api/admin"
	"github.com/ferrymesh/ferry/api/ferryv1"
	"github.com/ferrymesh/ferry/lab"
	labecho "github.com/ferrymesh/ferry/lab/echo"
)

const (
	mxPrefix = "mx"
	mxPodNet = 115
	// Ports of b and c: a TCP echo server policies allow, one they deny, an
	// HTTP echo server with a Deny of /admin, and an HTTP one they deny whole.
	mxAllowPort   = 8080
	mxDenyPort    = 8082
	mxHTTPPort    = 8090
	mxRestartPort = 8091
)

var mxLab = onceLab{what: "matrix lab", bringUp: mxBringUp}

// mxVIP is the cluster IP of pod's Service of kind ("tcp", "deny", "http").
func mxVIP(pod, kind string) netip.Addr {
	n := map[string]byte{"tcp": 1, "deny": 2, "http": 3}[kind]
	if pod == "c" {
		n += 10
	}
	return netip.AddrFrom4([4]byte{10, 96, 115, n})
}

func mxBringUp() (*env, error) {
	cfg := lab.Config{
		Prefix: mxPrefix,
		PodNet: mxPodNet,
		Nodes: []lab.NodeConfig{
			{Name: "node1", Pods: []lab.PodConfig{
				{Name: "a", Namespace: "shop", ServiceAccount: "web", Enrolled: true},
				{Name: "u", Namespace: "shop", ServiceAccount: "legacy", Enrolled: false},
				{Name: "b", Namespace: "shop", ServiceAccount: "api", Enrolled: true},
			}},
			{Name: "node2", Pods: []lab.PodConfig{
				{Name: "c", Namespace: "shop", ServiceAccount: "db", Enrolled: true},
			}},
		},
		Operator: lab.OperatorConfig{Args: []string{"--escaped-slashes", "Decode", "--case-insensitive-paths"}},
	}
	for _, pod := range []string{"b", "c"} {
		cfg.Services = append(cfg.Services,
			lab.ServiceConfig{Name: pod + "-tcp", Namespace: "shop", ClusterIP: mxVIP(pod, "tcp"), Port: servicePort, TargetPort: mxAllowPort, AppProtocol: "tcp", Pods: []string{pod}},
			lab.ServiceConfig{Name: pod + "-deny", Namespace: "shop", ClusterIP: mxVIP(pod, "deny"), Port: servicePort, TargetPort: mxDenyPort, AppProtocol: "tcp", Pods: []string{pod}},
			lab.ServiceConfig{Name: pod + "-http", Namespace: "shop", ClusterIP: mxVIP(pod, "http"), Port: servicePort, TargetPort: mxHTTPPort, AppProtocol: "http", Pods: []string{pod}},
		)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	e, err := newEnv(ctx, cfg, "ferry", "ferry-agent", "ferry-operator")
	if err != nil {
		return nil, err
	}
	for _, pod := range []string{"b", "c"} {
		for _, port := range []int{mxAllowPort, mxDenyPort} {
			if err := e.startServer(ctx, pod, port); err != nil {
				return e.fail(err)
			}
		}
		if err := e.startServer(ctx, pod, mxHTTPPort, "--http"); err != nil {
			return e.fail(err)
		}
	}
	if err := e.startServer(ctx, "c", mxRestartPort, "--http"); err != nil {
		return e.fail(err)
	}
	return e, nil
}

// mxPolicies: an Allow of the ports (so allowed cells name a rule too), a Deny
// of the deny ports, and a Deny of /admin on the HTTP port.
const mxPolicies = `apiVersion: ferry.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: mx-allow, namespace: shop, generation: {gen}}
spec:
  action: Allow
  rules:
  - to: [{ports: [8080, 8090]}]
---
apiVersion: ferry.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: mx-deny-port, namespace: shop, generation: {gen}}
spec:
  action: Deny
  rules:
  - to: [{ports: [8082, 8091]}]
---
apiVersion: ferry.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: mx-deny-admin, namespace: shop, generation: {gen}}
spec:
  action: Deny
  rules:
  - to: [{ports: [8090], paths: ["/admin", "/admin/*"]}]
`

// mxCell is one cell of the matrix and what it must give.
type mxCell struct {
	client, dst string // pod, and host:port
	path        string // "" at L4; else an HTTP GET of this path
	// status: 0 echoed (L4) or the HTTP status; -1 refused or reset.
	status int
	// policy and rule are explain's deciding policy and rule; denied says the
	// verdict, and flowNode the agent whose flow must name the policy.
	policy   string
	rule     int
	denied   bool
	flowNode string
}

func (c mxCell) String() string {
	s := c.client + "→" + c.dst
	if c.path != "" {
		s += " GET " + c.path
	}
	return s
}

func TestMatrix(t *testing.T) {
	e := mxLab.get(t)
	e.waitEnrolled(t, "node1", "shop/a", "shop/b")
	e.waitEnrolled(t, "node2", "shop/c")
	e.apply(t, "mx-policies.yaml", mxPolicies)

	pod := func(p string, port int) string { return e.addr(p, port) }
	vip := func(p, kind string) string { return netip.AddrPortFrom(mxVIP(p, kind), servicePort).String() }
	const allow, denyPort, denyAdmin = "shop/mx-allow", "shop/mx-deny-port", "shop/mx-deny-admin"
	node := map[string]string{"b": "node1", "c": "node2"}
	var cells []mxCell
	for _, dst := range []string{"b", "c"} {
		n := node[dst]
		cells = append(cells,
			// L4, enrolled client: pod IP and Service.
			mxCell{client: "a", dst: pod(dst, mxAllowPort), policy: allow, rule: 0},
			mxCell{client: "a", dst: pod(dst, mxDenyPort), status: -1, policy: denyPort, rule: 0, denied: true, flowNode: "node1"},
			mxCell{client: "a", dst: vip(dst, "tcp"), policy: allow, rule: 0},
			mxCell{client: "a", dst: vip(dst, "deny"), status: -1, policy: denyPort, rule: 0, denied: true, flowNode: "node1"},
			// L4, not enrolled: plaintext into the destination's inbound capture.
			mxCell{client: "u", dst: pod(dst, mxAllowPort), policy: allow, rule: 0},
			mxCell{client: "u", dst: pod(dst, mxDenyPort), status: -1, policy: denyPort, rule: 0, denied: true, flowNode: n},
			// L7 through the Service: each request decided on its normalised path.
			mxCell{client: "a", dst: vip(dst, "http"), path: "/request/ok", status: 200, policy: allow, rule: 0},
			mxCell{client: "a", dst: vip(dst, "http"), path: "/admin", status: 403, policy: denyAdmin, rule: 0, denied: true, flowNode: n},
			// The same port by pod IP is carried whole (L4): the Deny's path rule
			// cannot be decided on a connection, and refuses it (the stricter reading).
			mxCell{client: "a", dst: pod(dst, mxHTTPPort), path: "/request/ok", status: -1, policy: denyAdmin, rule: 0, denied: true, flowNode: "node1"},
			mxCell{client: "u", dst: pod(dst, mxHTTPPort), path: "/request/ok", status: -1, policy: denyAdmin, rule: 0, denied: true, flowNode: n},
		)
		if dst == "c" {
			// Across nodes the destination's agent records the refusal too.
			for i := range cells[len(cells)-10:] {
				c := &cells[len(cells)-10+i]
				if c.denied && c.client == "a" && c.path == "" {
					c.flowNode = "node2"
				}
			}
		}
	}
	for _, c := range cells {
		t.Run(strings.NewReplacer("/", "_", ":", "_").Replace(c.String()), func(t *testing.T) {
			since := time.Now()
			e.mxTry(t, c)
			e.mxExplainAgrees(t, c)
			if c.denied {
				e.mxDeniedFlow(t, c, since)
			}
		})
	}
}

// mxDeniedFlow waits for the flow of c's refusal on c.flowNode's agent, naming
// c's policy.
func (e *env) mxDeniedFlow(t *testing.T, c mxCell, since time.Time) {
	t.Helper()
	from := e.pod(c.client).IP.String()
	var seen []*ferryv1.Flow
	for deadline := time.Now().Add(carryWait); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		out, err := exec.Command(filepath.Join(e.bin, "ferry"), "observe", "--lab", mxPrefix, "-o", "json", "--since", sinceText(since)).Output()
		if err != nil {
			t.Fatalf("ferry observe: %v", err)
		}
		seen = parseFlows(t, out)
		for _, f := range seen {
			if f.GetNode() == c.flowNode && f.GetSource().GetIp() == from && f.GetVerdict() == ferryv1.Verdict_VERDICT_DROPPED &&
				f.GetPolicy() == c.policy {
				return
			}
		}
	}
	var lines []string
	for _, f := range seen {
		lines = append(lines, flowText(f)+" policy="+f.GetPolicy())
	}
	t.Fatalf("%s: no flow on %s says %s denied it; flows since:\n%s", c, c.flowNode, c.policy, strings.Join(lines, "\n"))
}

// mxTry runs c's client and checks what it saw.
func (e *env) mxTry(t *testing.T, c mxCell) {
	t.Helper()
	if c.path == "" {
		if c.status == -1 {
			e.mustRun(t, c.client, "refused", c.dst)
		} else {
			e.mustRun(t, c.client, "echo", c.dst, "4096")
		}
		return
	}
	status, _ := e.mxGet(t, c.client, c.dst, c.path)
	if c.status == -1 && status != 0 || c.status != -1 && status != c.status {
		t.Fatalf("%s: HTTP status %d; want %d (0: no answer, the connection refused or reset)", c, status, c.status)
	}
}

// mxGet sends GET path (as given: curl --path-as-is) from pod to dst and returns
// the status (0 when the connection was refused or reset) and the body.
func (e *env) mxGet(t *testing.T, pod, dst, path string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	out, _ := e.lab.Command(ctx, pod, "curl", "-sS", "--path-as-is", "--max-time", "10", "-w", "\n%{http_code}", "http://"+dst+path).Output()
	s := strings.TrimSpace(string(out))
	i := strings.LastIndexByte(s, '\n')
	code, err := strconv.Atoi(s[i+1:])
	if err != nil {
		t.Fatalf("curl %s%s from %s: %q", dst, path, pod, out)
	}
	if i < 0 {
		return code, ""
	}
	return code, s[:i]
}

// mxExplain runs `ferry explain` for the lab.
func (e *env) mxExplain(t *testing.T, args ...string) admin.Explain {
	t.Helper()
	out, err := exec.Command(filepath.Join(e.bin, "ferry"), append([]string{"explain", "--lab", mxPrefix, "-o", "json"}, args...)...).Output()
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		t.Fatalf("ferry explain %v: %v\n%s", args, err, stderr)
	}
	var ex admin.Explain
	if err := json.Unmarshal(out, &ex); err != nil {
		t.Fatalf("ferry explain json: %v\n%s", err, out)
	}
	return ex
}

// mxExplainAgrees checks that explain gives c's decision and rule, decided by
// the destination's agent.
func (e *env) mxExplainAgrees(t *testing.T, c mxCell) {
	t.Helper()
	src := "shop/" + c.client
	if c.client == "u" {
		src = e.pod("u").IP.String()
	}
	args := []string{src, c.dst}
	if c.path != "" {
		args = append(args, "--http", "GET", c.path)
	}
	ex := e.mxExplain(t, args...)
	if len(ex.Decisions) != 1 {
		t.Fatalf("%s: explain gave %d decisions: %+v", c, len(ex.Decisions), ex)
	}
	d := ex.Decisions[0]
	if d.Verdict.Allowed == c.denied || d.Verdict.Policy != c.policy || d.Verdict.Rule != c.rule || d.DecidedBy != d.Node {
		t.Fatalf("%s: explain says %+v (decided by %s for %s); want denied %t by %s rule %d", c, d.Verdict, d.DecidedBy, d.Node, c.denied, c.policy, c.rule)
	}
	if c.client == "a" && (ex.Capture == nil || !ex.Capture.Captured || !ex.Capture.InEnrolledNetns) {
		t.Fatalf("%s: explain's capture %+v; want captured, in enrolled_netns", c, ex.Capture)
	}
	if c.client == "u" && (ex.Source.Enrolled || d.Caller != "") {
		t.Fatalf("%s: explain's source %+v caller %q; want plaintext", c, ex.Source, d.Caller)
	}
}

// A Deny of /admin holds against every spelling of it, through the Service and
// across nodes, with paths decoded and matched case-insensitively; the app
// receives the normalised path; explain normalises alike.
func TestMatrixPathTricks(t *testing.T) {
	e := mxLab.get(t)
	e.waitEnrolled(t, "node1", "shop/a", "shop/b")
	e.waitEnrolled(t, "node2", "shop/c")
	e.apply(t, "mx-policies.yaml", mxPolicies)
	for _, dst := range []string{"b", "c"} {
		svc := netip.AddrPortFrom(mxVIP(dst, "http"), servicePort).String()
		for _, p := range []string{"/admin", "/admin/", "//admin", "/./admin", "/x/../admin", "/%61dmin", "/ADMIN", "/Admin/users",
			"/%2Fadmin", "/x%2F..%2Fadmin", "/x%5C..%5Cadmin", "/admin?x=1"} {
			if s, body := e.mxGet(t, "a", svc, p); s != 403 {
				t.Errorf("%s %s: %d %q, want 403", svc, p, s, body)
			}
			ex := e.mxExplain(t, "shop/a", svc, "--http", "GET", p)
			if len(ex.Decisions) != 1 || ex.Decisions[0].Verdict.Allowed || ex.Decisions[0].Verdict.Policy != "shop/mx-deny-admin" {
				t.Errorf("explain %s %s: %+v", svc, p, ex.Decisions)
			}
		}
		if dst != "b" {
			continue
		}
		// The table a user reads says the same.
		out, err := exec.Command(filepath.Join(e.bin, "ferry"), "explain", "shop/a", "b-http.shop:80", "--http", "GET", "/x/../ADMIN", "--lab", mxPrefix).CombinedOutput()
		if err != nil || !strings.Contains(string(out), "DENIED") || !strings.Contains(string(out), "shop/mx-deny-admin") {
			t.Errorf("ferry explain table: %v\n%s", err, out)
		}
		t.Logf("ferry explain shop/a b-http.shop:80 --http GET /x/../ADMIN --lab mx:\n%s", out)
	}
	for _, dst := range []string{"b", "c"} {
		svc := netip.AddrPortFrom(mxVIP(dst, "http"), servicePort).String()
		s, body := e.mxGet(t, "a", svc, "/request//./x/../Seen%2Fok%5Cz?q=1")
		var seen labecho.Request
		if s != 200 || json.Unmarshal([]byte(body), &seen) != nil || seen.Path != "/request/Seen/ok/z" || seen.Query != "q=1" {
			t.Errorf("%s: %d %q; want the app to see /request/Seen/ok/z?q=1", svc, s, body)
		}
	}
}

// During 10 restarts of c's agent (kill -9 and SIGTERM in turn) under a Deny of
// c's port, two clients keep trying it, one enrolled (through the tunnel), one
// not (plaintext): no request reaches c's app, counted by the app itself.
func TestMatrixDenyHoldsThroughRestarts(t *testing.T) {
	e := mxLab.get(t)
	e.waitEnrolled(t, "node1", "shop/a", "shop/b")
	e.waitEnrolled(t, "node2", "shop/c")
	e.apply(t, "mx-policies.yaml", mxPolicies)
	target := "http://" + e.addr("c", mxRestartPort)
	stats := func() labecho.Stats {
		t.Helper()
		out, err := e.lab.Command(t.Context(), "c", "curl", "-sS", "--max-time", "10", "http://127.0.0.1:"+strconv.Itoa(mxRestartPort)+"/stats").Output()
		var st labecho.Stats
		if err != nil || json.Unmarshal(out, &st) != nil {
			t.Fatalf("c's app /stats: %v %q", err, out)
		}
		return st
	}
	// The app counts what reaches it: from c itself (loopback, never captured).
	if out, err := e.lab.Command(t.Context(), "c", "curl", "-sS", "--max-time", "10", "http://127.0.0.1:"+strconv.Itoa(mxRestartPort)+"/?tag=control").CombinedOutput(); err != nil {
		t.Fatalf("control request: %v %s", err, out)
	}
	if n := stats().Requests["control"]; n != 1 {
		t.Fatalf("the app counted %d control requests, want 1", n)
	}

	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	var clients []*exec.Cmd
	for _, client := range []string{"a", "u"} {
		// Bounded: at most 3 minutes of tries, 20 a second at most; each try
		// prints its status.
		loop := fmt.Sprintf(`end=$(( $(date +%%s) + 180 )); while [ $(date +%%s) -lt $end ]; do curl -s -o /dev/null --max-time 1 -w '%%{http_code}\n' '%s/?tag=%s'; sleep 0.05; done`, target, client)
		cmd := e.lab.Command(ctx, client, "sh", "-c", loop)
		var out strings.Builder
		cmd.Stdout = &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		clients = append(clients, cmd)
		t.Cleanup(func() {
			cancel()
			_ = cmd.Wait()
			t.Logf("client %s: %d tries", client, strings.Count(out.String(), "\n"))
		})
	}
	time.Sleep(time.Second)
	for i := range 10 {
		sig := syscall.SIGKILL
		if i%2 == 1 {
			sig = syscall.SIGTERM
		}
		if err := e.lab.StopAgent("node2", sig); err != nil {
			t.Fatalf("restart %d: stop: %v", i, err)
		}
		time.Sleep(300 * time.Millisecond) // the clients keep trying while it is down
		if err := e.lab.StartAgent("node2"); err != nil {
			t.Fatalf("restart %d: start: %v", i, err)
		}
		rctx, rcancel := context.WithTimeout(ctx, 30*time.Second)
		err := e.lab.WaitAgentReady(rctx, "node2")
		rcancel()
		if err != nil {
			t.Fatalf("restart %d: %v", i, err)
		}
		time.Sleep(300 * time.Millisecond)
	}
	e.waitEnrolled(t, "node2", "shop/c")
	time.Sleep(time.Second)
	st := stats()
	if st.Requests["a"] != 0 || st.Requests["u"] != 0 {
		t.Fatalf("denied requests reached c's app during the restarts: from a %d, from u %d", st.Requests["a"], st.Requests["u"])
	}
	// The clients were trying all along: the agent refused them once it was up.
	since := time.Now()
	e.findConn(t, "node2", func(r connRecord) bool {
		return r.Src.Addr() == e.pod("u").IP && r.Dst.Port() == mxRestartPort && !r.Start.Before(since) && r.Verdict == admin.VerdictDenied && r.Policy == "shop/mx-deny-port"
	})
}
