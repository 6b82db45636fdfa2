package agent

import (
	"net/netip"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/agent/proxy"
	"github.com/ferrymesh/ferry/api/ferryv1"
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
