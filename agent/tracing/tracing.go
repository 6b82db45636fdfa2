// Package tracing is the agent's trace export: the node proxies start a client span
// for every request they send on (source node) and a server span for every request
// they deliver (destination node), parented by the request's W3C trace context, and
// export them over OTLP/gRPC with the OpenTelemetry Go SDK. Without an endpoint the
// Tracer is off and requests keep their trace headers exactly as the app sent them.
package tracing

import (
	"context"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
)

// Config configures trace export.
type Config struct {
	// OTLPEndpoint is the host:port of an OTLP/gRPC collector (plaintext); "" turns
	// tracing off.
	OTLPEndpoint string
	// ServiceName is every span's service.name.
	ServiceName string
	// RootSampling is the share of requests that arrive with no trace context that
	// start a sampled trace (0 to 1). A request with a parent follows the parent's
	// sampled flag whatever this says.
	RootSampling float64
	// BatchTimeout is the longest a finished span waits before it is sent.
	BatchTimeout time.Duration
}

// DefaultConfig is tracing off; with an endpoint, 1% of new traces sampled (Istio's
// default) and spans sent within a second.
func DefaultConfig() Config {
	return Config{ServiceName: "ferry-agent", RootSampling: 0.01, BatchTimeout: time.Second}
}

// Flags registers the configuration's flags, with its defaults, on fs.
func (c *Config) Flags(fs *pflag.FlagSet) {
	d := DefaultConfig()
	fs.StringVar(&c.OTLPEndpoint, "otlp-endpoint", d.OTLPEndpoint, "OTLP/gRPC collector (host:port, plaintext) receiving the proxies' client and server spans (\"\" disables tracing)")
	fs.Float64Var(&c.RootSampling, "trace-sampling", d.RootSampling, "share of requests without trace context that start a sampled trace (0 to 1; requests with a parent follow its sampled flag)")
}

// Attrs describe the hop a span is for.
type Attrs struct {
	SourceWorkload, SourceNamespace           string
	DestinationWorkload, DestinationNamespace string
	// Service is the destination Service (name.namespace.svc.cluster.local), when
	// the client dialled one.
	Service string
	// Node is the node whose proxy carries the hop; "" is the tracer's own.
	Node string
	// Upstream is the address the proxy sends the request to (endpoint ip:port).
	Upstream string
}

// Tracer starts the proxies' spans. A nil Tracer, or one without an endpoint, is
// off: its methods do nothing and leave headers as they are.
type Tracer struct {
	cfg      Config
	node     string
	log      *slog.Logger
	provider *sdktrace.TracerProvider
	tracer   trace.Tracer
	prop     propagation.TextMapPropagator
}

// New validates cfg for node; nothing is dialled until Start.
func New(cfg Config, node string, log *slog.Logger) (*Tracer, error) {
	d := DefaultConfig()
	if cfg.ServiceName == "" {
		cfg.ServiceName = d.ServiceName
	}
	if cfg.BatchTimeout <= 0 {
		cfg.BatchTimeout = d.BatchTimeout
	}
	if cfg.RootSampling < 0 || cfg.RootSampling > 1 {
		return nil, fmt.Errorf("tracing config: sampling %v: want 0 to 1", cfg.RootSampling)
	}
	if cfg.OTLPEndpoint != "" {
		if _, port, err := net.SplitHostPort(cfg.OTLPEndpoint); err != nil || port == "" {
			return nil, fmt.Errorf("tracing config: otlp endpoint %q: want host:port", cfg.OTLPEndpoint)
		}
	}
	return &Tracer{cfg: cfg, node: node, log: log, prop: propagation.TraceContext{}}, nil
}

// Enabled says whether spans are exported.
func (t *Tracer) Enabled() bool { return t != nil && t.tracer != nil }

// Start sets up the exporter; the collector is dialled when the first spans go out,
// so a collector that is down costs spans, never requests.
func (t *Tracer) Start(ctx context.Context) error {
	if t == nil || t.cfg.OTLPEndpoint == "" {
		return nil
	}
	exp, err := otlptracegrpc.New(ctx, otlptracegrpc.WithEndpoint(t.cfg.OTLPEndpoint), otlptracegrpc.WithInsecure())
	if err != nil {
		return fmt.Errorf("otlp exporter: %w", err)
	}
	res := resource.NewSchemaless(
		attribute.String("service.name", t.cfg.ServiceName),
		attribute.String("k8s.node.name", t.node),
	)
	t.provider = sdktrace.NewTracerProvider(
		sdktrace.WithBatcher(exp, sdktrace.WithBatchTimeout(t.cfg.BatchTimeout)),
		sdktrace.WithResource(res),
		sdktrace.WithSampler(sdktrace.ParentBased(sdktrace.TraceIDRatioBased(t.cfg.RootSampling))),
	)
	t.tracer = t.provider.Tracer("github.com/ferrymesh/ferry/agent/tracing")
	t.log.Info("exporting traces", "endpoint", t.cfg.OTLPEndpoint, "root_sampling", t.cfg.RootSampling)
	return nil
}

// Stop sends the spans still queued, until ctx ends.
func (t *Tracer) Stop(ctx context.Context) error {
	if t == nil || t.provider == nil {
		return nil
	}
	if err := t.provider.Shutdown(ctx); err != nil {
		return fmt.Errorf("trace export: %w", err)
	}
	return nil
}

// endFunc records how a request came out and ends its span: the response status (0
// when none came), the gRPC status of a call ("" for plain HTTP), and the error
// that failed it, if any.
type endFunc = func(status int, grpcStatus string, err error)

func noEnd(int, string, error) {}

// Client starts the source proxy's client span for r (parent: r's trace headers),
// and sets r's outgoing trace headers to the new span; end records the outcome.
func (t *Tracer) Client(r *http.Request, attrs Attrs) (end func(status int, grpcStatus string, err error)) {
	return t.start(r, attrs, trace.SpanKindClient)
}

// Server starts the destination proxy's server span for r (parent: r's headers) and
// sets r's outgoing headers to it, for the hop to the app.
func (t *Tracer) Server(r *http.Request, attrs Attrs) (end func(status int, grpcStatus string, err error)) {
	return t.start(r, attrs, trace.SpanKindServer)
}

func (t *Tracer) start(r *http.Request, a Attrs, kind trace.SpanKind) endFunc {
	if !t.Enabled() {
		return noEnd
	}
	carrier := propagation.HeaderCarrier(r.Header)
	ctx := t.prop.Extract(r.Context(), carrier)
	target := a.Service
	if target == "" {
		target = r.Host
	}
	node := a.Node
	if node == "" {
		node = t.node
	}
	attrs := []attribute.KeyValue{
		attribute.String("http.request.method", r.Method),
		attribute.String("url.path", r.URL.Path),
		attribute.String("server.address", r.Host),
		attribute.String("network.protocol.version", strings.TrimPrefix(r.Proto, "HTTP/")),
		attribute.String("ferry.node", node),
	}
	for _, kv := range []struct{ k, v string }{
		{"ferry.source.workload", a.SourceWorkload}, {"ferry.source.namespace", a.SourceNamespace},
		{"ferry.destination.workload", a.DestinationWorkload}, {"ferry.destination.namespace", a.DestinationNamespace},
		{"ferry.service", a.Service}, {"ferry.upstream.address", a.Upstream},
	} {
		if kv.v != "" {
			attrs = append(attrs, attribute.String(kv.k, kv.v))
		}
	}
	ctx, span := t.tracer.Start(ctx, r.Method+" "+target, trace.WithSpanKind(kind), trace.WithAttributes(attrs...))
	t.prop.Inject(ctx, carrier)
	return func(status int, grpcStatus string, err error) {
		if status != 0 {
			span.SetAttributes(attribute.Int("http.response.status_code", status))
		}
		if grpcStatus != "" {
			if n, perr := strconv.Atoi(grpcStatus); perr == nil {
				span.SetAttributes(attribute.Int("rpc.grpc.status_code", n))
			}
		}
		switch {
		case err != nil:
			span.RecordError(err)
			span.SetStatus(codes.Error, err.Error())
		case failed(kind, status, grpcStatus):
			span.SetStatus(codes.Error, "")
		}
		span.End()
	}
}

// failed follows OpenTelemetry's HTTP and gRPC conventions: no response, a 5xx, a
// 4xx seen by the client, or a gRPC status other than OK.
func failed(kind trace.SpanKind, status int, grpcStatus string) bool {
	switch {
	case status == 0, status >= 500:
		return true
	case status >= 400 && kind == trace.SpanKindClient:
		return true
	}
	return grpcStatus != "" && grpcStatus != "0"
}

// TraceID is the trace id a request's headers carry, in hex: the W3C traceparent's,
// else B3's (single b3 header or X-B3-TraceId); "" without one. It reads headers
// only, so it works with tracing off too (for flows' trace_id).
func TraceID(h http.Header) string {
	if sc := trace.SpanContextFromContext(propagation.TraceContext{}.Extract(context.Background(), propagation.HeaderCarrier(h))); sc.HasTraceID() {
		return sc.TraceID().String()
	}
	id := h.Get("X-B3-TraceId")
	if b3 := h.Get("b3"); b3 != "" {
		id, _, _ = strings.Cut(b3, "-")
	}
	id = strings.ToLower(id)
	if (len(id) != 16 && len(id) != 32) || strings.Trim(id, "0") == "" {
		return ""
	}
	if _, err := hex.DecodeString(id); err != nil {
		return ""
	}
	return id
}
