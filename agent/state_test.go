package agent

import (
	"github.com/ferrymesh/ferry/agent/proxy"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/ferrymesh/ferry/api/ferryv1"
)

func TestServicesFromState(t *testing.T) {
	st := &ferryv1.NodeState{Services: []*ferryv1.Service{{
		Name: "web", Namespace: "shop", ClusterIps: []string{"10.96.0.50"},
		Ports:        []*ferryv1.ServicePort{{Name: "http", Port: 80, TargetPort: "http", AppProtocol: "kubernetes.io/h2c"}},
		LoadBalancer: "RoundRobin",
		Backends: []*ferryv1.Backend{
			{Pod: "web-1", Ips: []string{"10.1.1.10"}, Ready: true, Ports: []uint32{8080}},
			{Pod: "web-2", Ips: []string{"10.1.2.10"}, Ready: false, Ports: []uint32{8080}},
		},
	}}}
	svcs, err := services(st)
	if err != nil {
		t.Fatal(err)
	}
	s := svcs[0]
	if s.Name != "shop/web" || !slices.Equal(s.VIPs, []netip.Addr{netip.MustParseAddr("10.96.0.50")}) || !slices.Equal(s.Ports, []proxy.ServicePort{{Port: 80, Name: "http", AppProtocol: "kubernetes.io/h2c"}}) || s.LoadBalancer != proxy.RoundRobin ||
		len(s.Backends) != 2 || !s.Backends[0].Ready || s.Backends[1].Ready || s.Backends[0].Ports[0] != 8080 {
		t.Fatalf("converted %+v", s)
	}
	bad := []struct {
		edit func(*ferryv1.Service)
		says string
	}{
		{func(s *ferryv1.Service) { s.ClusterIps = []string{"ten"} }, `cluster ip "ten"`},
		{func(s *ferryv1.Service) { s.Ports[0].Port = 70000 }, "port 70000 out of range"},
		{func(s *ferryv1.Service) { s.LoadBalancer = "Fastest" }, `load balancer "Fastest"`},
		{func(s *ferryv1.Service) { s.Backends[0].Ports = nil }, "0 ports for the service's 1"},
		{func(s *ferryv1.Service) { s.Backends[1].Ips = []string{"x"} }, `backends[1]: ip "x"`},
	}
	for _, b := range bad {
		c := &ferryv1.NodeState{Services: []*ferryv1.Service{{
			Name: "web", Namespace: "shop", ClusterIps: []string{"10.96.0.50"},
			Ports:    []*ferryv1.ServicePort{{Port: 80}},
			Backends: []*ferryv1.Backend{{Ips: []string{"10.1.1.10"}, Ports: []uint32{8080}}, {Ips: []string{"10.1.1.11"}, Ports: []uint32{8080}}},
		}}}
		b.edit(c.Services[0])
		if _, err := services(c); err == nil || !strings.Contains(err.Error(), b.says) || !strings.Contains(err.Error(), "services[0] (shop/web)") {
			t.Errorf("error %v, want one naming services[0] (shop/web) and %q", err, b.says)
		}
	}
}
