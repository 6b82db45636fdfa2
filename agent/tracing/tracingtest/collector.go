// Package tracingtest is an OTLP/gRPC trace collector for tests: the unit tests of
// the tracer and the end-to-end tests through the lab's agents receive spans with it.
package tracingtest

import (
	"context"
	"net"

	collectortrace "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/grpc"
)

// Serve receives OTLP trace exports on ln until the returned server stops, calling
// onSpan (from the server's goroutines, one export at a time) with each span and
// the service.name of its resource.
func Serve(ln net.Listener, onSpan func(service string, s *tracepb.Span)) *grpc.Server {
	srv := grpc.NewServer()
	collectortrace.RegisterTraceServiceServer(srv, &collector{onSpan: onSpan})
	go srv.Serve(ln)
	return srv
}

type collector struct {
	collectortrace.UnimplementedTraceServiceServer
	onSpan func(string, *tracepb.Span)
}

func (c *collector) Export(_ context.Context, req *collectortrace.ExportTraceServiceRequest) (*collectortrace.ExportTraceServiceResponse, error) {
	for _, rs := range req.GetResourceSpans() {
		name := ""
		for _, kv := range rs.GetResource().GetAttributes() {
			if kv.GetKey() == "service.name" {
				name = kv.GetValue().GetStringValue()
			}
		}
		for _, ss := range rs.GetScopeSpans() {
			for _, s := range ss.GetSpans() {
				c.onSpan(name, s)
			}
		}
	}
	return &collectortrace.ExportTraceServiceResponse{}, nil
}
