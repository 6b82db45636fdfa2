package main

import (
	"bytes"
	"encoding/json"
	"regexp"
	"strings"
	"testing"

	"github.com/ferrymesh/ferry/api/ferryv1"
	"google.golang.org/protobuf/encoding/protojson"
)

// routesState is a state with a canary split, a header match to the canary, a
// policy with every part, a consumer table, and a route whose newest generation
// was rejected.
func routesState() *ferryv1.NodeState {
	rule0 := &ferryv1.RouteRule{Route: "HTTPRoute default/web", Index: 0,
		Backends: []*ferryv1.WeightedBackend{{Service: "default/web", Port: 80, Weight: 90}, {Service: "default/web-canary", Port: 80, Weight: 10}},
		Filters: []*ferryv1.RouteFilter{
			{Filter: &ferryv1.RouteFilter_RequestHeaders{RequestHeaders: &ferryv1.HeaderModifier{Set: []*ferryv1.Header{{Name: "X-Env", Value: "prod"}}, Remove: []string{"X-Debug"}}}},
			{Filter: &ferryv1.RouteFilter_Mirror{Mirror: &ferryv1.Mirror{Backend: &ferryv1.WeightedBackend{Service: "default/web-mirror", Port: 80}, Percent: 100}}},
		},
		RequestTimeoutMs: 500, Retry: &ferryv1.RouteRetry{Attempts: 3, Codes: []uint32{503}},
	}
	rule1 := &ferryv1.RouteRule{Route: "HTTPRoute default/web", Index: 1,
		Backends: []*ferryv1.WeightedBackend{{Service: "default/web-canary", Port: 80, Weight: 1}}}
	rule2 := &ferryv1.RouteRule{Route: "HTTPRoute default/web", Index: 2,
		Filters: []*ferryv1.RouteFilter{{Filter: &ferryv1.RouteFilter_Redirect{Redirect: &ferryv1.Redirect{StatusCode: 301,
			Path: &ferryv1.PathModifier{Type: "ReplaceFullPath", Value: "/new"}}}}}}
	return &ferryv1.NodeState{
		Version: 7,
		Services: []*ferryv1.Service{
			{Name: "plain", Namespace: "default", ClusterIps: []string{"10.96.0.9"}},
			{
				Name: "web", Namespace: "default", ClusterIps: []string{"10.96.0.10"}, Ports: []*ferryv1.ServicePort{{Port: 80, AppProtocol: "http"}},
				LoadBalancer: "RingHash",
				RouteTables: []*ferryv1.RouteTable{
					{Port: 80, ClientNamespace: "shop", Rules: []*ferryv1.RouteRule{rule1}, Matches: []*ferryv1.RouteMatch{{Rule: 0}}},
					{Port: 80, Rules: []*ferryv1.RouteRule{rule0, rule1, rule2}, Matches: []*ferryv1.RouteMatch{
						{Rule: 2, Path: &ferryv1.StringMatch{Type: "Exact", Value: "/old"}},
						{Rule: 1, Method: "GET", Path: &ferryv1.StringMatch{Type: "PathPrefix", Value: "/"},
							Headers: []*ferryv1.NamedMatch{{Name: "X-Canary", Type: "Exact", Value: "true"}}},
						{Rule: 0, Path: &ferryv1.StringMatch{Type: "PathPrefix", Value: "/"}},
					}},
				},
				Policy: &ferryv1.ServicePolicy{
					Name: "default/web", HashHeader: "X-User", MaxRequests: 5, MaxPendingRequests: 10,
					OutlierDetection: &ferryv1.OutlierDetection{Consecutive_5Xx: 5, IntervalMs: 1000, BaseEjectionMs: 3000, MaxEjectionPercent: 50},
					Fault:            &ferryv1.Fault{AbortPercent: 10, AbortStatus: 503, DelayPercent: 50, DelayMs: 100},
					RetryBudget:      &ferryv1.RetryBudget{Percent: 20, MinRetriesPerSecond: 10, TtlMs: 10000},
					RateLimit:        &ferryv1.RateLimit{RequestsPerSecond: 100, Burst: 10},
				},
			},
		},
		ConfigStatus: []*ferryv1.ConfigStatus{
			{Kind: "TrafficPolicy", Name: "default/web", File: "policy.yaml", Generation: 1, Targets: []string{"default/web"},
				Conditions: []*ferryv1.Condition{{Type: "Accepted", Status: true, Reason: "Accepted"}}},
			{Kind: "HTTPRoute", Name: "default/web", File: "web.yaml", Generation: 4, Targets: []string{"default/web"},
				Conditions: []*ferryv1.Condition{{Type: "Accepted", Status: true, Reason: "Accepted"}, {Type: "ResolvedRefs", Status: true, Reason: "ResolvedRefs"}}},
			{Kind: "HTTPRoute", Name: "default/broken", File: "broken.yaml", Generation: 3, Targets: []string{"default/web"}, InForceGeneration: 2,
				Conditions: []*ferryv1.Condition{
					{Type: "Accepted", Status: true, Reason: "Accepted"},
					{Type: "ResolvedRefs", Status: false, Reason: "BackendNotFound", Message: "spec.rules[0].backendRefs[0].name: Service default/nope not found"},
				}},
		},
	}
}

func TestAgentRoutesTable(t *testing.T) {
	var out bytes.Buffer
	if err := printRoutes(&out, routesState(), false); err != nil {
		t.Fatal(err)
	}
	text := out.String()
	t.Logf("ferry agent routes:\n%s", text)
	if strings.Contains(text, "default/plain") {
		t.Error("a Service without routes or policy is listed")
	}
	for _, want := range []string{
		`(?m)^state version 7$`,
		`(?m)^Service default/web$`,
		// The producer table first, then the consumer table of shop.
		`(?s)port 80, every client \(producer routes\):.*port 80, clients in namespace shop \(consumer routes\):`,
		// Matches in precedence order, each with its rule.
		`(?m)^ +1 +path = /old +HTTPRoute default/web rule 2 +\(redirect\) +redirect 301 path → /new +- +-$`,
		`(?m)^ +2 +GET, path /\*, header X-Canary=true +HTTPRoute default/web rule 1 +default/web-canary:80 +- +- +-$`,
		`(?m)^ +3 +path /\* +HTTPRoute default/web rule 0 +default/web:80 weight 90 \(90%\), default/web-canary:80 weight 10 \(10%\) +request headers set X-Env: prod, remove X-Debug; mirror 100% to default/web-mirror:80 +request 500ms +3 attempts on 503, backoff 25ms$`,
		`(?m)^ +1 +any request +HTTPRoute default/web rule 1 +default/web-canary:80`,
		`(?m)^  TrafficPolicy default/web:$`,
		`(?m)^ +load balancer +RingHash on header X-User$`,
		`(?m)^ +limits +at most 10 pending requests, 5 requests \(503 beyond, circuit open\)$`,
		`(?m)^ +outlier detection +eject after 5 consecutive 5xx, checked every 1s, for 3s × ejections, at most 50% of endpoints$`,
		`(?m)^ +fault injection +abort 10% with 503; delay 50% by 100ms$`,
		`(?m)^ +retry budget +20% of requests \+ 10/s, over 10s$`,
		`(?m)^ +rate limit +100 requests/s per endpoint, burst 10 \(429 beyond\)$`,
		// Rejected first, with the field and the generation still in force.
		`(?s)ROUTES AND POLICIES\nHTTPRoute default/broken \(file broken.yaml, generation 3\) → default/web\n`,
		`(?m)^  ResolvedRefs +False +BackendNotFound +spec\.rules\[0\]\.backendRefs\[0\]\.name: Service default/nope not found$`,
		`(?m)^  REJECTED; in force: generation 2$`,
		`(?m)^HTTPRoute default/web \(file web.yaml, generation 4\) → default/web\n  Accepted +True +Accepted +\n  ResolvedRefs +True +ResolvedRefs +\n  in force: generation 4$`,
		`(?m)^TrafficPolicy default/web \(file policy.yaml, generation 1\) → default/web$`,
	} {
		if !regexp.MustCompile(want).MatchString(text) {
			t.Errorf("output lacks %s", want)
		}
	}
}

// -o json is the state's own JSON form, limited to what the table shows.
func TestAgentRoutesJSON(t *testing.T) {
	var out bytes.Buffer
	if err := printRoutes(&out, routesState(), true); err != nil {
		t.Fatal(err)
	}
	if !json.Valid(out.Bytes()) {
		t.Fatalf("not JSON: %s", out.String())
	}
	st := &ferryv1.NodeState{}
	if err := protojson.Unmarshal(out.Bytes(), st); err != nil {
		t.Fatal(err)
	}
	if st.GetVersion() != 7 || len(st.GetServices()) != 1 || st.GetServices()[0].GetName() != "web" || len(st.GetServices()[0].GetRouteTables()) != 2 ||
		st.GetServices()[0].GetPolicy().GetRateLimit().GetRequestsPerSecond() != 100 || len(st.GetConfigStatus()) != 3 ||
		st.GetConfigStatus()[2].GetInForceGeneration() != 2 {
		t.Errorf("json: %s", out.String())
	}
}

func TestAgentRoutesNone(t *testing.T) {
	var out bytes.Buffer
	if err := printRoutes(&out, &ferryv1.NodeState{Version: 1}, false); err != nil {
		t.Fatal(err)
	}
	if want := "state version 1\n\nno Service has routes or a TrafficPolicy\n\nROUTES AND POLICIES\n  none\n"; out.String() != want {
		t.Errorf("got %q, want %q", out.String(), want)
	}
}

func TestAgentRoutesHelp(t *testing.T) {
	out, err := ferryCLI(t, newAgentCommand, "routes", "--help")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"ferry agent routes", "precedence", "in force", "-o json"} {
		if !strings.Contains(out, want) {
			t.Errorf("--help lacks %q", want)
		}
	}
}
