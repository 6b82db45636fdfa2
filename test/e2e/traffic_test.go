package e2e

// Traffic management end to end (issue 11's acceptance) on a lab of its own (prefix
// "tm", pods in 10.108.0.0/16) whose agents get their state from the local-mode
// operator: each test writes Gateway API HTTPRoutes and GRPCRoutes and Ferry
// TrafficPolicies into the operator's manifest folder, as a user applies them, waits
// until both agents run with them, and drives real clients (fortio, curl, grpc-go)
// in pod a on node1 through Service cluster IPs to backends on both nodes (b on
// node1; c, e, f on node2). The backends are the lab's echo HTTP server, which names
// the pod in every answer and counts requests per test tag (/stats), and the gRPC
// interop TestService.

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"math"
	"net/netip"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/api/ferryv1"
	"github.com/ferrymesh/ferry/lab"
	labecho "github.com/ferrymesh/ferry/lab/echo"
)

const (
	tmPrefix = "tm"
	tmPodNet = 108
	// Ports of the echo HTTP servers in the backend pods: the plain one, one where e
	// always answers 500 (outlier detection) and one where e is 50 ms slower than
	// its peers (load balancing).
	tmHTTPPort    = 8080
	tmFailingPort = 8083
	tmSlowPort    = 8084
	// tmApply bounds one manifest's propagation to both agents in the tests that do
	// not measure it.
	tmApply = 10 * time.Second
)

var (
	tmBackends = []string{"b", "c", "e", "f"}
	tmLab      = onceLab{what: "traffic-management lab", bringUp: tmBringUp}
	// tmGeneration is the metadata.generation of every manifest the tests write:
	// one more each time, as the API server counts spec changes.
	tmGeneration atomic.Int64
)

// tmService is a lab Service of the traffic tests: name, cluster IP, target port,
// protocol and pods.
type tmService struct {
	name   string
	ip     netip.Addr
	target uint16
	proto  string
	pods   []string
}

var tmServices = []tmService{
	{"split", netip.MustParseAddr("10.96.8.10"), tmHTTPPort, "http", []string{"b", "c"}},
	{"canary", netip.MustParseAddr("10.96.8.11"), tmHTTPPort, "http", []string{"e"}},
	{"hdr", netip.MustParseAddr("10.96.8.12"), tmHTTPPort, "http", []string{"b", "c"}},
	{"filters", netip.MustParseAddr("10.96.8.13"), tmHTTPPort, "http", []string{"b", "c"}},
	{"mirrored", netip.MustParseAddr("10.96.8.14"), tmHTTPPort, "http", []string{"b", "c"}},
	{"mirror", netip.MustParseAddr("10.96.8.15"), tmHTTPPort, "http", []string{"f"}},
	{"flaky", netip.MustParseAddr("10.96.8.16"), tmHTTPPort, "http", []string{"b", "c", "e"}},
	{"down", netip.MustParseAddr("10.96.8.17"), tmHTTPPort, "http", []string{"b", "c", "e"}},
	{"slow", netip.MustParseAddr("10.96.8.18"), tmHTTPPort, "http", []string{"c"}},
	{"outlier", netip.MustParseAddr("10.96.8.19"), tmFailingPort, "http", []string{"b", "c", "e"}},
	{"pool", netip.MustParseAddr("10.96.8.20"), tmHTTPPort, "http", []string{"c"}},
	{"faulty", netip.MustParseAddr("10.96.8.21"), tmHTTPPort, "http", []string{"c"}},
	{"sticky", netip.MustParseAddr("10.96.8.22"), tmHTTPPort, "http", tmBackends},
	{"p2c", netip.MustParseAddr("10.96.8.23"), tmSlowPort, "http", []string{"b", "c", "e"}},
	{"least", netip.MustParseAddr("10.96.8.24"), tmSlowPort, "http", []string{"b", "c", "e"}},
	{"limited", netip.MustParseAddr("10.96.8.25"), tmHTTPPort, "http", []string{"c"}},
	{"guarded", netip.MustParseAddr("10.96.8.26"), tmHTTPPort, "http", []string{"b", "c"}},
	{"calls", netip.MustParseAddr("10.96.8.27"), grpcPort, "grpc", []string{"b", "c"}},
	{"calls-canary", netip.MustParseAddr("10.96.8.28"), grpcPort, "grpc", []string{"e"}},
}

func tmSvc(name string) tmService {
	i := slices.IndexFunc(tmServices, func(s tmService) bool { return s.name == name })
	if i < 0 {
		panic("no traffic Service " + name)
	}
	return tmServices[i]
}

// tmURL is http://<cluster IP>:80<path> of a traffic Service.
func tmURL(name, path string) string { return "http://" + vip(tmSvc(name).ip) + path }

func tmSetup(t *testing.T) *env { return tmLab.get(t) }

func tmBringUp() (*env, error) {
	cfg := lab.Config{
		Prefix: tmPrefix,
		PodNet: tmPodNet,
		Nodes: []lab.NodeConfig{
			{Name: "node1", Pods: []lab.PodConfig{{Name: "a", Enrolled: true}, {Name: "b", Enrolled: true}}},
			{Name: "node2", Pods: []lab.PodConfig{{Name: "c", Enrolled: true}, {Name: "e", Enrolled: true}, {Name: "f", Enrolled: true}}},
		},
	}
	for _, s := range tmServices {
		cfg.Services = append(cfg.Services, lab.ServiceConfig{Name: s.name, ClusterIP: s.ip, Port: servicePort, TargetPort: s.target, AppProtocol: s.proto, Pods: s.pods})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	e, err := newEnv(ctx, cfg, "ferry", "ferry-agent", "ferry-operator")
	if err != nil {
		return nil, err
	}
	if _, err := e.goBinary(ctx, "fortio", "fortio.org/fortio"); err != nil {
		return e.fail(err)
	}
	for _, pod := range tmBackends {
		failing, slow := []string{"--http"}, []string{"--http"}
		if pod == "e" {
			failing = append(failing, "--fail-status", "500")
			slow = append(slow, "--delay", "50ms")
		}
		for port, args := range map[int][]string{tmHTTPPort: {"--http"}, tmFailingPort: failing, tmSlowPort: slow} {
			if err := e.startServer(ctx, pod, port, args...); err != nil {
				return e.fail(err)
			}
		}
		if pod != "f" {
			if err := e.startApp(ctx, pod, grpcPort, "grpc", e.selfApp(pod, "grpc-server", strconv.Itoa(grpcPort), e.grpcStatsFile(pod))); err != nil {
				return e.fail(err)
			}
		}
	}
	for _, s := range tmServices {
		if err := e.lab.SetServicePods(ctx, s.name, s.pods); err != nil { // waits until both agents have them
			return e.fail(err)
		}
	}
	return e, nil
}

// manifest fills a manifest's {gen} with the next generation: every object of a
// file the tests write carries one, higher than any before it.
func manifest(yaml string) string {
	return strings.ReplaceAll(yaml, "{gen}", strconv.FormatInt(tmGeneration.Add(1), 10))
}

// apply writes a route or policy manifest into the operator's folder and waits until
// both agents run with it; the file is removed when the test ends.
func (e *env) apply(t *testing.T, file, yaml string) lab.Applied {
	t.Helper()
	applied := e.reapply(t, file, yaml)
	t.Cleanup(func() { e.unapply(t, file) })
	return applied
}

// reapply is apply for a file the test (or its parent) applied before, which removes
// it at its end.
func (e *env) reapply(t *testing.T, file, yaml string) lab.Applied {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), tmApply)
	defer cancel()
	applied, err := e.lab.ApplyManifest(ctx, file, manifest(yaml))
	if err != nil {
		t.Fatal(err)
	}
	return applied
}

// unapply removes a manifest the test wrote, if it is still there, and waits until
// the agents dropped it.
func (e *env) unapply(t *testing.T, file string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), tmApply)
	defer cancel()
	if _, err := e.lab.RemoveManifest(ctx, file); err != nil && !strings.Contains(err.Error(), "no such file") {
		t.Error(err)
	}
}

// configStatus is node's agent's status of one route or policy ("HTTPRoute
// default/x").
func (e *env) configStatus(t *testing.T, node, kindName string) *ferryv1.ConfigStatus {
	t.Helper()
	cs, err := e.lab.ConfigStatus(context.Background(), node)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range cs {
		if c.GetKind()+" "+c.GetName() == kindName {
			return c
		}
	}
	t.Fatalf("agent on %s reports no %s (it has %v)", node, kindName, cs)
	return nil
}

// echoStats asks pod's echo server on port for its counts, from inside the pod
// (loopback is not captured: the request is not counted by the mesh).
func (e *env) echoStats(t *testing.T, pod string, port int) labecho.Stats {
	t.Helper()
	out, stderr, err := e.client(t, pod, nil, "curl", "-sS", "--max-time", "5", fmt.Sprintf("http://127.0.0.1:%d/stats", port))
	if err != nil {
		t.Fatalf("stats of %s:%d: %v %s", pod, port, err, stderr)
	}
	var st labecho.Stats
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("stats of %s:%d: %v (%q)", pod, port, err, out)
	}
	return st
}

// servedBy counts, per pod, the requests tagged tg its echo server on port answered
// (or saw end).
func (e *env) servedBy(t *testing.T, tg string, port int, pods ...string) map[string]int64 {
	t.Helper()
	per := map[string]int64{}
	for _, p := range pods {
		per[p] = e.echoStats(t, p, port).Requests[tg]
	}
	return per
}

func total(per map[string]int64) int64 {
	var n int64
	for _, v := range per {
		n += v
	}
	return n
}

// fortioResult is the part of fortio load's JSON the traffic tests read.
type fortioResult struct {
	RetCodes          map[string]int64
	ActualQPS         float64
	ActualDuration    int64 // ns
	DurationHistogram struct {
		Count       int64
		Percentiles []struct{ Percentile, Value float64 }
	}
	ErrorsDurationHistogram struct{ Count int64 }
}

func (r fortioResult) requests() int64 { return total(r.RetCodes) }

// percentile is the latency fortio measured at p (asked for with -p).
func (r fortioResult) percentile(t *testing.T, p float64) time.Duration {
	t.Helper()
	for _, x := range r.DurationHistogram.Percentiles {
		if x.Percentile == p {
			return time.Duration(x.Value * float64(time.Second))
		}
	}
	t.Fatalf("fortio reported no p%v: %+v", p, r.DurationHistogram.Percentiles)
	return 0
}

// fortio runs fortio load in pod with args (and -quiet -json - -allow-initial-errors)
// and returns its result.
func (e *env) fortio(t *testing.T, pod string, args ...string) fortioResult {
	t.Helper()
	r, err := e.fortioErr(t, pod, args...)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// fortioErr is fortio that returns its error, for another goroutine. Errors from the
// first requests are allowed: several tests expect failing answers from the start.
func (e *env) fortioErr(t *testing.T, pod string, args ...string) (fortioResult, error) {
	args = append([]string{"load", "-quiet", "-json", "-", "-allow-initial-errors"}, args...)
	out, stderr, err := e.client(t, pod, nil, filepath.Join(e.bin, "fortio"), args...)
	var r fortioResult
	if err != nil {
		return r, fmt.Errorf("fortio %s: %v\n%s\n%s", strings.Join(args, " "), err, clip(out), clip(stderr))
	}
	if i := strings.Index(out, "{"); i >= 0 {
		out = out[i:]
	}
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		return r, fmt.Errorf("fortio output: %v\n%s", err, clip(out))
	}
	return r, nil
}

// tmObserve runs `ferry observe --lab tm -o json ARGS` and returns the flows.
func (e *env) tmObserve(t *testing.T, args ...string) []*ferryv1.Flow {
	t.Helper()
	cmd := exec.Command(filepath.Join(e.bin, "ferry"), append([]string{"observe", "--lab", tmPrefix, "-o", "json"}, args...)...)
	out, err := cmd.Output()
	if err != nil {
		var stderr string
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = string(ee.Stderr)
		}
		t.Fatalf("ferry observe %v: %v\n%s", args, err, stderr)
	}
	return parseFlows(t, out)
}

// sinceText is a time for ferry observe --since.
func sinceText(at time.Time) string { return at.UTC().Format(time.RFC3339Nano) }

// metricSum sums the samples of metric in text whose labels contain every one of
// match (`route="HTTPRoute default/split"`).
func metricSum(text, metric string, match ...string) float64 {
	var sum float64
	for _, line := range strings.Split(text, "\n") {
		labels, ok := strings.CutPrefix(line, metric+"{")
		if !ok {
			continue
		}
		end := strings.LastIndexByte(labels, '}')
		if end < 0 || !allIn(labels[:end], match) {
			continue
		}
		if v, err := strconv.ParseFloat(strings.TrimSpace(labels[end+1:]), 64); err == nil {
			sum += v
		}
	}
	return sum
}

func allIn(s string, subs []string) bool {
	for _, x := range subs {
		if !strings.Contains(s, x) {
			return false
		}
	}
	return true
}

// waitFor polls cond for up to d.
func waitFor(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// A 90/10 weighted split over 10,000 requests lands within ±2 points; the requests
// carry the route in their flows and metrics.
func TestTrafficSplit(t *testing.T) {
	e := tmSetup(t)
	e.apply(t, "split.yaml", `apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split, namespace: default, generation: {gen}}
spec:
  parentRefs: [{group: "", kind: Service, name: split, port: 80}]
  rules:
  - backendRefs:
    - {name: split, port: 80, weight: 90}
    - {name: canary, port: 80, weight: 10}
`)
	before := metricSum(e.scrape(t, "node1"), "istio_requests_total", `reporter="source"`, `route="HTTPRoute default/split"`, `response_code="200"`)
	start := time.Now()
	tg := tag(t)
	const n = 10000
	r := e.fortio(t, "a", "-qps", "0", "-c", "8", "-n", strconv.Itoa(n), tmURL("split", "/?tag="+tg))
	if r.RetCodes["200"] != n {
		t.Fatalf("fortio: %v, want %d answered 200", r.RetCodes, n)
	}
	per := e.servedBy(t, tg, tmHTTPPort, "b", "c", "e")
	canary := 100 * float64(per["e"]) / n
	t.Logf("%d requests at %.0f/s: canary (e) %.2f%%, primary b %d, c %d", n, r.ActualQPS, canary, per["b"], per["c"])
	if total(per) != n {
		t.Errorf("the backends saw %d requests, want %d (%v)", total(per), n, per)
	}
	if math.Abs(canary-10) > 2 {
		t.Errorf("the canary got %.2f%% of the requests, want 10 ±2", canary)
	}
	var after float64
	waitFor(5*time.Second, func() bool {
		after = metricSum(e.scrape(t, "node1"), "istio_requests_total", `reporter="source"`, `route="HTTPRoute default/split"`, `response_code="200"`)
		return after-before >= n
	})
	if after-before != n {
		t.Errorf("istio_requests_total{route=\"HTTPRoute default/split\"} on node1 grew by %v, want %d", after-before, n)
	}
	out, err := exec.Command(filepath.Join(e.bin, "ferry"), "agent", "routes", "--lab", tmPrefix).CombinedOutput()
	if err != nil || strings.Count(string(out), "HTTPRoute default/split rule 0  default/split:80 weight 90 (90%), default/canary:80 weight 10 (10%)") != 2 {
		t.Errorf("ferry agent routes: %v; want the split on both agents:\n%s", err, out)
	}
	fs := e.tmObserve(t, "--since", sinceText(start), "--node", "node1", "--route", "default/split", "--last", "20")
	if len(fs) != 20 || fs[0].GetHttp().GetRoute() != "HTTPRoute default/split" {
		t.Errorf("node1's last flows with --route default/split: %d, want 20 naming the route:\n%s", len(fs), flowsText(fs))
	}
}

// A header match sends the marked requests to the canary, and only them.
func TestTrafficHeaderMatch(t *testing.T) {
	e := tmSetup(t)
	e.apply(t, "hdr.yaml", `apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: hdr, namespace: default, generation: {gen}}
spec:
  parentRefs: [{group: "", kind: Service, name: hdr, port: 80}]
  rules:
  - matches: [{headers: [{type: Exact, name: x-canary, value: "true"}]}]
    backendRefs: [{name: canary, port: 80}]
  - backendRefs: [{name: hdr, port: 80}]
`)
	marked, plain := tag(t)+"-marked", tag(t)+"-plain"
	const n = 300
	if r := e.fortio(t, "a", "-qps", "0", "-c", "4", "-n", strconv.Itoa(n), "-H", "X-Canary: true", tmURL("hdr", "/?tag="+marked)); r.RetCodes["200"] != n {
		t.Fatalf("marked: %v", r.RetCodes)
	}
	if r := e.fortio(t, "a", "-qps", "0", "-c", "4", "-n", strconv.Itoa(n), "-H", "X-Canary: false", tmURL("hdr", "/?tag="+plain)); r.RetCodes["200"] != n {
		t.Fatalf("plain: %v", r.RetCodes)
	}
	m, p := e.servedBy(t, marked, tmHTTPPort, "b", "c", "e"), e.servedBy(t, plain, tmHTTPPort, "b", "c", "e")
	t.Logf("marked requests per pod %v, the others %v", m, p)
	if m["e"] != n || p["e"] != 0 || p["b"]+p["c"] != n {
		out, _ := exec.Command(filepath.Join(e.bin, "ferry"), "agent", "routes", "--lab", tmPrefix, "--node", "node1").CombinedOutput()
		t.Errorf("marked requests went to %v and the others to %v; want all %d marked on the canary e and none of the others; ferry agent routes:\n%s", m, p, n, out)
	}
}

// URL rewrite, redirect and header modifiers: the app sees the rewritten host and
// path and the changed request headers, the client the added response header and the
// redirect.
func TestTrafficFilters(t *testing.T) {
	e := tmSetup(t)
	e.apply(t, "filters.yaml", `apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: filters, namespace: default, generation: {gen}}
spec:
  parentRefs: [{group: "", kind: Service, name: filters, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: URLRewrite
      urlRewrite: {hostname: rewritten.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /request/new}}
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: X-Set, value: one}]
        add: [{name: X-Added, value: two}]
        remove: [X-Drop]
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        add: [{name: X-Resp, value: three}]
    backendRefs: [{name: filters, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /moved}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /request/here}, statusCode: 301}
  - backendRefs: [{name: filters, port: 80}]
`)
	out, _ := e.mustClient(t, "a", nil, "curl", "-sS", "-D", "/dev/stderr", "-H", "X-Drop: gone", "-H", "X-Set: zero", tmURL("filters", "/old/items?x=1"))
	var got labecho.Request
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("rewritten request: %v (%q)", err, out)
	}
	if got.Host != "rewritten.example" || got.Path != "/request/new/items" || got.Query != "x=1" {
		t.Errorf("the app saw host %q path %q query %q; want rewritten.example /request/new/items x=1", got.Host, got.Path, got.Query)
	}
	if got.Headers.Get("X-Set") != "one" || got.Headers.Get("X-Added") != "two" || got.Headers.Get("X-Drop") != "" {
		t.Errorf("the app saw headers %v; want X-Set one, X-Added two, no X-Drop", got.Headers)
	}
	_, headers := e.mustClient(t, "a", nil, "curl", "-sS", "-o", "/dev/null", "-D", "/dev/stderr", tmURL("filters", "/old/x"))
	if !strings.Contains(strings.ToLower(headers), "\nx-resp: three") {
		t.Errorf("the client got no X-Resp: three:\n%s", headers)
	}
	_, headers = e.mustClient(t, "a", nil, "curl", "-sS", "-o", "/dev/null", "-D", "/dev/stderr", tmURL("filters", "/moved/abc"))
	if !strings.HasPrefix(headers, "HTTP/1.1 301") || !strings.Contains(headers, "/request/here\r\n") {
		t.Errorf("/moved/abc: want a 301 to /request/here:\n%s", headers)
	}
	out, _ = e.mustClient(t, "a", nil, "curl", "-sS", "-L", tmURL("filters", "/moved/abc"))
	if err := json.Unmarshal([]byte(out), &got); err != nil || got.Path != "/request/here" {
		t.Errorf("following the redirect: %q, %v; want the app to see /request/here", out, err)
	}
}

// A mirror gets a copy of every request while the client's answers come from the
// primary alone.
func TestTrafficMirror(t *testing.T) {
	e := tmSetup(t)
	e.apply(t, "mirror.yaml", `apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mirrored, namespace: default, generation: {gen}}
spec:
  parentRefs: [{group: "", kind: Service, name: mirrored, port: 80}]
  rules:
  - filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: mirror, port: 80}}
    backendRefs: [{name: mirrored, port: 80}]
`)
	tg := tag(t)
	const n = 40
	args := []string{}
	for i := range n {
		if i > 0 {
			args = append(args, "--next")
		}
		args = append(args, "-sS", "-o", "/dev/null", "-w", "%{http_code} %header{ferry-lab-pod}\n", tmURL("mirrored", fmt.Sprintf("/?tag=%s&i=%d", tg, i)))
	}
	out, _ := e.mustClient(t, "a", nil, "curl", args...)
	answered := map[string]int{}
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		answered[l]++
	}
	if answered["200 b"]+answered["200 c"] != n {
		t.Errorf("answers %v; want all %d 200 from the primary b or c", answered, n)
	}
	var mirrored int64
	waitFor(5*time.Second, func() bool { mirrored = e.echoStats(t, "f", tmHTTPPort).Requests[tg]; return mirrored >= n })
	primary := e.servedBy(t, tg, tmHTTPPort, "b", "c")
	t.Logf("answers %v; the mirror f got %d copies, the primary %v", answered, mirrored, primary)
	if mirrored != n || total(primary) != n {
		t.Errorf("the mirror got %d copies and the primary %d requests, want %d each", mirrored, total(primary), n)
	}
}

// Ten weight changes during a 1,000 req/s run: no request fails, and each change
// is in force on both agents within 1 s of its write.
func TestTrafficWeightChanges(t *testing.T) {
	e := tmSetup(t)
	route := func(primary, canary int) string {
		return fmt.Sprintf(`apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: weights, namespace: default, generation: {gen}}
spec:
  parentRefs: [{group: "", kind: Service, name: split, port: 80}]
  rules:
  - backendRefs:
    - {name: split, port: 80, weight: %d}
    - {name: canary, port: 80, weight: %d}
`, primary, canary)
	}
	e.apply(t, "weights.yaml", route(100, 0))
	tg := tag(t)
	var r fortioResult
	var loadErr error
	done := make(chan struct{})
	go func() {
		defer close(done)
		r, loadErr = e.fortioErr(t, "a", "-qps", "1000", "-t", "14s", "-c", "16", tmURL("split", "/?tag="+tg))
	}()
	time.Sleep(time.Second)
	var lat []time.Duration
	for i, w := range []int{90, 50, 10, 0, 30, 70, 100, 20, 80, 60} {
		applied := e.reapply(t, "weights.yaml", route(w, 100-w))
		slowest := time.Duration(0)
		for _, d := range applied {
			slowest = max(slowest, d)
		}
		lat = append(lat, slowest)
		t.Logf("change %d (primary %d%%, canary %d%%): in force on %v", i+1, w, 100-w, applied)
		if slowest > time.Second {
			t.Errorf("change %d took %v to be in force on both agents, want under 1 s", i+1, slowest)
		}
		time.Sleep(200 * time.Millisecond)
	}
	<-done
	if loadErr != nil {
		t.Fatal(loadErr)
	}
	slices.Sort(lat)
	t.Logf("propagation to both agents over %d changes: p50 %v, p99 %v (max)", len(lat), lat[len(lat)/2], lat[len(lat)-1])
	if r.RetCodes["200"] != r.requests() || r.requests() == 0 || r.ErrorsDurationHistogram.Count != 0 {
		t.Errorf("fortio: %v, %d errors; want every request answered 200", r.RetCodes, r.ErrorsDurationHistogram.Count)
	}
	per := e.servedBy(t, tg, tmHTTPPort, "b", "c", "e")
	t.Logf("%d requests at %.0f/s, all 200; per pod %v", r.requests(), r.ActualQPS, per)
	if per["e"] == 0 || per["b"]+per["c"] == 0 {
		t.Errorf("per pod %v: both sides of the split should have served", per)
	}
}

// Retries: a backend failing 30% of requests with 503 is seen by clients at under
// 0.5% errors with 3 attempts; every retry is counted.
func TestTrafficRetries(t *testing.T) {
	e := tmSetup(t)
	// 30% failures need about 43% more tries; the default budget (20%) would rightly
	// stop them, so this Service's policy allows half.
	e.apply(t, "flaky.yaml", `apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: flaky, namespace: default, generation: {gen}}
spec:
  parentRefs: [{group: "", kind: Service, name: flaky, port: 80}]
  rules:
  - backendRefs: [{name: flaky, port: 80}]
    retry: {attempts: 3, codes: [503], backoff: 5ms}
---
apiVersion: ferry.io/v1alpha1
kind: TrafficPolicy
metadata: {name: flaky, namespace: default, generation: {gen}}
spec:
  targetRefs: [{group: "", kind: Service, name: flaky}]
  retryBudget: {percent: 50, minRetriesPerSecond: 10, ttl: 10s}
`)
	svc := `destination_service="flaky.default.svc.cluster.local"`
	before := metricSum(e.scrape(t, "node1"), "ferry_request_retries_total", svc)
	tg := tag(t)
	const n = 2000
	// Two clients: each endpoint fails its share spread over what it gets, so a retry
	// on another endpoint (or the same one, next) mostly succeeds; many clients
	// interleaving at one endpoint make its failures look independent, and four
	// independent tries all fail 0.8% of the time.
	r := e.fortio(t, "a", "-qps", "0", "-c", "2", "-n", strconv.Itoa(n), tmURL("flaky", "/fail?percent=30&code=503&tag="+tg))
	failed := n - r.RetCodes["200"]
	tries := total(e.servedBy(t, tg, tmHTTPPort, "b", "c", "e"))
	after := metricSum(e.scrape(t, "node1"), "ferry_request_retries_total", svc)
	t.Logf("%d requests: %v; the backends got %d tries; ferry_request_retries_total grew by %v", n, r.RetCodes, tries, after-before)
	if float64(failed) >= 0.005*n {
		t.Errorf("%d of %d requests failed (%.2f%%), want under 0.5%%", failed, n, 100*float64(failed)/n)
	}
	if tries < n+n/4 {
		t.Errorf("the backends got %d tries for %d requests: the failed ones were not retried", tries, n)
	}
	if int64(after-before) != tries-n {
		t.Errorf("ferry_request_retries_total{%s} grew by %v, want the %d tries after the first", svc, after-before, tries-n)
	}
}

// With every endpoint failing, the retry budget keeps the extra tries within its
// share: 20% of the requests plus 1 a second over its window, where 3 attempts
// would be 3 times the requests.
func TestTrafficRetryBudget(t *testing.T) {
	e := tmSetup(t)
	e.apply(t, "down.yaml", `apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: down, namespace: default, generation: {gen}}
spec:
  parentRefs: [{group: "", kind: Service, name: down, port: 80}]
  rules:
  - backendRefs: [{name: down, port: 80}]
    retry: {attempts: 3, codes: [503], backoff: 5ms}
---
apiVersion: ferry.io/v1alpha1
kind: TrafficPolicy
metadata: {name: down, namespace: default, generation: {gen}}
spec:
  targetRefs: [{group: "", kind: Service, name: down}]
  retryBudget: {percent: 20, minRetriesPerSecond: 1, ttl: 2s}
`)
	before := metricSum(e.scrape(t, "node1"), "istio_requests_total", `reporter="source"`, `destination_service_name="down"`, `response_flags="URX"`)
	tg := tag(t)
	r := e.fortio(t, "a", "-qps", "200", "-t", "3s", "-c", "4", tmURL("down", "/fail?percent=100&code=503&tag="+tg))
	n := r.requests()
	tries := total(e.servedBy(t, tg, tmHTTPPort, "b", "c", "e"))
	extra := tries - n
	secs := float64(r.ActualDuration) / 1e9
	// The budget's share, its minimum over the run and its window, and 2% of the
	// requests for the windows' edges and the tries in flight when it ran out.
	allowed := 0.2*float64(n) + 1*(secs+2) + 0.02*float64(n)
	t.Logf("%d requests in %.1f s (%v): %d extra tries (%.1f%%), the budget allows %.0f", n, secs, r.RetCodes, extra, 100*float64(extra)/float64(n), allowed)
	if r.RetCodes["503"] != n {
		t.Errorf("fortio: %v; with every endpoint failing every request ends 503", r.RetCodes)
	}
	if float64(extra) > allowed || extra < n/10 {
		t.Errorf("%d extra tries for %d requests; want some, and at most the budget's %.0f", extra, n, allowed)
	}
	var after float64
	waitFor(3*time.Second, func() bool {
		after = metricSum(e.scrape(t, "node1"), "istio_requests_total", `reporter="source"`, `destination_service_name="down"`, `response_flags="URX"`)
		return after > before
	})
	if after == before {
		t.Error(`no request counted with response_flags="URX" (retried and still failed)`)
	}
}

// A 500 ms route timeout on a backend taking 2 s: the client gets 504 at 500 ms
// (±50 ms), and the backend sees the request canceled.
func TestTrafficTimeout(t *testing.T) {
	e := tmSetup(t)
	e.apply(t, "slow.yaml", `apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: slow, namespace: default, generation: {gen}}
spec:
  parentRefs: [{group: "", kind: Service, name: slow, port: 80}]
  rules:
  - backendRefs: [{name: slow, port: 80}]
    timeouts: {request: 500ms}
`)
	start := time.Now()
	tg := tag(t)
	const n = 5
	args := []string{}
	for i := range n {
		if i > 0 {
			args = append(args, "--next")
		}
		args = append(args, "-sS", "-o", "/dev/null", "-w", curlWriteOut, tmURL("slow", fmt.Sprintf("/delay/2s?tag=%s&i=%d", tg, i)))
	}
	out, _ := e.mustClient(t, "a", nil, "curl", args...)
	for i, c := range parseCurl(t, out) {
		ms := c.seconds * 1000
		t.Logf("request %d: %d after %.0f ms", i, c.status, ms)
		if c.status != 504 || ms < 450 || ms > 550 {
			t.Errorf("request %d: %d after %.0f ms, want 504 at 500 ±50 ms", i, c.status, ms)
		}
	}
	var st labecho.Stats
	waitFor(5*time.Second, func() bool { st = e.echoStats(t, "c", tmHTTPPort); return st.Requests[tg] >= n })
	if st.Requests[tg] != n || st.Canceled[tg] != n {
		t.Errorf("the backend saw %d requests, %d of them canceled; want %d, all canceled", st.Requests[tg], st.Canceled[tg], n)
	}
	fs := e.tmObserve(t, "--since", sinceText(start), "--node", "node1", "--http-status", "504")
	if len(fs) != n || !strings.HasPrefix(fs[0].GetReason(), "timeout") {
		t.Errorf("node1's flows with status 504: %d, want %d with reason timeout:\n%s", len(fs), n, flowsText(fs))
	}
}

// Outlier detection: of 3 endpoints, e answers 500 to everything; it is ejected
// after 5 consecutive errors and gets no traffic within 1 s, then after the 3 s
// ejection it is tried again (and ejected again).
func TestTrafficOutlierDetection(t *testing.T) {
	e := tmSetup(t)
	e.apply(t, "outlier.yaml", `apiVersion: ferry.io/v1alpha1
kind: TrafficPolicy
metadata: {name: outlier, namespace: default, generation: {gen}}
spec:
  targetRefs: [{group: "", kind: Service, name: outlier}]
  outlierDetection: {consecutiveErrors: 5, interval: 500ms, baseEjectionTime: 3s, maxEjectionPercent: 50}
`)
	start := time.Now()
	tg := tag(t)
	r := e.fortio(t, "a", "-qps", "100", "-t", "7s", "-c", "2", tmURL("outlier", "/?tag="+tg))
	var toE []time.Time
	for _, f := range e.tmObserve(t, "--since", sinceText(start), "--node", "node1", "--protocol", "http", "--to-pod", "e") {
		toE = append(toE, f.GetTime().AsTime())
	}
	sort.Slice(toE, func(i, j int) bool { return toE[i].Before(toE[j]) })
	var offsets []string
	for _, at := range toE {
		offsets = append(offsets, at.Sub(start).Round(10*time.Millisecond).String())
	}
	t.Logf("%v; e answered %d requests, at %v", r.RetCodes, len(toE), offsets)
	if len(toE) < 5 {
		t.Fatalf("e got %d requests, want at least the 5 consecutive errors that eject it", len(toE))
	}
	ejected := toE[4]
	var during, after int
	for _, at := range toE[5:] {
		switch d := at.Sub(ejected); {
		case d > time.Second && d < 3*time.Second-100*time.Millisecond:
			during++
		case d >= 3*time.Second-100*time.Millisecond:
			after++
		}
	}
	if during != 0 {
		t.Errorf("e got %d requests between 1 s and 3 s after its 5th error, want none (ejected)", during)
	}
	if after == 0 {
		t.Error("e got no request after its 3 s ejection: it was not tried again")
	}
	if r.RetCodes["500"] >= r.requests()/10 {
		t.Errorf("%d of %d requests got e's 500: it was not ejected", r.RetCodes["500"], r.requests())
	}
}

// Circuit breaking: with at most 5 requests in flight and 10 pending, 30 slow
// requests at once from two pods on node1 (the limit is per destination across the
// node) get 15 answers and 15 immediate 503s, whose flows say circuit_open.
func TestTrafficCircuitBreaking(t *testing.T) {
	e := tmSetup(t)
	e.apply(t, "pool.yaml", `apiVersion: ferry.io/v1alpha1
kind: TrafficPolicy
metadata: {name: pool, namespace: default, generation: {gen}}
spec:
  targetRefs: [{group: "", kind: Service, name: pool}]
  circuitBreaker: {maxRequests: 5, maxPendingRequests: 10}
`)
	start := time.Now()
	tg := tag(t)
	const each = 15
	var wg sync.WaitGroup
	outs := make([]string, 2)
	for i, pod := range []string{"a", "b"} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			args := []string{"-sS", "--parallel", "--parallel-immediate", "--parallel-max", strconv.Itoa(each)}
			for k := range each {
				args = append(args, "-o", "/dev/null", "-w", curlWriteOut, tmURL("pool", fmt.Sprintf("/delay/1s?tag=%s&c=%s%d", tg, pod, k)))
			}
			out, stderr, err := e.client(t, pod, nil, "curl", args...)
			if err != nil {
				t.Errorf("curl in %s: %v %s", pod, err, stderr)
			}
			outs[i] = out
		}()
	}
	wg.Wait()
	codes := map[int]int{}
	for _, out := range outs {
		for _, c := range parseCurl(t, out) {
			codes[c.status]++
			if c.status == 503 && c.seconds > 0.2 {
				t.Errorf("a 503 took %.0f ms, want it at once", c.seconds*1000)
			}
		}
	}
	t.Logf("30 requests at once: %v", codes)
	if codes[200] != 15 || codes[503] != 15 {
		t.Errorf("statuses %v, want 15 answered and 15 turned away (5 in flight, 10 pending)", codes)
	}
	var fs []*ferryv1.Flow
	waitFor(3*time.Second, func() bool {
		fs = e.tmObserve(t, "--since", sinceText(start), "--node", "node1", "--http-status", "503")
		return len(fs) >= 15
	})
	open := 0
	for _, f := range fs {
		if strings.HasPrefix(f.GetReason(), "circuit_open") {
			open++
		}
	}
	if open != 15 {
		t.Errorf("%d of node1's 503 flows say circuit_open, want 15:\n%s", open, flowsText(fs))
	}
	if got := metricSum(e.scrape(t, "node1"), "istio_requests_total", `destination_service_name="pool"`, `response_flags="UO"`); got < 15 {
		t.Errorf(`istio_requests_total{response_flags="UO"} for pool is %v, want 15`, got)
	}
}

// Fault injection: a 10% abort with 503 lands within ±2 points over 10,000
// requests; a 100 ms delay on half the requests makes latency bimodal.
func TestTrafficFaults(t *testing.T) {
	e := tmSetup(t)
	policy := func(fault string) string {
		return `apiVersion: ferry.io/v1alpha1
kind: TrafficPolicy
metadata: {name: faulty, namespace: default, generation: {gen}}
spec:
  targetRefs: [{group: "", kind: Service, name: faulty}]
  fault: ` + fault + "\n"
	}
	e.apply(t, "faulty.yaml", policy(`{abort: {percent: 10, httpStatus: 503}}`))
	tg := tag(t)
	const n = 10000
	r := e.fortio(t, "a", "-qps", "0", "-c", "8", "-n", strconv.Itoa(n), tmURL("faulty", "/?tag="+tg))
	aborted := 100 * float64(r.RetCodes["503"]) / n
	served := e.echoStats(t, "c", tmHTTPPort).Requests[tg]
	t.Logf("%d requests at %.0f/s: %v (%.2f%% aborted); the app got %d", n, r.ActualQPS, r.RetCodes, aborted, served)
	if math.Abs(aborted-10) > 2 || r.RetCodes["200"]+r.RetCodes["503"] != n {
		t.Errorf("%v: want 10%% ±2 answered 503, the rest 200", r.RetCodes)
	}
	if served != r.RetCodes["200"] {
		t.Errorf("the app got %d requests, want only the %d not aborted", served, r.RetCodes["200"])
	}
	if fi := metricSum(e.scrape(t, "node1"), "istio_requests_total", `destination_service_name="faulty"`, `response_flags="FI"`); fi != float64(r.RetCodes["503"]) {
		t.Errorf(`istio_requests_total{response_flags="FI"} for faulty is %v, want %d`, fi, r.RetCodes["503"])
	}

	e.reapply(t, "faulty.yaml", policy(`{delay: {percent: 50, duration: 100ms}}`))
	r = e.fortio(t, "a", "-qps", "0", "-c", "16", "-n", "400", "-p", "25,75", tmURL("faulty", "/?tag="+tg+"-delay"))
	p25, p75 := r.percentile(t, 25), r.percentile(t, 75)
	t.Logf("delay on 50%%: %v, p25 %v, p75 %v", r.RetCodes, p25, p75)
	if r.RetCodes["200"] != 400 || p25 >= 5*time.Millisecond || p75 < 100*time.Millisecond {
		t.Errorf("%v, p25 %v, p75 %v; want every request 200, p25 under 5 ms and p75 at least 100 ms", r.RetCodes, p25, p75)
	}
}

// keysTo sends one request per key (header X-User) to sticky and returns the pod
// that answered each.
func (e *env) keysTo(t *testing.T, tg string, keys []string) map[string]string {
	t.Helper()
	var args []string
	for i, k := range keys {
		if i > 0 {
			args = append(args, "--next")
		}
		args = append(args, "-sS", "-o", "/dev/null", "-H", "X-User: "+k, "-w", k+" %{http_code} %header{ferry-lab-pod}\n", tmURL("sticky", "/?tag="+tg))
	}
	out, _ := e.mustClient(t, "a", nil, "curl", args...)
	got := map[string]string{}
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Fields(l)
		if len(f) != 3 || f[1] != "200" {
			t.Fatalf("curl: %q", l)
		}
		got[f[0]] = f[2]
	}
	return got
}

// Ring hash on a header: one value always reaches the same endpoint, and removing
// one of 4 endpoints moves only the keys it had (±10%).
func TestTrafficRingHash(t *testing.T) {
	e := tmSetup(t)
	e.apply(t, "sticky.yaml", `apiVersion: ferry.io/v1alpha1
kind: TrafficPolicy
metadata: {name: sticky, namespace: default, generation: {gen}}
spec:
  targetRefs: [{group: "", kind: Service, name: sticky}]
  loadBalancer: {type: RingHash, hashHeader: x-user}
`)
	tg := tag(t)
	if r := e.fortio(t, "a", "-qps", "0", "-c", "4", "-n", "1000", "-H", "X-User: alice", tmURL("sticky", "/?tag="+tg)); r.RetCodes["200"] != 1000 {
		t.Fatalf("fortio: %v", r.RetCodes)
	}
	per := e.servedBy(t, tg, tmHTTPPort, tmBackends...)
	if slices.Max(slices.Collect(maps.Values(per))) != 1000 {
		t.Errorf("1,000 requests with one key spread over %v, want all on one endpoint", per)
	}
	keys := make([]string, 400)
	for i := range keys {
		keys[i] = fmt.Sprintf("user-%d", i)
	}
	first := e.keysTo(t, tg+"-1", keys)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := e.lab.SetServicePods(ctx, "sticky", []string{"b", "c", "e"}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := e.lab.SetServicePods(context.Background(), "sticky", tmBackends); err != nil {
			t.Error(err)
		}
	})
	second := e.keysTo(t, tg+"-2", keys)
	onF, movedOthers := 0, 0
	perPod := map[string]int{}
	for _, k := range keys {
		perPod[first[k]]++
		switch {
		case first[k] == "f":
			onF++
			if second[k] == "f" {
				t.Errorf("key %s still went to f after f left", k)
			}
		case second[k] != first[k]:
			movedOthers++
		}
	}
	t.Logf("%d keys over 4 endpoints %v; after f left, %d of f's %d keys moved and %d others", len(keys), perPod, onF, onF, movedOthers)
	if movedOthers > len(keys)/10 {
		t.Errorf("%d keys not on f moved when f left, want at most 10%% of %d", movedOthers, len(keys))
	}
	if onF == 0 {
		t.Errorf("f had no key of %d: %v", len(keys), perPod)
	}
}

// P2C over peak EWMA (the default) sends under 10% of the requests to an endpoint
// 50 ms slower than its two peers.
func TestTrafficP2CSlowEndpoint(t *testing.T) {
	e := tmSetup(t)
	tg := tag(t)
	const n = 2000
	r := e.fortio(t, "a", "-qps", "0", "-c", "4", "-n", strconv.Itoa(n), tmURL("p2c", "/?tag="+tg))
	per := e.servedBy(t, tg, tmSlowPort, "b", "c", "e")
	slow := 100 * float64(per["e"]) / n
	t.Logf("%v; per endpoint %v: the slow e got %.1f%%", r.RetCodes, per, slow)
	if r.RetCodes["200"] != n || slow >= 10 {
		t.Errorf("%v, e (50 ms slower) got %.1f%% of %d requests; want all 200, e under 10%%", r.RetCodes, slow, n)
	}
}

// Least request favours the endpoints with fewest requests in flight: the one 50 ms
// slower, whose requests stay in flight longer, gets under half its even share.
func TestTrafficLeastRequest(t *testing.T) {
	e := tmSetup(t)
	e.apply(t, "least.yaml", `apiVersion: ferry.io/v1alpha1
kind: TrafficPolicy
metadata: {name: least, namespace: default, generation: {gen}}
spec:
  targetRefs: [{group: "", kind: Service, name: least}]
  loadBalancer: {type: LeastRequest}
`)
	tg := tag(t)
	const n = 2000
	r := e.fortio(t, "a", "-qps", "0", "-c", "8", "-n", strconv.Itoa(n), tmURL("least", "/?tag="+tg))
	per := e.servedBy(t, tg, tmSlowPort, "b", "c", "e")
	share := 100 * float64(per["e"]) / n
	t.Logf("%v; per endpoint %v: e, with the most in flight, got %.1f%%", r.RetCodes, per, share)
	if r.RetCodes["200"] != n || share >= 100.0/3/2 {
		t.Errorf("%v, e got %.1f%%; want all 200 and e under half of an even third", r.RetCodes, share)
	}
}

// Rate limit: 100 req/s allowed, 300 req/s offered → about 200 req/s answered 429
// by the destination's agent, whose flows say rate_limited.
func TestTrafficRateLimit(t *testing.T) {
	e := tmSetup(t)
	e.apply(t, "limited.yaml", `apiVersion: ferry.io/v1alpha1
kind: TrafficPolicy
metadata: {name: limited, namespace: default, generation: {gen}}
spec:
  targetRefs: [{group: "", kind: Service, name: limited}]
  rateLimit: {requestsPerSecond: 100, burst: 10}
`)
	start := time.Now()
	tg := tag(t)
	r := e.fortio(t, "a", "-qps", "300", "-t", "5s", "-c", "8", tmURL("limited", "/?tag="+tg))
	secs := float64(r.ActualDuration) / 1e9
	limited, ok := float64(r.RetCodes["429"])/secs, float64(r.RetCodes["200"])/secs
	t.Logf("%.0f req/s offered for %.1f s: %.0f/s answered, %.0f/s 429 (%v)", r.ActualQPS, secs, ok, limited, r.RetCodes)
	if math.Abs(limited-200) > 30 || math.Abs(ok-100) > 20 {
		t.Errorf("%.0f/s answered 429 and %.0f/s 200; want about 200 and 100", limited, ok)
	}
	fs := e.tmObserve(t, "--since", sinceText(start), "--node", "node2", "--http-status", "429", "--last", "5")
	if len(fs) == 0 || !strings.HasPrefix(fs[0].GetReason(), "rate_limited") {
		t.Errorf("node2's 429 flows: want reason rate_limited:\n%s", flowsText(fs))
	}
}

// Rejected: a route whose new generation has an unknown backend, an invalid regular
// expression or weights summing to 0 gets a condition naming the field, and the last
// good generation stays in force: traffic still goes where it said.
func TestTrafficInvalidRejected(t *testing.T) {
	e := tmSetup(t)
	route := func(rule string) string {
		return `apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: guarded, namespace: default, generation: {gen}}
spec:
  parentRefs: [{group: "", kind: Service, name: guarded, port: 80}]
  rules:
  - ` + rule + "\n"
	}
	e.apply(t, "guarded.yaml", route(`backendRefs: [{name: canary, port: 80}]`))
	good := e.configStatus(t, "node1", "HTTPRoute default/guarded").GetGeneration()
	for _, bad := range []struct{ name, rule, field string }{
		{"unknown backend", `backendRefs: [{name: nope, port: 80}]`, "backendRefs[0]"},
		{"invalid regex", `matches: [{path: {type: RegularExpression, value: "/items/(unclosed"}}]
    backendRefs: [{name: guarded, port: 80}]`, "matches[0].path"},
		{"weights sum to 0", `backendRefs: [{name: guarded, port: 80, weight: 0}, {name: canary, port: 80, weight: 0}]`, "weight"},
	} {
		t.Run(strings.ReplaceAll(bad.name, " ", "-"), func(t *testing.T) {
			e.reapply(t, "guarded.yaml", route(bad.rule))
			for _, node := range []string{"node1", "node2"} {
				cs := e.configStatus(t, node, "HTTPRoute default/guarded")
				var reasons []string
				named := false
				for _, c := range cs.GetConditions() {
					if !c.GetStatus() {
						reasons = append(reasons, c.GetType()+" "+c.GetReason()+": "+c.GetMessage())
						named = named || strings.Contains(c.GetMessage(), bad.field)
					}
				}
				t.Logf("%s: generation %d, in force %d: %v", node, cs.GetGeneration(), cs.GetInForceGeneration(), reasons)
				if !named || cs.GetInForceGeneration() != good {
					t.Errorf("%s: conditions %v, in force %d; want one False naming %s and generation %d in force", node, reasons, cs.GetInForceGeneration(), bad.field, good)
				}
			}
			tg := tag(t)
			if r := e.fortio(t, "a", "-qps", "0", "-c", "2", "-n", "100", tmURL("guarded", "/?tag="+tg)); r.RetCodes["200"] != 100 {
				t.Errorf("traffic after the rejected change: %v, want 100 answered 200", r.RetCodes)
			}
			if per := e.servedBy(t, tg, tmHTTPPort, "b", "c", "e"); per["e"] != 100 {
				t.Errorf("after the rejected change requests went to %v, want all on the canary e (the good generation)", per)
			}
			out, err := exec.Command(filepath.Join(e.bin, "ferry"), "agent", "routes", "--lab", tmPrefix, "--node", "node1").CombinedOutput()
			t.Logf("ferry agent routes --node node1:\n%s", out)
			if err != nil || !strings.Contains(string(out), fmt.Sprintf("REJECTED; in force: generation %d", good)) || !strings.Contains(string(out), bad.field) {
				t.Errorf("ferry agent routes: %v; want the rejection, its field and generation %d in force:\n%s", err, good, out)
			}
		})
	}
}

// A GRPCRoute method match sends UnaryCall to the canary Service and every other
// call to the primary, for grpc-go's client through the cluster IP.
func TestTrafficGRPCRoute(t *testing.T) {
	e := tmSetup(t)
	e.apply(t, "calls.yaml", `apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: calls, namespace: default, generation: {gen}}
spec:
  parentRefs: [{group: "", kind: Service, name: calls, port: 80}]
  rules:
  - matches: [{method: {type: Exact, service: grpc.testing.TestService, method: UnaryCall}}]
    backendRefs: [{name: calls-canary, port: 80}]
  - backendRefs: [{name: calls, port: 80}]
`)
	start := time.Now()
	before := map[string]int64{}
	for _, pod := range []string{"b", "c", "e"} {
		before[pod] = e.grpcStats(t, pod).Unary
	}
	e.mustRun(t, "a", "grpc", vip(tmSvc("calls").ip), "unary:100", "empty_unary", "ping_pong")
	got := map[string]int64{}
	waitFor(2*time.Second, func() bool {
		for _, pod := range []string{"b", "c", "e"} {
			got[pod] = e.grpcStats(t, pod).Unary - before[pod]
		}
		return got["e"] >= 100
	})
	t.Logf("UnaryCalls per pod: %v", got)
	if got["e"] != 100 || got["b"]+got["c"] != 0 {
		t.Errorf("UnaryCalls went to %v, want all 100 on the canary e", got)
	}
	fs := e.tmObserve(t, "--since", sinceText(start), "--node", "node1", "--protocol", "grpc", "--route", "GRPCRoute default/calls")
	rules := map[uint32]int{}
	for _, f := range fs {
		rules[f.GetHttp().GetRouteRule()]++
	}
	if rules[0] != 100 || rules[1] < 2 {
		t.Errorf("node1's gRPC flows by rule of GRPCRoute default/calls: %v; want 100 UnaryCalls on rule 0 and the other calls on rule 1", rules)
	}
}
