package tracing

import (
	"context"
	"encoding/hex"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	collectortrace "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/grpc"
)

// collector is an in-process OTLP/gRPC trace receiver.
type collector struct {
	collectortrace.UnimplementedTraceServiceServer
	mu      sync.Mutex
	spans   []*tracepb.Span
	service []string // service.name of each span's resource
	got     chan struct{}
}

func (c *collector) Export(_ context.Context, req *collectortrace.ExportTraceServiceRequest) (*collectortrace.ExportTraceServiceResponse, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, rs := range req.GetResourceSpans() {
		name := ""
		for _, kv := range rs.GetResource().GetAttributes() {
			if kv.GetKey() == "service.name" {
				name = kv.GetValue().GetStringValue()
			}
		}
		for _, ss := range rs.GetScopeSpans() {
			for _, s := range ss.GetSpans() {
				c.spans = append(c.spans, s)
				c.service = append(c.service, name)
			}
		}
	}
	select {
	case c.got <- struct{}{}:
	default:
	}
	return &collectortrace.ExportTraceServiceResponse{}, nil
}

func startCollector(t *testing.T) (*collector, string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c := &collector{got: make(chan struct{}, 1)}
	srv := grpc.NewServer()
	collectortrace.RegisterTraceServiceServer(srv, c)
	go srv.Serve(ln)
	t.Cleanup(srv.Stop)
	return c, ln.Addr().String()
}

func startTracer(t *testing.T, cfg Config, node string) *Tracer {
	t.Helper()
	tr, err := New(cfg, node, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	if err := tr.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	return tr
}

const (
	incomingTrace = "4bf92f3577b34da6a3ce929d0e0e4736"
	incomingSpan  = "00f067aa0ba902b7"
)

func attr(s *tracepb.Span, key string) string {
	for _, kv := range s.GetAttributes() {
		if kv.GetKey() == key {
			return kv.GetValue().GetStringValue()
		}
	}
	return ""
}

// One hop through the mesh: the app's request carries a sampled traceparent; the
// source node's proxy starts a client span and forwards, the destination node's
// proxy starts a server span and delivers to the app. The collector receives both
// spans, in the incoming trace, the client's parent being the incoming span and
// the server's the client span; the app sees the same trace id, parented by the
// server span.
func TestClientAndServerSpans(t *testing.T) {
	col, addr := startCollector(t)
	src := startTracer(t, Config{OTLPEndpoint: addr}, "node1")
	dst := startTracer(t, Config{OTLPEndpoint: addr}, "node2")

	var appHeader http.Header
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		appHeader = r.Header.Clone()
		w.WriteHeader(http.StatusTeapot)
	}))
	defer app.Close()

	req, _ := http.NewRequest("GET", app.URL+"/items/1", nil)
	req.Host = "web.default"
	req.Header.Set("Traceparent", "00-"+incomingTrace+"-"+incomingSpan+"-01")
	req.Header.Set("Tracestate", "vendor=x")
	clientEnd := src.Client(req, Attrs{SourceWorkload: "a", SourceNamespace: "default", DestinationWorkload: "c",
		DestinationNamespace: "default", Service: "web.default.svc.cluster.local", Upstream: "10.1.2.10:8080"})
	afterClient := req.Header.Get("Traceparent")
	serverEnd := dst.Server(req, Attrs{SourceWorkload: "a", SourceNamespace: "default", DestinationWorkload: "c", DestinationNamespace: "default"})
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	serverEnd(resp.StatusCode, "", nil)
	clientEnd(resp.StatusCode, "", nil)

	if got := TraceID(appHeader); got != incomingTrace {
		t.Errorf("the app saw trace %q (traceparent %q), want %s", got, appHeader.Get("Traceparent"), incomingTrace)
	}
	if appHeader.Get("Tracestate") != "vendor=x" {
		t.Errorf("tracestate %q, want it carried", appHeader.Get("Tracestate"))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := src.Stop(ctx); err != nil { // flushes
		t.Fatal(err)
	}
	if err := dst.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	col.mu.Lock()
	defer col.mu.Unlock()
	if len(col.spans) != 2 {
		t.Fatalf("collector received %d spans, want a client and a server span", len(col.spans))
	}
	var client, server *tracepb.Span
	for i, s := range col.spans {
		if col.service[i] != "ferry-agent" {
			t.Errorf("span %q from service %q", s.GetName(), col.service[i])
		}
		switch s.GetKind() {
		case tracepb.Span_SPAN_KIND_CLIENT:
			client = s
		case tracepb.Span_SPAN_KIND_SERVER:
			server = s
		}
	}
	if client == nil || server == nil {
		t.Fatalf("spans %v: want one client and one server", col.spans)
	}
	hexID := func(b []byte) string { return hex.EncodeToString(b) }
	if hexID(client.GetTraceId()) != incomingTrace || hexID(server.GetTraceId()) != incomingTrace {
		t.Errorf("traces %s, %s: want the incoming %s", hexID(client.GetTraceId()), hexID(server.GetTraceId()), incomingTrace)
	}
	if hexID(client.GetParentSpanId()) != incomingSpan {
		t.Errorf("client span's parent %s, want the incoming span %s", hexID(client.GetParentSpanId()), incomingSpan)
	}
	if hexID(server.GetParentSpanId()) != hexID(client.GetSpanId()) {
		t.Errorf("server span's parent %s, want the client span %s", hexID(server.GetParentSpanId()), hexID(client.GetSpanId()))
	}
	if want := "00-" + incomingTrace + "-" + hexID(client.GetSpanId()) + "-01"; afterClient != want {
		t.Errorf("traceparent after the client span %q, want %q", afterClient, want)
	}
	if want := "00-" + incomingTrace + "-" + hexID(server.GetSpanId()) + "-01"; appHeader.Get("Traceparent") != want {
		t.Errorf("the app's traceparent %q, want the server span's %q", appHeader.Get("Traceparent"), want)
	}
	if client.GetName() != "GET web.default.svc.cluster.local" || attr(client, "ferry.upstream.address") != "10.1.2.10:8080" ||
		attr(client, "ferry.source.workload") != "a" || attr(client, "ferry.node") != "node1" || attr(server, "ferry.node") != "node2" ||
		attr(server, "url.path") != "/items/1" || attr(server, "server.address") != "web.default" {
		t.Errorf("span names and attributes: client %v, server %v", client, server)
	}
	// A 418 fails the request for its client, not for the server that answered it.
	if client.GetStatus().GetCode() != tracepb.Status_STATUS_CODE_ERROR || server.GetStatus().GetCode() == tracepb.Status_STATUS_CODE_ERROR {
		t.Errorf("statuses: client %v, server %v", client.GetStatus(), server.GetStatus())
	}
}

// Sampling follows the parent: a request whose traceparent is not sampled gives no
// spans, but its hops still carry the trace on (flag 00).
func TestUnsampledParentExportsNothing(t *testing.T) {
	col, addr := startCollector(t)
	tr := startTracer(t, Config{OTLPEndpoint: addr, RootSampling: 1}, "node1")
	req := httptest.NewRequest("POST", "http://web.default/shop.Cart/Add", nil)
	req.Header.Set("Traceparent", "00-"+incomingTrace+"-"+incomingSpan+"-00")
	tr.Client(req, Attrs{})(200, "14", nil)
	if got := req.Header.Get("Traceparent"); TraceID(req.Header) != incomingTrace || got[len(got)-2:] != "00" {
		t.Errorf("traceparent %q: want the trace carried on, unsampled", got)
	}
	// With root sampling 1 a request with no trace context starts a sampled one.
	root := httptest.NewRequest("GET", "http://web.default/", nil)
	tr.Server(root, Attrs{})(0, "", errors.New("upstream reset"))
	if TraceID(root.Header) == "" {
		t.Error("no trace started for a request without one")
	}
	if err := tr.Stop(t.Context()); err != nil {
		t.Fatal(err)
	}
	col.mu.Lock()
	defer col.mu.Unlock()
	if len(col.spans) != 1 || col.spans[0].GetKind() != tracepb.Span_SPAN_KIND_SERVER || col.spans[0].GetStatus().GetCode() != tracepb.Status_STATUS_CODE_ERROR {
		t.Errorf("spans %v: want only the root's failed server span", col.spans)
	}
}

// Off (no endpoint, or no Tracer at all), requests keep their headers untouched.
func TestOffPassesHeadersThrough(t *testing.T) {
	off, err := New(DefaultConfig(), "node1", slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	if err := off.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	for _, tr := range []*Tracer{off, nil} {
		req := httptest.NewRequest("GET", "http://web.default/", nil)
		req.Header.Set("Traceparent", "00-"+incomingTrace+"-"+incomingSpan+"-01")
		req.Header.Set("X-B3-TraceId", "80f198ee56343ba864fe8b2a57d3eff7")
		req.Header.Set("X-B3-SpanId", "e457b5a2e4d86bd1")
		before := req.Header.Clone()
		tr.Client(req, Attrs{})(200, "", nil)
		tr.Server(req, Attrs{})(200, "", nil)
		if len(req.Header) != len(before) {
			t.Errorf("headers changed: %v, were %v", req.Header, before)
		}
		for k := range before {
			if req.Header.Get(k) != before.Get(k) {
				t.Errorf("%s: %q, was %q", k, req.Header.Get(k), before.Get(k))
			}
		}
		if tr.Enabled() {
			t.Error("enabled without an endpoint")
		}
		if err := tr.Stop(t.Context()); err != nil {
			t.Fatal(err)
		}
	}
}

func TestTraceID(t *testing.T) {
	for _, tc := range []struct {
		h    map[string]string
		want string
	}{
		{map[string]string{"Traceparent": "00-" + incomingTrace + "-" + incomingSpan + "-01"}, incomingTrace},
		{map[string]string{"b3": "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"}, "80f198ee56343ba864fe8b2a57d3eff7"},
		{map[string]string{"X-B3-TraceId": "463AC35C9F6413AD", "X-B3-SpanId": "a2fb4a1d1a96d312"}, "463ac35c9f6413ad"},
		{map[string]string{"Traceparent": "garbage"}, ""},
		{map[string]string{"X-B3-TraceId": "0000000000000000"}, ""},
		{map[string]string{"b3": "0"}, ""}, // "don't sample", no ids
		{nil, ""},
	} {
		h := http.Header{}
		for k, v := range tc.h {
			h.Set(k, v)
		}
		if got := TraceID(h); got != tc.want {
			t.Errorf("%v: %q, want %q", tc.h, got, tc.want)
		}
	}
}

func TestConfigChecked(t *testing.T) {
	for _, cfg := range []Config{{OTLPEndpoint: "collector"}, {OTLPEndpoint: "collector:4317", RootSampling: 2}} {
		if _, err := New(cfg, "n", slog.New(slog.DiscardHandler)); err == nil {
			t.Errorf("%+v accepted", cfg)
		}
	}
}
