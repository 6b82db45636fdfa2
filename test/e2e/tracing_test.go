package e2e

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/agent/tracing/tracingtest"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
)

// collectorEnv makes the test binary an OTLP trace collector on the address it
// names, printing each span it receives as a JSON line (runCollector).
const collectorEnv = "FERRY_E2E_OTLP_COLLECTOR"

const (
	collectorPort = 4317
	echoHTTPPort  = 8093 // ferry's HTTP echo server: /headers, /status/CODE
)

var echoHTTPCVIP = netip.MustParseAddr("10.96.0.54")

// span is what the test reads of a received span.
type span struct {
	Service, Name, Kind       string
	TraceID, SpanID, ParentID string
}

func runCollector(addr string) int {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	out := json.NewEncoder(os.Stdout)
	tracingtest.Serve(ln, func(service string, s *tracepb.Span) {
		out.Encode(span{Service: service, Name: s.GetName(), Kind: s.GetKind().String(),
			TraceID: hex.EncodeToString(s.GetTraceId()), SpanID: hex.EncodeToString(s.GetSpanId()),
			ParentID: hex.EncodeToString(s.GetParentSpanId())})
	})
	select {} // until the test kills it
}

// lockedBuffer is a collector's stdout, read while it writes.
type lockedBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *lockedBuffer) spans() []span {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []span
	for _, line := range strings.Split(b.b.String(), "\n") {
		var s span
		if json.Unmarshal([]byte(line), &s) == nil {
			out = append(out, s)
		}
	}
	return out
}

// A request from a to a Service whose endpoint is on the other node, carrying a
// traceparent: the app receives the same trace id, and an OTLP collector receives
// node1's client span (child of the client's span) and node2's server span (child
// of the client span), the app's parent being the server span.
func TestTraceThroughBothProxies(t *testing.T) {
	e := setup(t)
	// The collector runs in d, outside the mesh; both agents reach it from their
	// nodes' namespaces.
	collector := netip.AddrPortFrom(e.pod("d").IP, collectorPort).String()
	out := &lockedBuffer{}
	cmd := e.lab.Command(context.Background(), "d", e.self, "-test.run=^$")
	// It listens on every address: the lab probes a server over the pod's loopback.
	cmd.Env = append(cmd.Env, collectorEnv+"="+fmt.Sprintf(":%d", collectorPort))
	cmd.Stdout = out
	p, err := e.lab.StartInPod(t.Context(), "d", collectorPort, cmd)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Stop()
	args := []string{"--otlp-endpoint", collector}
	for _, node := range []string{"node1", "node2"} {
		e.restartAgent(t, node, args...)
		defer e.restartAgent(t, node)
	}

	const traceID, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
	got, err := e.lab.Command(t.Context(), "a", "curl", "-sS", "--max-time", "10",
		"-H", "traceparent: 00-"+traceID+"-"+parent+"-01", "http://"+echoHTTPCVIP.String()+"/headers").CombinedOutput()
	if err != nil {
		t.Fatalf("curl: %v\n%s", err, got)
	}
	var headers map[string][]string
	if err := json.Unmarshal(got, &headers); err != nil {
		t.Fatalf("app answered %q: %v", got, err)
	}
	tp := strings.Split(strings.Join(headers["Traceparent"], ""), "-")
	if len(tp) != 4 || tp[1] != traceID {
		t.Fatalf("the app received traceparent %v, want trace %s", headers["Traceparent"], traceID)
	}

	var client, server span
	deadline := time.Now().Add(20 * time.Second) // the exporters batch for a second
	for time.Now().Before(deadline) && (client.SpanID == "" || server.SpanID == "") {
		for _, s := range out.spans() {
			switch {
			case s.TraceID != traceID:
			case s.Kind == "SPAN_KIND_CLIENT":
				client = s
			case s.Kind == "SPAN_KIND_SERVER":
				server = s
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	if client.ParentID != parent {
		t.Errorf("client span %+v: want the parent %s the request came with", client, parent)
	}
	if server.ParentID == "" || server.ParentID != client.SpanID {
		t.Errorf("server span %+v: want the client span %s as parent", server, client.SpanID)
	}
	if tp[2] != server.SpanID {
		t.Errorf("the app's parent span is %s, want the server span %s", tp[2], server.SpanID)
	}
}
