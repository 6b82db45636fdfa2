package flows

import (
	"context"
	"runtime"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/api/ferryv1"
	"github.com/ferrymesh/ferry/internal/listener"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"
)

var t0 = time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)

// flow is a forwarded flow from pod src to pod dst (both "namespace/name") on port.
func flow(src, dst string, port uint32, at time.Duration) *ferryv1.Flow {
	ep := func(p string) *ferryv1.Endpoint {
		ns, name := "default", p
		for i := range p {
			if p[i] == '/' {
				ns, name = p[:i], p[i+1:]
			}
		}
		return &ferryv1.Endpoint{Pod: name, Namespace: ns, Identity: "spiffe://cluster.local/ns/" + ns + "/sa/" + name}
	}
	d := ep(dst)
	d.Port = port
	return &ferryv1.Flow{
		Time: timestamppb.New(t0.Add(at)), Node: "node1", Source: ep(src), Destination: d,
		Verdict: ferryv1.Verdict_VERDICT_FORWARDED, Protocol: "tcp", Security: "mtls",
	}
}

func names(fs []*ferryv1.Flow) []string {
	var out []string
	for _, f := range fs {
		out = append(out, f.GetSource().GetPod()+">"+f.GetDestination().GetPod())
	}
	return out
}

func TestRingKeepsTheNewest(t *testing.T) {
	r := NewRing(3)
	for i, p := range []string{"a", "b", "c", "d", "e"} {
		r.Add(flow(p, "x", 80, time.Duration(i)*time.Second))
	}
	got := names(r.Flows(Query{}))
	want := []string{"c>x", "d>x", "e>x"}
	if len(got) != 3 || got[0] != want[0] || got[2] != want[2] {
		t.Fatalf("ring holds %v, want %v", got, want)
	}
	if st := r.Status(); st.Flows != 3 || st.Capacity != 3 || st.Seen != 5 {
		t.Fatalf("status %+v", st)
	}
	if got := names(r.Flows(Query{Number: 2})); len(got) != 2 || got[0] != "d>x" {
		t.Fatalf("last 2: %v", got)
	}
	if got := names(r.Flows(Query{Since: t0.Add(4 * time.Second)})); len(got) != 1 || got[0] != "e>x" {
		t.Fatalf("since 4s: %v", got)
	}
}

func TestEveryFilter(t *testing.T) {
	a2b := flow("a", "b", 8080, 0)
	c2shop := flow("c", "shop/web", 443, 0)
	c2shop.Node = "node2"
	failed := flow("a", "d", 9, 0)
	failed.Verdict = ferryv1.Verdict_VERDICT_ERROR
	httpFlow := flow("b", "a", 80, 0)
	httpFlow.Protocol, httpFlow.Http = "http", &ferryv1.HTTP{Status: 503, Method: "GET", Path: "/api/items?x=1", Route: "HTTPRoute default/canary"}
	notFound := flow("d", "a", 80, 0)
	notFound.Protocol, notFound.Http = "http", &ferryv1.HTTP{Status: 404, Method: "POST", Path: "/login"}
	call := flow("e", "a", 9000, 0)
	call.Protocol, call.Http = "grpc", &ferryv1.HTTP{Status: 200, Method: "POST", Path: "/shop.Cart/Add", GrpcStatus: "14", Route: "GRPCRoute shop/cart"}
	all := []*ferryv1.Flow{a2b, c2shop, failed, httpFlow, notFound, call}
	for _, tc := range []struct {
		name string
		f    *ferryv1.FlowFilter
		want []string
	}{
		{"none", nil, []string{"a>b", "c>web", "a>d", "b>a", "d>a", "e>a"}},
		{"from pod", &ferryv1.FlowFilter{FromPod: []string{"a"}}, []string{"a>b", "a>d"}},
		{"from pod with namespace", &ferryv1.FlowFilter{FromPod: []string{"default/c"}}, []string{"c>web"}},
		{"to pod", &ferryv1.FlowFilter{ToPod: []string{"shop/web", "b"}}, []string{"a>b", "c>web"}},
		{"namespace either side", &ferryv1.FlowFilter{Namespace: []string{"shop"}}, []string{"c>web"}},
		{"from identity", &ferryv1.FlowFilter{FromIdentity: []string{"spiffe://cluster.local/ns/default/sa/b"}}, []string{"b>a"}},
		{"to identity short", &ferryv1.FlowFilter{ToIdentity: []string{"shop/web"}}, []string{"c>web"}},
		{"to identity path", &ferryv1.FlowFilter{ToIdentity: []string{"ns/default/sa/b"}}, []string{"a>b"}},
		{"verdict", &ferryv1.FlowFilter{Verdict: []string{"error"}}, []string{"a>d"}},
		{"protocol", &ferryv1.FlowFilter{Protocol: []string{"http"}}, []string{"b>a", "d>a"}},
		{"protocol grpc", &ferryv1.FlowFilter{Protocol: []string{"GRPC"}}, []string{"e>a"}},
		{"port", &ferryv1.FlowFilter{Port: []uint32{443, 9}}, []string{"c>web", "a>d"}},
		{"http status", &ferryv1.FlowFilter{HttpStatus: []uint32{503}}, []string{"b>a"}},
		{"http status range", &ferryv1.FlowFilter{HttpStatusRange: []*ferryv1.StatusRange{{Min: 500, Max: 599}}}, []string{"b>a"}},
		{"http status ranges", &ferryv1.FlowFilter{HttpStatusRange: []*ferryv1.StatusRange{{Min: 400, Max: 499}, {Min: 200, Max: 200}}}, []string{"d>a", "e>a"}},
		{"status range leaves tcp out", &ferryv1.FlowFilter{HttpStatusRange: []*ferryv1.StatusRange{{Min: 0, Max: 999}}}, []string{"b>a", "d>a", "e>a"}},
		{"http method", &ferryv1.FlowFilter{HttpMethod: []string{"post"}}, []string{"d>a", "e>a"}},
		{"http path prefix", &ferryv1.FlowFilter{HttpPathPrefix: []string{"/api/", "/shop."}}, []string{"b>a", "e>a"}},
		{"grpc status", &ferryv1.FlowFilter{GrpcStatus: []string{"14"}}, []string{"e>a"}},
		{"protocol and status", &ferryv1.FlowFilter{Protocol: []string{"http"}, HttpStatusRange: []*ferryv1.StatusRange{{Min: 500, Max: 599}}}, []string{"b>a"}},
		{"node", &ferryv1.FlowFilter{Node: []string{"node2"}}, []string{"c>web"}},
		{"route", &ferryv1.FlowFilter{Route: []string{"HTTPRoute default/canary"}}, []string{"b>a"}},
		{"route kind any case", &ferryv1.FlowFilter{Route: []string{"grpcroute shop/cart"}}, []string{"e>a"}},
		{"route by name", &ferryv1.FlowFilter{Route: []string{"shop/cart", "default/canary"}}, []string{"b>a", "e>a"}},
		{"route of another kind", &ferryv1.FlowFilter{Route: []string{"GRPCRoute default/canary"}}, nil},
		{"fields and", &ferryv1.FlowFilter{FromPod: []string{"a"}, Verdict: []string{"forwarded"}}, []string{"a>b"}},
	} {
		got := names(Select(all, Query{Filter: tc.f}))
		if len(got) != len(tc.want) {
			t.Errorf("%s: got %v, want %v", tc.name, got, tc.want)
			continue
		}
		for i := range got {
			if got[i] != tc.want[i] {
				t.Errorf("%s: got %v, want %v", tc.name, got, tc.want)
				break
			}
		}
	}
	for _, bad := range []*ferryv1.FlowFilter{
		{Verdict: []string{"denied"}},
		{Protocol: []string{"udp"}},
		{HttpStatusRange: []*ferryv1.StatusRange{{Min: 599, Max: 500}}},
		{GrpcStatus: []string{"UNAVAILABLE"}},
	} {
		if err := CheckFilter(bad); err == nil {
			t.Errorf("filter %v accepted", bad)
		}
	}
}

func TestParseStatusRange(t *testing.T) {
	for in, want := range map[string][2]uint32{"404": {404, 404}, "500-599": {500, 599}, "5xx": {500, 599}, "2XX": {200, 299}, "200-204": {200, 204}} {
		r, err := ParseStatusRange(in)
		if err != nil || r.GetMin() != want[0] || r.GetMax() != want[1] {
			t.Errorf("%q: %v %v, want %v", in, r, err, want)
		}
	}
	for _, in := range []string{"", "abc", "599-500", "5x", "1000", "-1", "0xx"} {
		if r, err := ParseStatusRange(in); err == nil {
			t.Errorf("%q accepted as %v", in, r)
		}
	}
}

// TestServerFollow checks over real gRPC that a follower gets the stored flows, then
// new ones, exactly once each.
func TestServerFollow(t *testing.T) {
	r := NewRing(16)
	r.Add(flow("a", "b", 80, 0))
	r.Add(flow("c", "b", 80, time.Second))
	srv := grpc.NewServer()
	NewServer(r, "node1").Register(srv)
	lc := listener.Config()
	ln, err := lc.Listen(context.Background(), "unix", t.TempDir()+"/obs.sock")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	defer srv.Stop()
	conn, err := grpc.NewClient("unix://"+ln.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream, err := ferryv1.NewObserverClient(conn).GetFlows(ctx, &ferryv1.GetFlowsRequest{
		Follow: true, Filter: &ferryv1.FlowFilter{ToPod: []string{"b"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	recv := func() {
		m, err := stream.Recv()
		if err != nil {
			t.Fatalf("after %v: %v", got, err)
		}
		got = append(got, m.GetFlow().GetSource().GetPod())
	}
	recv()
	recv()
	r.Add(flow("x", "y", 80, 2*time.Second)) // filtered out
	r.Add(flow("d", "b", 80, 3*time.Second))
	recv()
	if len(got) != 3 || got[0] != "a" || got[1] != "c" || got[2] != "d" {
		t.Fatalf("follower got %v, want [a c d]", got)
	}
	st, err := ferryv1.NewObserverClient(conn).ServerStatus(ctx, &ferryv1.ServerStatusRequest{})
	if err != nil || st.GetSeenFlows() != 4 || st.GetNodes()[0] != "node1" {
		t.Fatalf("status %v, %v", st, err)
	}
	bad, err := ferryv1.NewObserverClient(conn).GetFlows(ctx, &ferryv1.GetFlowsRequest{Filter: &ferryv1.FlowFilter{Verdict: []string{"nope"}}})
	if err == nil {
		_, err = bad.Recv()
	}
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("verdict nope: %v, want InvalidArgument", err)
	}
}

// TestRingMemoryBounded adds 100,000 flows to a ring of the default size and reports
// the heap it holds: the ring's memory depends on its capacity, not on traffic.
func TestRingMemoryBounded(t *testing.T) {
	heap := func() uint64 {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc
	}
	before := heap()
	r := NewRing(DefaultCapacity)
	add := func(n int) {
		for i := range n {
			f := flow("a", "b", 8080, time.Duration(i))
			f.Reason = "connection reset by peer"
			r.Add(f)
		}
	}
	add(DefaultCapacity)
	full := heap()
	add(100_000)
	after := heap()
	t.Logf("flow ring, %d flows: %d KiB when full, %d KiB after 100,000 more (%d bytes a flow)",
		DefaultCapacity, (full-before)/1024, (after-before)/1024, (after-before)/DefaultCapacity)
	if after > full+full/2 {
		t.Errorf("heap grew from %d to %d bytes over 100,000 flows: the ring is not bounded", full-before, after-before)
	}
	runtime.KeepAlive(r)
}

// BenchmarkRingAdd is the ring's cost per recorded connection, with one follower.
func BenchmarkRingAdd(b *testing.B) {
	r := NewRing(DefaultCapacity)
	sub := r.Subscribe()
	defer sub.Close()
	go func() {
		for range sub.C() {
		}
	}()
	f := flow("a", "b", 8080, 0)
	b.ReportAllocs()
	for b.Loop() {
		r.Add(f)
	}
}
