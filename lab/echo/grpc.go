package echo

import (
	"context"
	"fmt"
	"io"
	"net"
	"sort"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
)

// PodHeader is the response header in which ModeGRPC names the pod that answered.
const PodHeader = "ferry-lab-pod"

// serveGRPC serves the standard gRPC health service (SERVING) with the pod's name
// in every response's header, so a client sees which endpoint answered each call.
func serveGRPC(ctx context.Context, ln net.Listener, opts Options) error {
	srv := grpc.NewServer(grpc.UnaryInterceptor(func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		_ = grpc.SetHeader(ctx, metadata.Pairs(PodHeader, opts.Pod))
		return h(ctx, req)
	}))
	healthpb.RegisterHealthServer(srv, health.NewServer())
	stop := context.AfterFunc(ctx, srv.GracefulStop)
	defer stop()
	if err := srv.Serve(ln); err != nil {
		return fmt.Errorf("grpc serve: %w", err)
	}
	return nil
}

// GRPCCalls makes n health checks over one gRPC channel to addr and writes how many
// each pod answered.
func GRPCCalls(ctx context.Context, out io.Writer, addr string, n int) error {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return fmt.Errorf("grpc client: %w", err)
	}
	defer conn.Close()
	client := healthpb.NewHealthClient(conn)
	per := map[string]int{}
	for i := range n {
		var md metadata.MD
		resp, err := client.Check(ctx, &healthpb.HealthCheckRequest{}, grpc.Header(&md))
		if err != nil {
			return fmt.Errorf("call %d: %w", i+1, err)
		}
		if resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			return fmt.Errorf("call %d: %v", i+1, resp.GetStatus())
		}
		pod := "?"
		if v := md.Get(PodHeader); len(v) > 0 {
			pod = v[0]
		}
		per[pod]++
	}
	var parts []string
	for pod, k := range per {
		parts = append(parts, fmt.Sprintf("%s %d", pod, k))
	}
	sort.Strings(parts)
	fmt.Fprintf(out, "%d gRPC calls over one channel to %s, answered by: %s\n", n, addr, strings.Join(parts, ", "))
	return nil
}
