package observe

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/api/admin"
	"github.com/ferrymesh/ferry/api/ferryv1"
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
	l := connLabels(c, service{metric: "web.default.svc.cluster.local"})
	if l.Reporter != "source" || l.ConnectionSecurityPolicy != "mutual_tls" || l.DestinationService != "web.default.svc.cluster.local" ||
		l.SourceWorkload != "a" || l.DestinationWorkloadNamespace != "default" {
		t.Errorf("labels %+v", l)
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
