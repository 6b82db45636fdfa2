package observe

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/agent/flows"
	"github.com/ferrymesh/ferry/api/admin"
	"github.com/ferrymesh/ferry/api/ferryv1"
	"github.com/ferrymesh/ferry/internal/promcheck"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

func TestServiceIndexNamesDestinations(t *testing.T) {
	st := &ferryv1.NodeState{
		Workloads: []*ferryv1.Workload{
			{Uid: "u-c", Name: "c", Namespace: "shop", Ips: []string{"10.1.2.10"}},
			{Uid: "u-d", Name: "d", Namespace: "shop", Ips: []string{"10.1.2.11"}},
		},
		Services: []*ferryv1.Service{
			{Name: "web", Namespace: "shop", ClusterIps: []string{"10.96.0.10"}, Endpoints: []string{"u-c", "u-d"},
				Ports: []*ferryv1.ServicePort{{Port: 80, TargetPort: "8080"}, {Port: 443, TargetPort: "https"}}},
			{Name: "api", Namespace: "shop", Endpoints: []string{"u-c"}, Ports: []*ferryv1.ServicePort{{Port: 9000}}},
			{Name: "zz-also-web", Namespace: "shop", Endpoints: []string{"u-c"}, Ports: []*ferryv1.ServicePort{{Port: 8080}}},
		},
	}
	o := &Observer{}
	o.SetState(st)
	for addr, want := range map[string]string{
		"10.96.0.10:80":  "shop/web", // cluster IP
		"10.1.2.10:8080": "shop/web", // endpoint and target port; zz-also-web comes later
		"10.1.2.11:8080": "shop/web",
		"10.1.2.10:9000": "shop/api", // no target port: the port itself
		"10.96.0.10:443": "shop/web",
		"10.1.2.10:443":  "", // a named target port is not resolved
		"10.1.2.12:8080": "",
	} {
		ap := netip.MustParseAddrPort(addr)
		if got := o.service(ap).flow; got != want {
			t.Errorf("%s: service %q, want %q", addr, got, want)
		}
	}
	if got := o.service(netip.MustParseAddrPort("10.96.0.10:80")).metric; got != "web.shop.svc.cluster.local" {
		t.Errorf("metric name %q", got)
	}
}

func TestFlowFromConnection(t *testing.T) {
	o := &Observer{node: "node1"}
	start := time.Now()
	c := admin.Conn{
		Direction: admin.Outbound, Security: admin.MTLS, SrcPod: "default/a", DstPod: "default/c", DstNode: "node2",
		Src: netip.MustParseAddrPort("10.1.1.10:40000"), Dst: netip.MustParseAddrPort("10.1.2.10:8080"),
		SrcIdentity: "spiffe://cluster.local/ns/default/sa/a", DstIdentity: "spiffe://cluster.local/ns/default/sa/c",
		Start: start, End: start.Add(time.Second), BytesSent: 10, BytesRecv: 20,
		Verdict: admin.VerdictForwarded, Status: 200,
	}
	f := o.flow(c)
	if f.GetVerdict() != ferryv1.Verdict_VERDICT_FORWARDED || f.GetReason() != "" || f.GetSource().GetPod() != "a" || f.GetDestination().GetNamespace() != "default" ||
		f.GetDestination().GetNode() != "node2" || f.GetBytesSent() != 10 || f.GetDuration().AsDuration() != time.Second {
		t.Errorf("flow %v", f)
	}
	if f.GetCertExpiring() || f.GetCertNotAfter() != nil {
		t.Errorf("flow of a record without certificate says %v, %v", f.GetCertExpiring(), f.GetCertNotAfter())
	}
	c.CertExpiring, c.CertNotAfter = true, start.Add(3*time.Second)
	if f := o.flow(c); !f.GetCertExpiring() || !f.GetCertNotAfter().AsTime().Equal(c.CertNotAfter) {
		t.Errorf("flow of an expiring certificate says %v, %v", f.GetCertExpiring(), f.GetCertNotAfter())
	}
	l := connLabels(c, service{metric: "web.default.svc.cluster.local"})
	if l.Reporter != "source" || l.ConnectionSecurityPolicy != "mutual_tls" || l.DestinationService != "web.default.svc.cluster.local" ||
		l.SourceWorkload != "a" || l.DestinationWorkloadNamespace != "default" {
		t.Errorf("labels %+v", l)
	}
	// With the workloads the operator names (a Deployment's, a Job's), metrics count
	// by those, as Istio's do; flows still name the pods.
	c.SrcWorkload, c.DstWorkload = "default/client", "default/web"
	if l := connLabels(c, service{}); l.SourceWorkload != "client" || l.DestinationWorkload != "web" || l.DestinationWorkloadNamespace != "default" {
		t.Errorf("labels with workloads %+v", l)
	}
	if f := o.flow(c); f.GetSource().GetPod() != "a" {
		t.Errorf("flow names source pod %q, want a", f.GetSource().GetPod())
	}
}

// The flow's verdict and reason come from the record's typed outcome, whatever its
// error text says.
func TestFlowVerdictFromOutcome(t *testing.T) {
	o := &Observer{node: "node1"}
	for _, tc := range []struct {
		name       string
		verdict    admin.Verdict
		reason     admin.Reason
		status     int
		err        string
		want       ferryv1.Verdict
		wantReason string
	}{
		{"clean", admin.VerdictForwarded, admin.ReasonNone, 200, "", ferryv1.Verdict_VERDICT_FORWARDED, ""},
		{"reset while carried", admin.VerdictForwarded, admin.ReasonReset, 200, "read: connection reset by peer",
			ferryv1.Verdict_VERDICT_FORWARDED, "reset: read: connection reset by peer"},
		{"refused tunnel 403", admin.VerdictDenied, admin.ReasonForbidden, 403, "refused by destination: status 403: target is not this pod",
			ferryv1.Verdict_VERDICT_DROPPED, "forbidden: refused by destination: status 403: target is not this pod"},
		{"app refused behind the tunnel", admin.VerdictError, admin.ReasonRefused, 502, "refused by destination: status 502: connection refused",
			ferryv1.Verdict_VERDICT_ERROR, "refused: refused by destination: status 502: connection refused"},
		// The text mentions 403, the outcome does not: the outcome decides.
		{"text is not the outcome", admin.VerdictError, admin.ReasonTimeout, 0, "dial 10.0.0.1:403: i/o timeout",
			ferryv1.Verdict_VERDICT_ERROR, "timeout: dial 10.0.0.1:403: i/o timeout"},
		{"reason without text", admin.VerdictError, admin.ReasonCanceled, 0, "", ferryv1.Verdict_VERDICT_ERROR, "canceled"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := admin.Conn{Direction: admin.Outbound, Security: admin.MTLS, Verdict: tc.verdict, Reason: tc.reason, Status: tc.status, Error: tc.err}
			f := o.flow(c)
			if f.GetVerdict() != tc.want || f.GetReason() != tc.wantReason {
				t.Errorf("verdict %v reason %q, want %v %q", f.GetVerdict(), f.GetReason(), tc.want, tc.wantReason)
			}
		})
	}
}

// The observer serves what the proxy reports: flows on the Observer socket beside
// the admin socket, metrics on MetricsAddr. The metrics listener takes port 0 and
// reports the port it got, so no port is freed and taken again.
func TestObserverServes(t *testing.T) {
	dir := t.TempDir()
	cfg := Config{MetricsAddr: "127.0.0.1:0", FlowCapacity: 8}.Beside(filepath.Join(dir, "agent.sock"))
	o := New(cfg, "node1", Sources{}, slog.New(slog.DiscardHandler))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := o.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer o.Stop(ctx)
	start := time.Now()
	c := admin.Conn{Direction: admin.Inbound, Security: admin.Plaintext, DstPod: "default/b", DstIdentity: "spiffe://cluster.local/ns/default/sa/b",
		Src: netip.MustParseAddrPort("10.1.1.12:5000"), Dst: netip.MustParseAddrPort("10.1.1.11:8080"), Start: start, End: start,
		BytesSent: 7, BytesRecv: 9, Verdict: admin.VerdictForwarded}
	o.ConnOpened(c)
	o.ConnClosed(c)

	conn, err := grpc.NewClient("unix://"+filepath.Join(dir, "observer.sock"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	stream, err := ferryv1.NewObserverClient(conn).GetFlows(ctx, &ferryv1.GetFlowsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	m, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if f := m.GetFlow(); f.GetNode() != "node1" || f.GetDestination().GetPod() != "b" || f.GetSecurity() != "plaintext" || f.GetBytesReceived() != 9 {
		t.Errorf("flow %v", f)
	}

	if o.MetricsAddr() == "" || strings.HasSuffix(o.MetricsAddr(), ":0") {
		t.Fatalf("metrics address %q", o.MetricsAddr())
	}
	resp, err := http.Get("http://" + o.MetricsAddr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for _, want := range []string{
		`istio_tcp_connections_closed_total{connection_security_policy="none",destination_principal="spiffe://cluster.local/ns/default/sa/b",destination_service="unknown",destination_workload="b",destination_workload_namespace="default",reporter="destination",source_principal="unknown",source_workload="unknown",source_workload_namespace="unknown"} 1`,
		"ferry_flows_total 1", "ferry_proxy_live_connections 0",
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %s", want)
		}
	}
}

func TestConfigBeside(t *testing.T) {
	for _, tc := range []struct{ socket, admin, want string }{
		{"", "/run/ferry/agent.sock", "/run/ferry/observer.sock"},
		{"none", "/run/ferry/agent.sock", ""},
		{"/tmp/o.sock", "/run/ferry/agent.sock", "/tmp/o.sock"},
		{"", "", ""},
	} {
		if got := (Config{ObserverSocket: tc.socket}).Beside(tc.admin).ObserverSocket; got != tc.want {
			t.Errorf("socket %q beside %q: %q, want %q", tc.socket, tc.admin, got, tc.want)
		}
	}
}

// BenchmarkConnObserved is what the agent adds to every proxied connection: metrics
// on open, and on close the metrics, a flow record and the ring.
func BenchmarkConnObserved(b *testing.B) {
	o := New(DefaultConfig(), "node1", Sources{}, slog.New(slog.DiscardHandler))
	start := time.Now()
	c := admin.Conn{Direction: admin.Outbound, Security: admin.MTLS, SrcPod: "default/a", DstPod: "default/c",
		SrcIdentity: "spiffe://cluster.local/ns/default/sa/a", DstIdentity: "spiffe://cluster.local/ns/default/sa/c",
		Src: netip.MustParseAddrPort("10.1.1.10:40000"), Dst: netip.MustParseAddrPort("10.1.2.10:8080"), Start: start, End: start,
		Verdict: admin.VerdictForwarded}
	b.ReportAllocs()
	for b.Loop() {
		o.ConnOpened(c)
		o.ConnClosed(c)
	}
}

// request is one HTTP request from a to a Service endpoint on c, as the source
// node's proxy reports it.
func request(i, status int, reason admin.Reason) admin.Conn {
	start := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC).Add(time.Duration(i) * time.Millisecond)
	c := admin.Conn{
		Direction: admin.Outbound, Security: admin.MTLS, SrcPod: "default/a", DstPod: "default/c", DstNode: "node2",
		Src: netip.AddrPortFrom(netip.MustParseAddr("10.1.1.10"), uint16(40000+i%2000)), Dst: netip.MustParseAddrPort("10.1.2.10:8080"),
		Service:     netip.MustParseAddrPort("10.96.0.50:80"),
		SrcIdentity: "spiffe://cluster.local/ns/default/sa/a", DstIdentity: "spiffe://cluster.local/ns/default/sa/c",
		Start: start, End: start.Add(time.Duration(2+i%7) * time.Millisecond), BytesSent: int64(i % 100), BytesRecv: 1000,
		Verdict: admin.VerdictForwarded, Reason: reason, Protocol: admin.HTTP1,
		// Paths and client ports vary per request: neither may become a label.
		HTTP: &admin.HTTP{Method: "GET", Authority: "web.default", Path: fmt.Sprintf("/items/%d", i), Proto: "HTTP/1.1", Status: status},
	}
	if reason != admin.ReasonNone {
		c.Verdict = admin.VerdictError
	}
	return c
}

// Traffic between two pods of one node passes one proxy, which counts it for both
// sides: a request and a connection appear once with reporter="source" and once with
// reporter="destination", so dashboards that count by the destination's reporter (as
// Istio's do) see it; a connection across nodes stays counted by its own side only.
func TestSameNodeCountedForBothReporters(t *testing.T) {
	dir := t.TempDir()
	o := New(Config{MetricsAddr: "127.0.0.1:0"}.Beside(filepath.Join(dir, "agent.sock")), "node1", Sources{}, slog.New(slog.DiscardHandler))
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := o.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer o.Stop(ctx)
	same := request(1, 200, admin.ReasonNone)
	same.Security, same.DstNode = admin.SameNode, "node1"
	o.Request(same)
	o.Request(same)
	o.Request(request(2, 200, admin.ReasonNone)) // across nodes: the source's only
	tcp := same
	tcp.HTTP, tcp.Protocol = nil, admin.TCP
	o.ConnOpened(tcp)
	o.ConnClosed(tcp)

	resp, err := http.Get("http://" + o.MetricsAddr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	sum := func(metric, reporter string) int {
		n := 0
		for _, m := range regexp.MustCompile(`(?m)^`+metric+`\{(.*)\} (\d+)$`).FindAllStringSubmatch(string(body), -1) {
			if strings.Contains(m[1], `reporter="`+reporter+`"`) {
				v, _ := strconv.Atoi(m[2])
				n += v
			}
		}
		return n
	}
	for _, c := range []struct {
		metric, reporter string
		want             int
	}{
		{"istio_requests_total", "source", 3},
		{"istio_requests_total", "destination", 2},
		{"istio_tcp_connections_opened_total", "source", 1},
		{"istio_tcp_connections_opened_total", "destination", 1},
		{"istio_tcp_connections_closed_total", "destination", 1},
	} {
		if got := sum(c.metric, c.reporter); got != c.want {
			t.Errorf("%s{reporter=%q} = %d, want %d", c.metric, c.reporter, got, c.want)
		}
	}
}

// Metrics equal flows at L7: N requests with a mix of 200, 404 and 503 give
// istio_requests_total summing to N, split by response_code as sent, on the metrics
// listener a Prometheus scrapes; and N request flows with their HTTP fields on the
// Observer socket.
func TestRequestsBecomeMetricsAndFlows(t *testing.T) {
	dir := t.TempDir()
	const n = 1000
	cfg := Config{MetricsAddr: "127.0.0.1:0", FlowCapacity: 2 * n}.Beside(filepath.Join(dir, "agent.sock"))
	o := New(cfg, "node1", Sources{}, slog.New(slog.DiscardHandler))
	o.SetState(&ferryv1.NodeState{Services: []*ferryv1.Service{{Name: "web", Namespace: "default", ClusterIps: []string{"10.96.0.50"},
		Ports: []*ferryv1.ServicePort{{Port: 80, TargetPort: "8080"}}}}})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := o.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer o.Stop(ctx)
	want := map[string]int{}
	for i := range n {
		status, reason := 200, admin.ReasonNone
		switch {
		case i%10 == 3:
			status = 404
		case i%10 == 7:
			status, reason = 503, admin.ReasonNoEndpoints
		}
		want[strconv.Itoa(status)]++
		o.Request(request(i, status, reason))
	}
	o.Request(admin.Conn{Direction: admin.Outbound}) // not a request record: ignored

	resp, err := http.Get("http://" + o.MetricsAddr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	got, total, series := map[string]int{}, 0, 0
	line := regexp.MustCompile(`(?m)^istio_requests_total\{(.*)\} (\d+)$`)
	for _, m := range line.FindAllStringSubmatch(string(body), -1) {
		v, _ := strconv.Atoi(m[2])
		code := regexp.MustCompile(`response_code="(\d+)"`).FindStringSubmatch(m[1])
		if code == nil {
			t.Fatalf("series without response_code: %s", m[0])
		}
		got[code[1]] += v
		total += v
		series++
		for _, l := range []string{`reporter="source"`, `request_protocol="http"`, `destination_service="web.default.svc.cluster.local"`,
			`destination_service_name="web"`, `destination_service_namespace="default"`, `source_workload="a"`, `destination_workload="c"`,
			`connection_security_policy="mutual_tls"`, `source_canonical_service="a"`} {
			if !strings.Contains(m[1], l) {
				t.Errorf("series %s lacks %s", m[0], l)
			}
		}
		if strings.Contains(m[1], `response_code="503"`) != strings.Contains(m[1], `response_flags="UH"`) {
			t.Errorf("series %s: 503 for no endpoint goes with response_flags UH, and only it", m[0])
		}
	}
	if total != n || got["200"] != want["200"] || got["404"] != want["404"] || got["503"] != want["503"] {
		t.Errorf("istio_requests_total: %v (sum %d), want %v (sum %d)", got, total, want, n)
	}
	if series != 3 {
		t.Errorf("%d series of istio_requests_total, want 3 (one per status): paths or ports became labels?", series)
	}
	for _, name := range []string{"istio_request_duration_milliseconds_count", "istio_request_bytes_count", "istio_response_bytes_count"} {
		sum := 0
		for _, m := range regexp.MustCompile(`(?m)^`+name+`\{.*\} (\d+)$`).FindAllStringSubmatch(string(body), -1) {
			v, _ := strconv.Atoi(m[1])
			sum += v
		}
		if sum != n {
			t.Errorf("%s sums to %d, want %d", name, sum, n)
		}
	}

	conn, err := grpc.NewClient("unix://"+filepath.Join(dir, "observer.sock"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	stream, err := ferryv1.NewObserverClient(conn).GetFlows(ctx, &ferryv1.GetFlowsRequest{Filter: &ferryv1.FlowFilter{
		Protocol: []string{"http"}, HttpStatusRange: []*ferryv1.StatusRange{{Min: 500, Max: 599}}}})
	if err != nil {
		t.Fatal(err)
	}
	flows := 0
	for {
		m, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		f := m.GetFlow()
		h := f.GetHttp()
		if flows == 0 && (f.GetProtocol() != "http" || h.GetMethod() != "GET" || h.GetAuthority() != "web.default" || !strings.HasPrefix(h.GetPath(), "/items/") ||
			h.GetVersion() != "HTTP/1.1" || h.GetStatus() != 503 || f.GetService() != "default/web" || f.GetReason() != "no_endpoints" ||
			f.GetVerdict() != ferryv1.Verdict_VERDICT_ERROR || f.GetDuration().AsDuration() < 2*time.Millisecond || f.GetBytesReceived() != 1000) {
			t.Errorf("request flow %v", f)
		}
		flows++
	}
	if flows != want["503"] {
		t.Errorf("%d flows with --protocol http --http-status 500-599, want %d", flows, want["503"])
	}
}

func TestRequestLabelsBounded(t *testing.T) {
	c := request(1, 200, admin.ReasonNone)
	c.Protocol, c.HTTP.GRPCStatus = admin.GRPC, "14"
	l := requestLabels(c, service{metric: "web.default.svc.cluster.local", name: "web", namespace: "default"})
	if l.RequestProtocol != "grpc" || l.GRPCResponseStatus != "14" || l.ResponseCode != "200" || l.ResponseFlags != "-" {
		t.Errorf("grpc labels %+v", l)
	}
	for _, tc := range []struct {
		status     int
		grpc, code string
		wantGRPC   string
	}{
		{0, "", "0", ""}, {42, "", "0", ""}, {1000, "", "0", ""}, {599, "", "599", ""},
		{200, "UNAVAILABLE", "200", "unknown"}, {200, "99", "200", "unknown"}, {200, "0", "200", "0"},
	} {
		c.HTTP.Status, c.HTTP.GRPCStatus = tc.status, tc.grpc
		l := requestLabels(c, service{})
		if l.ResponseCode != tc.code || l.GRPCResponseStatus != tc.wantGRPC {
			t.Errorf("status %d grpc %q: labels %q %q, want %q %q", tc.status, tc.grpc, l.ResponseCode, l.GRPCResponseStatus, tc.code, tc.wantGRPC)
		}
	}
	for r, want := range map[admin.Reason]string{
		admin.ReasonNoEndpoints: "UH", admin.ReasonTimeout: "UT", admin.ReasonRefused: "UF", admin.ReasonNone: "-",
		admin.ReasonFault: "FI", admin.ReasonCircuitOpen: "UO", admin.ReasonRateLimited: "RL", admin.ReasonNoRoute: "NR",
	} {
		if got := responseFlags(request(1, 503, r)); got != want {
			t.Errorf("reason %q: flags %q, want %q", r, got, want)
		}
	}
	retried := request(1, 503, admin.ReasonNone)
	retried.HTTP.Retries = 3
	if got := responseFlags(retried); got != "URX" {
		t.Errorf("a request retried 3 times that still got 503: flags %q, want URX", got)
	}
	retried.HTTP.Status = 200
	if got := responseFlags(retried); got != "-" {
		t.Errorf("a request a retry got through: flags %q, want -", got)
	}
	// A delayed request is DI, joined with its other flag in Envoy's order.
	for r, want := range map[admin.Reason]string{
		admin.ReasonNone: "DI", admin.ReasonFault: "DI,FI", admin.ReasonCanceled: "DI,DC",
		admin.ReasonTimeout: "UT,DI", admin.ReasonNoEndpoints: "UH,DI", admin.ReasonCircuitOpen: "UO,DI",
	} {
		delayed := request(1, 503, r)
		delayed.HTTP.FaultDelay = 100 * time.Millisecond
		if got := responseFlags(delayed); got != want {
			t.Errorf("delayed, reason %q: flags %q, want %q", r, got, want)
		}
	}
	retried.HTTP.Status, retried.HTTP.FaultDelay = 503, time.Second
	if got := responseFlags(retried); got != "DI,URX" {
		t.Errorf("a delayed request whose retries ran out: flags %q, want DI,URX", got)
	}
}

// A routed request's flow names its route, rule and retries, and its metrics carry
// the route; a request the mesh answered itself carries the reason in its flow and
// Envoy's flag in its metrics; retries are counted per destination service.
func TestRouteRetriesAndMeshAnswers(t *testing.T) {
	o := New(DefaultConfig(), "node1", Sources{}, slog.New(slog.DiscardHandler))
	o.SetState(&ferryv1.NodeState{Services: []*ferryv1.Service{{
		Name: "web", Namespace: "default", ClusterIps: []string{"10.96.0.50"}, Ports: []*ferryv1.ServicePort{{Port: 80}},
	}}})
	routed := request(1, 200, admin.ReasonNone)
	routed.HTTP.Route, routed.HTTP.RouteRule, routed.HTTP.Retries = "HTTPRoute default/canary", 2, 1
	o.Request(routed)
	aborted := request(2, 503, admin.ReasonFault)
	aborted.HTTP.Route = "HTTPRoute default/canary"
	o.Request(aborted)
	limited := request(3, 429, admin.ReasonRateLimited)
	o.Request(limited)
	delayed := request(4, 503, admin.ReasonFault)
	delayed.HTTP.FaultDelay = 100 * time.Millisecond
	o.Request(delayed)

	fs := o.ring.Flows(flows.Query{})
	if len(fs) != 4 {
		t.Fatalf("%d flows, want 4", len(fs))
	}
	if d := fs[3].GetHttp().GetFaultDelay(); d.AsDuration() != 100*time.Millisecond || fs[3].GetReason() != "fault" {
		t.Errorf("delayed flow: %v", fs[3])
	}
	if fs[0].GetHttp().GetFaultDelay() != nil {
		t.Errorf("a flow not delayed has a fault delay: %v", fs[0])
	}
	if h := fs[0].GetHttp(); h.GetRoute() != "HTTPRoute default/canary" || h.GetRouteRule() != 2 || h.GetRetries() != 1 || fs[0].GetReason() != "" {
		t.Errorf("routed flow: %v", fs[0])
	}
	if fs[1].GetReason() != "fault" || fs[1].GetHttp().GetStatus() != 503 || fs[1].GetHttp().GetRoute() != "HTTPRoute default/canary" {
		t.Errorf("aborted flow: %v", fs[1])
	}
	if fs[2].GetReason() != "rate_limited" || fs[2].GetHttp().GetRoute() != "" {
		t.Errorf("rate limited flow: %v", fs[2])
	}
	rec := httptest.NewRecorder()
	o.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	text := rec.Body.String()
	for _, want := range []string{
		`response_code="200",response_flags="-",route="HTTPRoute default/canary"`,
		`response_code="503",response_flags="FI",route="HTTPRoute default/canary"`,
		`response_code="429",response_flags="RL",route="-"`,
		`response_code="503",response_flags="DI,FI",route="-"`,
		`ferry_request_retries_total{destination_service="web.default.svc.cluster.local"} 1`,
	} {
		if !strings.Contains(text, want) {
			t.Errorf("metrics lack %s", want)
		}
	}
	promcheck.Check(t, text)
}

// BenchmarkRequestObserved is what the agent adds to every request the proxy
// carries at L7: the metrics, a flow record and the ring.
func BenchmarkRequestObserved(b *testing.B) {
	o := New(DefaultConfig(), "node1", Sources{}, slog.New(slog.DiscardHandler))
	c := request(1, 200, admin.ReasonNone)
	b.ReportAllocs()
	for b.Loop() {
		o.Request(c)
	}
}

// --observer-addr without its TLS files fails the start: the Observer API never
// serves flows on TCP in plaintext.
func TestObserverAddrNeedsTLS(t *testing.T) {
	o := New(Config{ObserverAddr: "127.0.0.1:0"}, "node1", Sources{}, slog.New(slog.DiscardHandler))
	if err := o.Start(context.Background()); err == nil {
		o.Stop(context.Background())
		t.Fatal("the Observer API started on TCP without TLS")
	}
}
