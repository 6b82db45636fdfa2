package agent

import (
	"github.com/ferrymesh/ferry/agent/proxy"
	"math"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

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

// routedState is a valid state with one route table on shop/web's port 80 that
// splits between web and canary, and each part of a rule the conversion checks.
func routedState() *ferryv1.NodeState {
	svc := func(name string, port uint32) *ferryv1.Service {
		return &ferryv1.Service{Name: name, Namespace: "shop", ClusterIps: []string{"10.96.0.50"}, Ports: []*ferryv1.ServicePort{{Port: port}}}
	}
	web := svc("web", 80)
	web.RouteTables = []*ferryv1.RouteTable{{
		Port: 80,
		Rules: []*ferryv1.RouteRule{{
			Route: "HTTPRoute shop/split", Index: 0, RequestTimeoutMs: 500, BackendRequestTimeoutMs: 200,
			Backends: []*ferryv1.WeightedBackend{{Service: "shop/web", Port: 80, Weight: 90}, {Service: "shop/canary", Port: 8080, Weight: 10}},
			Filters: []*ferryv1.RouteFilter{
				{Filter: &ferryv1.RouteFilter_RequestHeaders{RequestHeaders: &ferryv1.HeaderModifier{Set: []*ferryv1.Header{{Name: "x-set", Value: "1"}}, Remove: []string{"x-gone"}}}},
				{Filter: &ferryv1.RouteFilter_UrlRewrite{UrlRewrite: &ferryv1.URLRewrite{Hostname: "canary", Path: &ferryv1.PathModifier{Type: "ReplacePrefixMatch", Value: "/v2"}}}},
				{Filter: &ferryv1.RouteFilter_Mirror{Mirror: &ferryv1.Mirror{Backend: &ferryv1.WeightedBackend{Service: "shop/canary", Port: 8080}, Percent: 50}}},
			},
			Retry: &ferryv1.RouteRetry{Attempts: 2, Codes: []uint32{503}, BackoffMs: 10},
		}, {
			Route: "HTTPRoute shop/moved", Index: 0,
			Filters: []*ferryv1.RouteFilter{{Filter: &ferryv1.RouteFilter_Redirect{Redirect: &ferryv1.Redirect{Scheme: "https"}}}},
		}},
		Matches: []*ferryv1.RouteMatch{
			{Rule: 0, Path: &ferryv1.StringMatch{Type: "PathPrefix", Value: "/api"}, Headers: []*ferryv1.NamedMatch{{Name: "x-canary", Type: "RegularExpression", Value: "yes|true"}},
				QueryParams: []*ferryv1.NamedMatch{{Name: "v", Type: "Exact", Value: "2"}}, Method: "GET"},
			{Rule: 1, Path: &ferryv1.StringMatch{Type: "RegularExpression", Value: "/old/.*"}},
		},
	}}
	return &ferryv1.NodeState{Services: []*ferryv1.Service{web, svc("canary", 8080)}}
}

func TestRouteTablesFromState(t *testing.T) {
	svcs, err := services(routedState())
	if err != nil {
		t.Fatal(err)
	}
	rt := svcs[0].Routes
	if len(rt) != 1 || rt[0].Port != 80 || rt[0].ClientNamespace != "" || len(rt[0].Rules) != 2 || len(rt[0].Matches) != 2 {
		t.Fatalf("tables %+v", rt)
	}
	r, m := rt[0].Rules[0], rt[0].Matches[0]
	if r.Route != "HTTPRoute shop/split" || r.RequestTimeout != 500*time.Millisecond || r.BackendTimeout != 200*time.Millisecond ||
		!slices.Equal(r.Backends, []proxy.WeightedBackend{{Service: "shop/web", Port: 80, Weight: 90}, {Service: "shop/canary", Port: 8080, Weight: 10}}) ||
		r.Retry == nil || r.Retry.Attempts != 2 || !slices.Equal(r.Retry.Codes, []int{503}) || r.Retry.Backoff != 10*time.Millisecond {
		t.Errorf("rule %+v", r)
	}
	if f := r.Filters; len(f) != 3 || f[0].RequestHeaders.Set[0].Name != "X-Set" || f[0].RequestHeaders.Remove[0] != "X-Gone" ||
		f[1].URLRewrite.Path.Type != proxy.ReplacePrefixMatch || f[2].Mirror.Percent != 50 || f[2].Mirror.Backend.Service != "shop/canary" {
		t.Errorf("filters %+v", f)
	}
	if m.Path.Type != proxy.MatchPathPrefix || m.Method != "GET" || m.Headers[0].Name != "X-Canary" || m.Query[0].Name != "v" {
		t.Errorf("match %+v", m)
	}
	// Regular expressions match the whole value.
	if re := m.Headers[0].Regex; !re.MatchString("true") || re.MatchString("untrue") || re.MatchString("yes!") {
		t.Errorf("header regex %v not anchored", re)
	}
	if re := rt[0].Matches[1].Path.Regex; !re.MatchString("/old/x") || re.MatchString("/x/old/y") {
		t.Errorf("path regex %v not anchored", re)
	}
	if rd := rt[0].Rules[1].Filters[0].Redirect; rd.StatusCode != 302 || rd.Scheme != "https" {
		t.Errorf("redirect %+v, want 302 by default", rd)
	}
	// A prefix may be replaced by nothing.
	st := routedState()
	st.Services[0].RouteTables[0].Rules[0].Filters[1].GetUrlRewrite().Path.Value = ""
	if _, err := services(st); err != nil {
		t.Errorf("ReplacePrefixMatch with \"\": %v", err)
	}
}

// Each malformed part of a route table rejects the whole state, naming where it is.
func TestRouteTablesRejected(t *testing.T) {
	rule := func(st *ferryv1.NodeState) *ferryv1.RouteRule { return st.Services[0].RouteTables[0].Rules[0] }
	match := func(st *ferryv1.NodeState) *ferryv1.RouteMatch { return st.Services[0].RouteTables[0].Matches[0] }
	for _, tc := range []struct {
		edit func(*ferryv1.NodeState)
		says string
	}{
		{func(st *ferryv1.NodeState) { st.Services[0].RouteTables[0].Port = 81 }, "route_tables[0]: port 81 is not one of the service's ports"},
		{func(st *ferryv1.NodeState) {
			st.Services[0].RouteTables = append(st.Services[0].RouteTables, st.Services[0].RouteTables[0])
		}, `route_tables[1]: a second table for port 80 and client namespace ""`},
		{func(st *ferryv1.NodeState) { match(st).Rule = 2 }, "route_tables[0].matches[0]: rule 2 out of range (2 rules)"},
		{func(st *ferryv1.NodeState) { match(st).Path.Type = "Suffix" }, `route_tables[0].matches[0]: path: match type "Suffix" is not one this agent has`},
		{func(st *ferryv1.NodeState) { match(st).Path.Value = "api" }, `matches[0]: path: "api" does not start with /`},
		{func(st *ferryv1.NodeState) { match(st).Headers[0].Value = "(" }, `route_tables[0].matches[0]: headers[0] (x-canary): regular expression "("`},
		{func(st *ferryv1.NodeState) { match(st).Headers[0].Type = "PathPrefix" }, `headers[0] (x-canary): match type "PathPrefix" is for paths only`},
		{func(st *ferryv1.NodeState) { match(st).Headers[0].Name = "x canary" }, `matches[0]: headers[0]: "x canary" is not a header name`},
		{func(st *ferryv1.NodeState) { match(st).QueryParams[0].Name = "" }, "matches[0]: query_params[0]: no name"},
		{func(st *ferryv1.NodeState) { match(st).Method = "FETCH" }, `matches[0]: method "FETCH" is not an HTTP method`},
		{func(st *ferryv1.NodeState) { rule(st).Route = "" }, "route_tables[0].rules[0]: no route name"},
		{func(st *ferryv1.NodeState) { rule(st).Backends[1].Service = "shop/gone" }, `route_tables[0].rules[0]: backends[1]: service "shop/gone" is not in the state`},
		{func(st *ferryv1.NodeState) { rule(st).Backends[1].Port = 80 }, "rules[0]: backends[1]: service shop/canary has no port 80"},
		{func(st *ferryv1.NodeState) { rule(st).Backends[0].Weight, rule(st).Backends[1].Weight = 0, 0 }, "rules[0]: backends: weights sum to 0"},
		{func(st *ferryv1.NodeState) { rule(st).Backends[0].Weight = 2_000_000 }, "backends[0]: weight 2000000 above 1000000"},
		{func(st *ferryv1.NodeState) { rule(st).BackendRequestTimeoutMs = 600 }, "rules[0]: backend request timeout 600ms exceeds the request timeout 500ms"},
		{func(st *ferryv1.NodeState) { rule(st).Retry.Codes = []uint32{200} }, "rules[0]: retry.codes[0]: 200 is not an error status (400 to 599)"},
		{func(st *ferryv1.NodeState) { rule(st).Filters[0].Filter = nil }, "rules[0]: filters[0]: no filter set"},
		{func(st *ferryv1.NodeState) {
			rule(st).Filters[0].Filter = &ferryv1.RouteFilter_RequestHeaders{}
		}, "rules[0]: filters[0]: header modifier: empty"},
		{func(st *ferryv1.NodeState) {
			rule(st).Filters[0].GetRequestHeaders().Set[0].Value = "a\nb"
		}, `filters[0]: set[0] (x-set): value "a\nb" is not a header value`},
		{func(st *ferryv1.NodeState) {
			rule(st).Filters = append(rule(st).Filters, rule(st).Filters[0])
		}, "rules[0]: filters[3]: a second request_headers filter"},
		{func(st *ferryv1.NodeState) {
			rule(st).Filters = append(rule(st).Filters, &ferryv1.RouteFilter{Filter: &ferryv1.RouteFilter_Redirect{Redirect: &ferryv1.Redirect{}}})
		}, "rules[0]: filters[3]: a redirect and a url_rewrite in one rule"},
		{func(st *ferryv1.NodeState) { rule(st).Filters[1].GetUrlRewrite().Path.Type = "Append" }, `filters[1]: url_rewrite: path modifier type "Append" is not one this agent has`},
		{func(st *ferryv1.NodeState) {
			rule(st).Filters[1].GetUrlRewrite().Path = &ferryv1.PathModifier{Type: "ReplaceFullPath", Value: "v2"}
		}, `filters[1]: url_rewrite: path modifier value "v2" does not start with /`},
		{func(st *ferryv1.NodeState) { rule(st).Filters[1].GetUrlRewrite().Hostname = "a/b" }, `filters[1]: url_rewrite: hostname "a/b" is not a host name`},
		{func(st *ferryv1.NodeState) { rule(st).Filters[2].GetMirror().Backend.Service = "shop/gone" }, `filters[2]: mirror.backend: service "shop/gone" is not in the state`},
		{func(st *ferryv1.NodeState) { rule(st).Filters[2].GetMirror().Percent = 101 }, "filters[2]: mirror: percent 101 not between 0 and 100"},
		{func(st *ferryv1.NodeState) {
			st.Services[0].RouteTables[0].Rules[1].Filters[0].GetRedirect().StatusCode = 307
		}, "rules[1]: filters[0]: redirect: status 307 is not 301 or 302"},
		{func(st *ferryv1.NodeState) {
			st.Services[0].RouteTables[0].Rules[1].Filters[0].GetRedirect().Scheme = "ftp"
		}, `rules[1]: filters[0]: redirect: scheme "ftp" is not http or https`},
		{func(st *ferryv1.NodeState) {
			st.Services[0].RouteTables[0].Rules[1].Filters[0].GetRedirect().Port = 70000
		}, "rules[1]: filters[0]: redirect: port 70000 out of range"},
		{func(st *ferryv1.NodeState) {
			st.Services[0].RouteTables[0].Rules[1].Filters[0].GetRedirect().Path = &ferryv1.PathModifier{Type: "ReplacePrefixMatch", Value: "/new"}
		}, "route_tables[0].rules[1].filters[0]: ReplacePrefixMatch with matches[1], a RegularExpression path match, not a PathPrefix"},
	} {
		st := routedState()
		tc.edit(st)
		_, err := services(st)
		if err == nil || !strings.Contains(err.Error(), "services[0] (shop/web): ") || !strings.Contains(err.Error(), tc.says) {
			t.Errorf("error %v, want one naming services[0] (shop/web) and %q", err, tc.says)
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

// A workload's metrics name is its controller's, namespaced, from the operator;
// an older operator sends none and the pod's name stands in.
func TestWorkloadNameFromState(t *testing.T) {
	w := func(name, workload string) *ferryv1.Workload {
		return &ferryv1.Workload{Uid: "u-" + name, Name: name, Namespace: "shop", Node: "node1", Identity: "spiffe://cluster.local/ns/shop/sa/web",
			Ips: []string{"10.1.1.10"}, Workload: workload}
	}
	for _, tc := range []struct {
		in   *ferryv1.Workload
		want string
	}{{w("web-7d4b9c5f8-x2x5q", "web"), "shop/web"}, {w("web-7d4b9c5f8-x2x5q", ""), "shop/web-7d4b9c5f8-x2x5q"}} {
		got, err := workloads(&ferryv1.NodeState{Workloads: []*ferryv1.Workload{tc.in}})
		if err != nil || len(got) != 1 || got[0].Workload != tc.want || got[0].Name != "shop/"+tc.in.Name {
			t.Errorf("workloads(%v) = %+v, %v; want Workload %q", tc.in, got, err, tc.want)
		}
	}
}
