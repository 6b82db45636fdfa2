package agent

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/agent/proxy"
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
	o := &observability{}
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
	o := &observability{node: "node1"}
	start := time.Now()
	c := proxy.Conn{
		Direction: proxy.Outbound, Security: proxy.MTLS, SrcPod: "default/a", DstPod: "default/c", DstNode: "node2",
		Src: netip.MustParseAddrPort("10.1.1.10:40000"), Dst: netip.MustParseAddrPort("10.1.2.10:8080"),
		SrcIdentity: "spiffe://cluster.local/ns/default/sa/a", DstIdentity: "spiffe://cluster.local/ns/default/sa/c",
		Start: start, End: start.Add(time.Second), BytesSent: 10, BytesRecv: 20,
	}
	f := o.flow(c)
	if f.GetVerdict() != ferryv1.Verdict_VERDICT_FORWARDED || f.GetSource().GetPod() != "a" || f.GetDestination().GetNamespace() != "default" ||
		f.GetDestination().GetNode() != "node2" || f.GetBytesSent() != 10 || f.GetDuration().AsDuration() != time.Second {
		t.Errorf("flow %v", f)
	}
	c.Error, c.BytesSent, c.BytesRecv = "dial: connection refused", 0, 0
	if v := o.flow(c).GetVerdict(); v != ferryv1.Verdict_VERDICT_ERROR {
		t.Errorf("refused: %v", v)
	}
	c.Error = "refused by destination: status 403: not this pod"
	if v := o.flow(c).GetVerdict(); v != ferryv1.Verdict_VERDICT_DROPPED {
		t.Errorf("403: %v", v)
	}
	l := connLabels(c, service{metric: "web.default.svc.cluster.local"})
	if l.Reporter != "source" || l.ConnectionSecurityPolicy != "mutual_tls" || l.DestinationService != "web.default.svc.cluster.local" ||
		l.SourceWorkload != "a" || l.DestinationWorkloadNamespace != "default" {
		t.Errorf("labels %+v", l)
	}
}

// The agent's observer serves what the proxy reports: flows on the Observer socket
// beside the admin socket, metrics on --metrics-addr.
func TestObservabilityServes(t *testing.T) {
	dir := t.TempDir()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	metricsAddr := ln.Addr().String()
	ln.Close()
	cfg := Config{Node: "node1", AdminSocket: filepath.Join(dir, "agent.sock"), Observe: ObserveConfig{MetricsAddr: metricsAddr, FlowCapacity: 8}}
	o := newObservability(cfg, &Agent{}, slog.New(slog.DiscardHandler))
	if err := o.Start(); err != nil {
		t.Fatal(err)
	}
	defer o.Stop()
	start := time.Now()
	c := proxy.Conn{Direction: proxy.Inbound, Security: proxy.Plaintext, DstPod: "default/b", DstIdentity: "spiffe://cluster.local/ns/default/sa/b",
		Src: netip.MustParseAddrPort("10.1.1.12:5000"), Dst: netip.MustParseAddrPort("10.1.1.11:8080"), Start: start, End: start, BytesSent: 7, BytesRecv: 9}
	o.ConnOpened(c)
	o.ConnClosed(c)

	conn, err := grpc.NewClient("unix://"+filepath.Join(dir, "observer.sock"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
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

	resp, err := http.Get("http://" + metricsAddr + "/metrics")
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

// BenchmarkConnObserved is what the agent adds to every proxied connection: metrics
// on open, and on close the metrics, a flow record and the ring.
func BenchmarkConnObserved(b *testing.B) {
	o := newObservability(Config{Node: "node1"}, &Agent{}, slog.New(slog.DiscardHandler))
	start := time.Now()
	c := proxy.Conn{Direction: proxy.Outbound, Security: proxy.MTLS, SrcPod: "default/a", DstPod: "default/c",
		SrcIdentity: "spiffe://cluster.local/ns/default/sa/a", DstIdentity: "spiffe://cluster.local/ns/default/sa/c",
		Src: netip.MustParseAddrPort("10.1.1.10:40000"), Dst: netip.MustParseAddrPort("10.1.2.10:8080"), Start: start, End: start}
	b.ReportAllocs()
	for b.Loop() {
		o.ConnOpened(c)
		o.ConnClosed(c)
	}
}
