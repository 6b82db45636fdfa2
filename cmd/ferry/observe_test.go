package main

import (
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/agent/flows"
	"github.com/ferrymesh/ferry/api/ferryv1"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// serveFlows serves fs over the Observer API on a unix socket, as an agent does,
// and returns the socket's path.
func serveFlows(t *testing.T, fs ...*ferryv1.Flow) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "fy-obs") // a unix socket path must be short
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "observer.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ring := flows.NewRing(len(fs) + 16)
	for _, f := range fs {
		ring.Add(f)
	}
	srv := grpc.NewServer()
	flows.NewServer(ring, "node1").Register(srv)
	go srv.Serve(ln)
	t.Cleanup(srv.Stop)
	return sock
}

// requestFlow is a request flow from a to Service default/web, answered by c.
func requestFlow(at time.Time, protocol, method, path string, status uint32, grpcStatus string, latency time.Duration) *ferryv1.Flow {
	return &ferryv1.Flow{
		Time: timestamppb.New(at), Node: "node1", Direction: "outbound",
		Source:      &ferryv1.Endpoint{Pod: "a", Namespace: "default", Identity: "spiffe://cluster.local/ns/default/sa/a", Ip: "10.1.1.10", Port: 40000},
		Destination: &ferryv1.Endpoint{Pod: "c", Namespace: "default", Identity: "spiffe://cluster.local/ns/default/sa/c", Ip: "10.1.2.10", Port: 8080, Node: "node2"},
		Service:     "default/web", Verdict: ferryv1.Verdict_VERDICT_FORWARDED, Security: "mtls", Protocol: protocol,
		BytesSent: 12, BytesReceived: 345, Duration: durationpb.New(latency),
		Http: &ferryv1.HTTP{Method: method, Authority: "web.default", Path: path, Version: "HTTP/1.1", Status: status, GrpcStatus: grpcStatus},
	}
}

func TestObserveRequestFlows(t *testing.T) {
	now := time.Now()
	tcp := requestFlow(now, "tcp", "", "", 0, "", time.Second)
	tcp.Http = nil
	sock := serveFlows(t,
		tcp,
		requestFlow(now, "http", "GET", "/items/1", 200, "", 1200*time.Microsecond),
		requestFlow(now, "http", "POST", "/api/orders", 503, "", 3*time.Millisecond),
		requestFlow(now, "http", "GET", "/api/items", 500, "", 2*time.Millisecond),
		requestFlow(now, "http", "DELETE", "/items/2", 404, "", time.Millisecond),
		requestFlow(now, "grpc", "POST", "/shop.Cart/Add", 200, "14", 4*time.Millisecond),
	)

	out, err := ferryCLI(t, newObserveCommand, "--agent-socket", sock, "--protocol", "http", "--http-status", "500-599")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 2 {
		t.Fatalf("--protocol http --http-status 500-599 printed %d lines, want the 503 and the 500", len(lines))
	}
	// Hubble's http lines: protocol and version, the request, "=>", status, latency.
	if !regexp.MustCompile(`default/a \(10\.1\.1\.10:40000\) .* -> default/c \(10\.1\.2\.10:8080\) .* mtls FORWARDED http HTTP/1\.1 POST web\.default/api/orders => 503 ↑12B ↓345B 3ms$`).MatchString(lines[0]) {
		t.Errorf("compact request line %q", lines[0])
	}

	for _, tc := range []struct {
		args []string
		want int
	}{
		{[]string{"--http-status", "404,200"}, 3},
		{[]string{"--http-status", "5xx", "--http-method", "get"}, 1},
		{[]string{"--http-path", "/api/"}, 2},
		{[]string{"--protocol", "grpc", "--grpc-status", "14"}, 1},
		{[]string{"--protocol", "tcp"}, 1},
	} {
		out, err := ferryCLI(t, newObserveCommand, append([]string{"--agent-socket", sock, "-o", "json"}, tc.args...)...)
		if err != nil {
			t.Fatal(err)
		}
		if n := strings.Count(out, "\n"); n != tc.want {
			t.Errorf("%v: %d flows, want %d", tc.args, n, tc.want)
		}
	}

	out, err = ferryCLI(t, newObserveCommand, "--agent-socket", sock, "--protocol", "grpc", "-o", "table")
	if err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`(?m)^TIME +NODE +SOURCE +DESTINATION +SECURITY +VERDICT +PROTOCOL +REQUEST +STATUS +ROUTE +SENT +RECEIVED +DURATION +CERT +REASON$`).MatchString(out) ||
		!regexp.MustCompile(`FORWARDED +grpc +POST web\.default/shop\.Cart/Add +200 grpc-status 14 +- +12 +345 +4ms +- +-`).MatchString(out) {
		t.Errorf("table:\n%s", out)
	}

	out, err = ferryCLI(t, newObserveCommand, "--agent-socket", sock, "--http-path", "/shop.", "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"protocol":"grpc"`, `"authority":"web.default"`, `"grpc_status":"14"`, `"version":"HTTP/1.1"`, `"method":"POST"`, `"duration":"0.004s"`, `"service":"default/web"`} {
		if !strings.Contains(out, want) {
			t.Errorf("json lacks %s: %s", want, out)
		}
	}

	for _, bad := range [][]string{{"--http-status", "5x"}, {"--protocol", "udp"}, {"--grpc-status", "UNAVAILABLE"}} {
		if _, err := ferryCLI(t, newObserveCommand, append([]string{"--agent-socket", sock}, bad...)...); err == nil {
			t.Errorf("%v accepted", bad)
		}
	}
}

// Routed requests show their route, rule and retries; a request the mesh answered
// itself shows why, and one fault injection delayed by how long; --route selects a
// route's requests.
func TestObserveRoutes(t *testing.T) {
	now := time.Now()
	canary := requestFlow(now, "http", "GET", "/items/1", 200, "", time.Millisecond)
	canary.Http.Route, canary.Http.RouteRule, canary.Http.Retries = "HTTPRoute default/canary", 1, 2
	aborted := requestFlow(now, "http", "GET", "/items/2", 503, "", time.Millisecond)
	aborted.Http.Route, aborted.Verdict, aborted.Reason = "HTTPRoute default/canary", ferryv1.Verdict_VERDICT_ERROR, "fault"
	aborted.Http.FaultDelay = durationpb.New(100 * time.Millisecond)
	plain := requestFlow(now, "http", "GET", "/items/3", 200, "", time.Millisecond)
	sock := serveFlows(t, canary, aborted, plain)

	out, err := ferryCLI(t, newObserveCommand, "--agent-socket", sock, "--route", "default/canary")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 2 {
		t.Fatalf("--route default/canary printed %d lines, want 2:\n%s", len(lines), out)
	}
	if !strings.Contains(lines[0], "=> 200 via HTTPRoute default/canary rule 1 (2 retries) ") {
		t.Errorf("routed line %q", lines[0])
	}
	if !strings.Contains(lines[1], "ERROR http HTTP/1.1 GET web.default/items/2 => 503 (delayed 100ms) via HTTPRoute default/canary rule 0 ") || !strings.HasSuffix(lines[1], " (fault)") {
		t.Errorf("mesh answer line %q", lines[1])
	}
	out, err = ferryCLI(t, newObserveCommand, "--agent-socket", sock, "--route", "HTTPRoute default/canary", "-o", "table")
	if err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`503 \(delayed 100ms\) +HTTPRoute default/canary rule 0 +12 +345 +1ms +- +fault`).MatchString(out) {
		t.Errorf("table:\n%s", out)
	}
	out, err = ferryCLI(t, newObserveCommand, "--agent-socket", sock, "--route", "default/other", "-o", "json")
	if err != nil || out != "" {
		t.Errorf("--route default/other: %q, %v; want no flows", out, err)
	}
}

// A flow whose pod's certificate was about to expire says how long it had left when
// the flow began, on the compact line and in the table's CERT column; others say
// nothing.
func TestObserveCertExpiring(t *testing.T) {
	now := time.Now()
	expiring := requestFlow(now, "tcp", "", "", 0, "", 2*time.Second)
	expiring.Http = nil
	expiring.CertExpiring, expiring.CertNotAfter = true, timestamppb.New(now.Add(4*time.Second)) // 6s after it began
	fresh := requestFlow(now, "tcp", "", "", 0, "", time.Second)
	fresh.Http, fresh.Source.Pod = nil, "b"
	fresh.CertNotAfter = timestamppb.New(now.Add(time.Hour))
	sock := serveFlows(t, expiring, fresh)

	out, err := ferryCLI(t, newObserveCommand, "--agent-socket", sock)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 2 || !strings.HasSuffix(lines[0], " 2s [cert expires in 6s]") || strings.Contains(lines[1], "cert") {
		t.Errorf("compact lines:\n%s", out)
	}
	out, err = ferryCLI(t, newObserveCommand, "--agent-socket", sock, "-o", "table")
	if err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`default/a .* 2s +cert expires in 6s +-\n`).MatchString(out) || !regexp.MustCompile(`default/b .* 1s +- +-\n`).MatchString(out) {
		t.Errorf("table:\n%s", out)
	}
	out, err = ferryCLI(t, newObserveCommand, "--agent-socket", sock, "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Count(out, `"cert_expiring":true`) != 1 || strings.Count(out, `"cert_not_after":`) != 2 {
		t.Errorf("json:\n%s", out)
	}
}
