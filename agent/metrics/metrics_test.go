package metrics

import (
	"fmt"
	"github.com/ferrymesh/ferry/internal/promcheck"
	"net/http/httptest"
	"runtime"
	"strings"
	"testing"
	"time"
)

type fakeKernel struct{}

func (fakeKernel) MapFill() ([]MapFill, error) {
	return []MapFill{{Name: "orig_dst", Entries: 3, MaxEntries: 16384}}, nil
}
func (fakeKernel) Counters() (map[string]uint64, error) {
	return map[string]uint64{"connect_redirected": 7}, nil
}

func scrape(t *testing.T, m *Metrics) string {
	t.Helper()
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if rec.Code != 200 {
		t.Fatalf("GET /metrics: %d", rec.Code)
	}
	return rec.Body.String()
}

func labels(src, dst string) Labels {
	return Labels{
		Reporter: ReporterSource, SourceWorkload: src, SourceWorkloadNamespace: "default",
		SourcePrincipal: "spiffe://cluster.local/ns/default/sa/" + src, DestinationWorkload: dst,
		DestinationWorkloadNamespace: "default", DestinationPrincipal: "spiffe://cluster.local/ns/default/sa/" + dst,
		ConnectionSecurityPolicy: MutualTLS,
	}
}

// TestScrapeIsValidAndIstioShaped checks the exposition with promtool (when it is
// installed, as make deps does) and the Istio names and labels.
func TestScrapeIsValidAndIstioShaped(t *testing.T) {
	m := New("node1", Sources{Flows: func() (int, int, uint64, uint64) { return 1, 4096, 1, 0 }, LiveConns: func() int { return 2 }, Kernel: fakeKernel{}})
	m.ConnOpened(labels("a", "c"))
	m.ConnClosed(labels("a", "c"), 100, 200)
	m.ConnOpened(Labels{Reporter: ReporterDestination})
	text := scrape(t, m)
	for _, want := range []string{
		`istio_tcp_connections_opened_total{connection_security_policy="mutual_tls",destination_principal="spiffe://cluster.local/ns/default/sa/c",destination_service="unknown",destination_workload="c",destination_workload_namespace="default",reporter="source",source_principal="spiffe://cluster.local/ns/default/sa/a",source_workload="a",source_workload_namespace="default"} 1`,
		`istio_tcp_received_bytes_total{`, `istio_tcp_sent_bytes_total{`, `istio_tcp_connections_closed_total{`,
		`source_workload="unknown"`, // a side not known is "unknown", as Istio reports it
		`ferry_datapath_events_total{event="connect_redirected"} 7`,
		`ferry_bpf_map_entries{map="orig_dst"} 3`,
		`ferry_flow_ring_capacity 4096`, `ferry_proxy_live_connections 2`,
	} {
		if !strings.Contains(text, want) {
			t.Errorf("scrape lacks %s", want)
		}
	}
	if !strings.Contains(text, "} 100\n") || !strings.Contains(text, "} 200\n") {
		t.Errorf("bytes: want 100 received (request) and 200 sent (response):\n%s", text)
	}
	promcheck.Check(t, text)
}

// TestCardinalityBounded records 100,000 connections among 20 workloads and reports
// the heap: series follow workload pairs, never connections, ports or addresses.
func TestCardinalityBounded(t *testing.T) {
	heap := func() uint64 {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc
	}
	m := New("node1", Sources{})
	before := heap()
	const conns, workloads = 100_000, 20
	var afterFirst uint64
	for i := range conns {
		l := labels(fmt.Sprint("w", i%workloads), fmt.Sprint("w", (i/workloads)%workloads))
		m.ConnOpened(l)
		m.ConnClosed(l, int64(i), int64(i))
		if i == workloads*workloads {
			afterFirst = heap()
		}
	}
	after := heap()
	series := strings.Count(scrape(t, m), "\nistio_tcp_connections_closed_total{")
	t.Logf("metrics after %d connections among %d workloads: %d series per metric, heap %d KiB after every pair was seen, %d KiB at the end",
		conns, workloads, series, (afterFirst-before)/1024, (after-before)/1024)
	if series != workloads*workloads {
		t.Errorf("%d series, want one per workload pair (%d)", series, workloads*workloads)
	}
	if after > afterFirst+afterFirst/2+64<<10 {
		t.Errorf("heap grew from %d to %d bytes once every pair was seen", afterFirst-before, after-before)
	}
}

// BenchmarkConnOpenedClosed is the metrics' cost per proxied connection.
func BenchmarkConnOpenedClosed(b *testing.B) {
	m := New("node1", Sources{})
	l := labels("a", "c")
	b.ReportAllocs()
	for b.Loop() {
		m.ConnOpened(l)
		m.ConnClosed(l, 1000, 1000)
	}
}

func reqLabels(code, grpc string) RequestLabels {
	l := RequestLabels{Labels: labels("a", "c"), SourceCanonicalService: "a", DestinationServiceName: "web",
		DestinationServiceNamespace: "default", RequestProtocol: ProtocolHTTP, ResponseCode: code, GRPCResponseStatus: grpc}
	l.DestinationService = "web.default.svc.cluster.local"
	if grpc != "" {
		l.RequestProtocol = ProtocolGRPC
	}
	return l
}

// TestRequestMetricsIstioShaped checks the request metrics' names, Istio's full label
// set and the buckets, and the exposition with promtool.
func TestRequestMetricsIstioShaped(t *testing.T) {
	m := New("node1", Sources{})
	m.Request(reqLabels("200", ""), 3*time.Millisecond, 0, 512)
	m.Request(reqLabels("200", ""), 30*time.Millisecond, 100, 512)
	m.Request(reqLabels("200", "14"), 700*time.Microsecond, 5, 7)
	noEndpoint := reqLabels("503", "")
	noEndpoint.ResponseFlags = "UH"
	m.Request(noEndpoint, 0, 0, 0)
	aborted := reqLabels("503", "")
	aborted.ResponseFlags, aborted.Route = "FI", "HTTPRoute default/canary"
	m.Request(aborted, time.Millisecond, 0, 0)
	m.Retries("web.default.svc.cluster.local", 3)
	m.Retries("web.default.svc.cluster.local", 0)
	m.Retries("", 1)
	text := scrape(t, m)
	for _, want := range []string{
		`istio_requests_total{connection_security_policy="mutual_tls",destination_principal="spiffe://cluster.local/ns/default/sa/c",destination_service="web.default.svc.cluster.local",destination_service_name="web",destination_service_namespace="default",destination_workload="c",destination_workload_namespace="default",grpc_response_status="",reporter="source",request_protocol="http",response_code="200",response_flags="-",route="-",source_app="unknown",source_canonical_service="a",source_principal="spiffe://cluster.local/ns/default/sa/a",source_version="unknown",source_workload="a",source_workload_namespace="default"} 2`,
		`grpc_response_status="14"`, `request_protocol="grpc"`,
		`response_code="503",response_flags="UH",route="-"`,
		`response_code="503",response_flags="FI",route="HTTPRoute default/canary"`,
		`ferry_request_retries_total{destination_service="web.default.svc.cluster.local"} 3`,
		`ferry_request_retries_total{destination_service="unknown"} 1`,
		// Envoy's default buckets, as Istio's proxies export them.
		`istio_request_duration_milliseconds_bucket{`, `le="0.5"} 0`, `le="1"} 1`, `le="5"} 1`, `le="3.6e+06"} 2`,
		`istio_request_duration_milliseconds_sum{`, `istio_request_duration_milliseconds_count{`,
		`istio_request_bytes_bucket{`, `istio_response_bytes_bucket{`, `le="1e+09"}`,
		`istio_response_bytes_sum{connection_security_policy="mutual_tls"`,
	} {
		if !strings.Contains(text, want) {
			t.Errorf("scrape lacks %s", want)
		}
	}
	promcheck.Check(t, text)
}

// BenchmarkRequest is the request metrics' cost per request.
func BenchmarkRequest(b *testing.B) {
	m := New("node1", Sources{})
	l := reqLabels("200", "")
	b.ReportAllocs()
	for b.Loop() {
		m.Request(l, time.Millisecond, 100, 1000)
	}
}

// The isolation counters name the pod and the budget, and pass promtool.
func TestIsolationCounters(t *testing.T) {
	m := New("node1", Sources{})
	m.BudgetRefused("default/flood", "outbound_connections")
	m.BudgetRefused("default/flood", "outbound_connections")
	m.Panicked("default/a")
	text := scrape(t, m)
	for _, want := range []string{
		`ferry_budget_refusals_total{budget="outbound_connections",pod="default/flood"} 2`,
		`ferry_proxy_panics_total{pod="default/a"} 1`,
	} {
		if !strings.Contains(text, want) {
			t.Errorf("scrape lacks %s", want)
		}
	}
	promcheck.Check(t, text)
}
