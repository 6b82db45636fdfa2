package agent

import (
	"math"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/agent/proxy"

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

// A Service's TrafficPolicy converts field by field, and a policy the proxy could
// not enforce as written rejects the state, naming the field.
func TestServicePolicyFromState(t *testing.T) {
	good := func() *ferryv1.ServicePolicy {
		return &ferryv1.ServicePolicy{
			Name: "shop/web", HashHeader: "x-user", MaxConnections: 10, MaxPendingRequests: 5, MaxRequests: 20, MaxRequestsPerConnection: 100,
			OutlierDetection: &ferryv1.OutlierDetection{Consecutive_5Xx: 3, IntervalMs: 1000, BaseEjectionMs: 2000, MaxEjectionPercent: 50},
			Fault:            &ferryv1.Fault{AbortPercent: 10, AbortStatus: 503, DelayPercent: 50, DelayMs: 100},
			RetryBudget:      &ferryv1.RetryBudget{Percent: 20, MinRetriesPerSecond: 10, TtlMs: 10000},
			RateLimit:        &ferryv1.RateLimit{RequestsPerSecond: 100, Burst: 10},
			ConnectTimeoutMs: 250, RequestTimeoutMs: 1500,
			Retry: &ferryv1.RouteRetry{Attempts: 2, Codes: []uint32{503}, BackoffMs: 10},
		}
	}
	st := &ferryv1.NodeState{Services: []*ferryv1.Service{{
		Name: "web", Namespace: "shop", ClusterIps: []string{"10.96.0.50"}, Ports: []*ferryv1.ServicePort{{Port: 80}},
		LoadBalancer: "RingHash", Policy: good(),
	}}}
	svcs, err := services(st)
	if err != nil {
		t.Fatal(err)
	}
	p := svcs[0].Policy
	if svcs[0].LoadBalancer != proxy.RingHash || p.Name != "shop/web" || p.HashHeader != "X-User" || p.MaxConnections != 10 || p.MaxPendingRequests != 5 ||
		p.MaxRequests != 20 || p.MaxRequestsPerConnection != 100 || p.ConnectTimeout != 250*time.Millisecond || p.RequestTimeout != 1500*time.Millisecond ||
		*p.Outlier != (proxy.OutlierDetection{Consecutive5xx: 3, Interval: time.Second, BaseEjection: 2 * time.Second, MaxEjectionPercent: 50}) ||
		*p.Fault != (proxy.Fault{AbortPercent: 10, AbortStatus: 503, DelayPercent: 50, Delay: 100 * time.Millisecond}) ||
		*p.RetryBudget != (proxy.RetryBudget{Percent: 20, MinPerSecond: 10, TTL: 10 * time.Second}) ||
		*p.RateLimit != (proxy.RateLimit{PerSecond: 100, Burst: 10}) ||
		p.Retry.Attempts != 2 || !slices.Equal(p.Retry.Codes, []int{503}) || p.Retry.Backoff != 10*time.Millisecond {
		t.Fatalf("converted %+v", p)
	}
	bad := []struct {
		edit func(*ferryv1.ServicePolicy)
		says string
	}{
		{func(p *ferryv1.ServicePolicy) { p.Name = "" }, "name is required"},
		{func(p *ferryv1.ServicePolicy) { p.HashHeader = "x user" }, `hash_header "x user"`},
		{func(p *ferryv1.ServicePolicy) { p.ConnectTimeoutMs = 100_000_000 }, "connect_timeout_ms 100000000 is over"},
		{func(p *ferryv1.ServicePolicy) { p.OutlierDetection.Consecutive_5Xx = 0 }, "outlier_detection: consecutive_5xx or consecutive_gateway_errors is required"},
		{func(p *ferryv1.ServicePolicy) { p.OutlierDetection.MaxEjectionPercent = 101 }, "outlier_detection.max_ejection_percent 101"},
		{func(p *ferryv1.ServicePolicy) { p.Fault.AbortPercent = 101 }, "fault.abort_percent 101"},
		{func(p *ferryv1.ServicePolicy) { p.Fault.DelayPercent = math.NaN() }, "fault.delay_percent NaN"},
		{func(p *ferryv1.ServicePolicy) { p.Fault.AbortStatus = 99 }, "fault.abort_status 99"},
		{func(p *ferryv1.ServicePolicy) { p.Fault.DelayMs = 0 }, "fault.delay_ms is required"},
		{func(p *ferryv1.ServicePolicy) { p.RetryBudget.Percent = -1 }, "retry_budget.percent -1"},
		{func(p *ferryv1.ServicePolicy) { p.RateLimit.RequestsPerSecond = 0 }, "rate_limit.requests_per_second is required"},
		{func(p *ferryv1.ServicePolicy) { p.Retry.Attempts = 11 }, "retry.attempts 11 is over 10"},
		{func(p *ferryv1.ServicePolicy) { p.Retry.Codes = []uint32{503, 200} }, "retry.codes[1]: 200"},
	}
	for _, b := range bad {
		pol := good()
		b.edit(pol)
		st.Services[0].Policy = pol
		_, err := services(st)
		if err == nil || !strings.Contains(err.Error(), b.says) || !strings.Contains(err.Error(), "services[0] (shop/web): policy") {
			t.Errorf("error %v, want one naming services[0] (shop/web), its policy and %q", err, b.says)
		}
	}
}
