package mesh

import (
	"context"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/api/ferryv1"
	"github.com/ferrymesh/ferry/api/v1alpha1"
	"google.golang.org/protobuf/encoding/prototext"
	"google.golang.org/protobuf/proto"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/yaml"
)

// routeMesh is three enrolled namespaces: shop with Services web (ports http 80
// and grpc 9090), web-canary and api; front with a client pod; other with a
// Service ext.
func routeMesh() []runtime.Object {
	ns := func(name string) *corev1.Namespace {
		return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{v1alpha1.MeshLabel: v1alpha1.MeshEnabled}}}
	}
	pod := func(ns, name, app, ip string) *corev1.Pod {
		return &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, UID: types.UID("uid-" + name), Labels: map[string]string{"app": app}},
			Spec:       corev1.PodSpec{NodeName: "node1"},
			Status:     corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip},
		}
	}
	svc := func(ns, name, app string, ports ...corev1.ServicePort) *corev1.Service {
		return &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns}, Spec: corev1.ServiceSpec{Selector: map[string]string{"app": app}, Ports: ports}}
	}
	http := corev1.ServicePort{Name: "http", Port: 80}
	return []runtime.Object{
		ns("shop"), ns("front"), ns("other"),
		pod("shop", "web-1", "web", "10.1.1.10"), pod("shop", "canary-1", "canary", "10.1.1.11"), pod("shop", "api-1", "api", "10.1.1.12"),
		pod("front", "client-1", "client", "10.1.2.10"), pod("other", "ext-1", "ext", "10.1.3.10"),
		svc("shop", "web", "web", http, corev1.ServicePort{Name: "grpc", Port: 9090}),
		svc("shop", "web-canary", "canary", http), svc("shop", "api", "api", http),
		svc("other", "ext", "ext", http),
	}
}

// fromYAML reads Kubernetes objects written as YAML documents, as the API server
// would hold them (unstructured, integers as int64).
func fromYAML(tb testing.TB, docs string) []runtime.Object {
	tb.Helper()
	var out []runtime.Object
	for _, doc := range strings.Split(docs, "\n---\n") {
		if strings.TrimSpace(doc) == "" {
			continue
		}
		js, err := yaml.YAMLToJSON([]byte(doc))
		if err != nil {
			tb.Fatal(err)
		}
		u := &unstructured.Unstructured{}
		if err := u.UnmarshalJSON(js); err != nil {
			tb.Fatalf("%v in\n%s", err, doc)
		}
		out = append(out, u)
	}
	return out
}

func routeView(tb testing.TB, docs string) testView {
	tb.Helper()
	v := startViewLog(tb, slog.New(slog.DiscardHandler), append(routeMesh(), fromYAML(tb, docs)...)...)
	v.rebuild()
	return v
}

// service is the named Service (namespace/name) of the current snapshot.
func service(tb testing.TB, v *View, name string) *ferryv1.Service {
	tb.Helper()
	s, _ := v.Current()
	if s == nil {
		tb.Fatal("no snapshot")
	}
	for _, svc := range s.Services {
		if svc.Namespace+"/"+svc.Name == name {
			return svc
		}
	}
	tb.Fatalf("no Service %s in the snapshot", name)
	return nil
}

// configStatus is the status of the named route or policy ("HTTPRoute shop/x").
func configStatus(tb testing.TB, v *View, key string) *ferryv1.ConfigStatus {
	tb.Helper()
	s, _ := v.Current()
	for _, cs := range s.ConfigStatus {
		if cs.Kind+" "+cs.Name == key {
			return cs
		}
	}
	tb.Fatalf("no status for %s in %v", key, s.ConfigStatus)
	return nil
}

func condition(cs *ferryv1.ConfigStatus, typ string) *ferryv1.Condition {
	for _, c := range cs.Conditions {
		if c.Type == typ {
			return c
		}
	}
	return nil
}

func wantProto(tb testing.TB, what string, got, want proto.Message) {
	tb.Helper()
	if !proto.Equal(got, want) {
		tb.Fatalf("%s:\n%s\nwant:\n%s", what, prototext.Format(got), prototext.Format(want))
	}
}

func TestRouteCompiled(t *testing.T) {
	v := routeView(t, `
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: canary, namespace: shop, generation: 3}
spec:
  parentRefs:
  - {group: "", kind: Service, name: web, port: 80}
  rules:
  - matches:
    - path: {type: PathPrefix, value: /v2}
      headers: [{name: x-user, value: beta}]
      queryParams: [{type: RegularExpression, name: debug, value: "1|true"}]
      method: GET
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-route, value: canary}], add: [{name: x-a, value: b}], remove: [x-drop]}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: x-served, value: mesh}]}
    - type: URLRewrite
      urlRewrite: {hostname: web.internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}
    - type: RequestMirror
      requestMirror: {backendRef: {name: api, port: 80}, fraction: {numerator: 1, denominator: 4}}
    backendRefs:
    - {name: web, port: 80, weight: 90}
    - {name: web-canary, port: 80, weight: 10}
    timeouts: {request: 2s, backendRequest: 500ms}
    retry: {attempts: 3, codes: [503, 504], backoff: 50ms}
  - filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https, hostname: example.com, port: 8443, statusCode: 301, path: {type: ReplaceFullPath, replaceFullPath: /moved}}
`)
	web := service(t, v.View, "shop/web")
	route := "HTTPRoute shop/canary"
	wantProto(t, "web's route tables", &ferryv1.Service{RouteTables: web.RouteTables}, &ferryv1.Service{RouteTables: []*ferryv1.RouteTable{{
		Port: 80,
		Rules: []*ferryv1.RouteRule{{
			Route: route, Index: 0,
			Backends: []*ferryv1.WeightedBackend{{Service: "shop/web", Port: 80, Weight: 90}, {Service: "shop/web-canary", Port: 80, Weight: 10}},
			Filters: []*ferryv1.RouteFilter{
				{Filter: &ferryv1.RouteFilter_RequestHeaders{RequestHeaders: &ferryv1.HeaderModifier{
					Set: []*ferryv1.Header{{Name: "x-route", Value: "canary"}}, Add: []*ferryv1.Header{{Name: "x-a", Value: "b"}}, Remove: []string{"x-drop"}}}},
				{Filter: &ferryv1.RouteFilter_ResponseHeaders{ResponseHeaders: &ferryv1.HeaderModifier{Set: []*ferryv1.Header{{Name: "x-served", Value: "mesh"}}}}},
				{Filter: &ferryv1.RouteFilter_UrlRewrite{UrlRewrite: &ferryv1.URLRewrite{Hostname: "web.internal", Path: &ferryv1.PathModifier{Type: "ReplacePrefixMatch", Value: "/"}}}},
				{Filter: &ferryv1.RouteFilter_Mirror{Mirror: &ferryv1.Mirror{Backend: &ferryv1.WeightedBackend{Service: "shop/api", Port: 80, Weight: 1}, Percent: 25}}},
			},
			RequestTimeoutMs: 2000, BackendRequestTimeoutMs: 500,
			Retry: &ferryv1.RouteRetry{Attempts: 3, Codes: []uint32{503, 504}, BackoffMs: 50},
		}, {
			Route: route, Index: 1,
			Filters: []*ferryv1.RouteFilter{{Filter: &ferryv1.RouteFilter_Redirect{Redirect: &ferryv1.Redirect{
				Scheme: "https", Hostname: "example.com", Port: 8443, StatusCode: 301, Path: &ferryv1.PathModifier{Type: "ReplaceFullPath", Value: "/moved"}}}}},
		}},
		Matches: []*ferryv1.RouteMatch{{
			Rule: 0, Path: &ferryv1.StringMatch{Type: "PathPrefix", Value: "/v2"}, Method: "GET",
			Headers:     []*ferryv1.NamedMatch{{Name: "x-user", Type: "Exact", Value: "beta"}},
			QueryParams: []*ferryv1.NamedMatch{{Name: "debug", Type: "RegularExpression", Value: "1|true"}},
		}, {
			// A rule without matches matches every path.
			Rule: 1, Path: &ferryv1.StringMatch{Type: "PathPrefix", Value: "/"},
		}},
	}}})
	cs := configStatus(t, v.View, route)
	wantProto(t, "status", cs, &ferryv1.ConfigStatus{Kind: "HTTPRoute", Name: "shop/canary", Generation: 3, Targets: []string{"shop/web"}, Conditions: []*ferryv1.Condition{
		{Type: "Accepted", Status: true, Reason: "Accepted", Message: "applied"},
		{Type: "ResolvedRefs", Status: true, Reason: "ResolvedRefs", Message: "every reference resolved"},
	}})
	// No port in the parentRef: every port of the Service; other Services untouched.
	v = routeView(t, `
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: all, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: web}]
  rules: [{backendRefs: [{name: api, port: 80}]}]
`)
	var ports []uint32
	for _, tab := range service(t, v.View, "shop/web").RouteTables {
		ports = append(ports, tab.Port)
		if len(tab.Rules) != 1 || tab.Rules[0].Backends[0].Weight != 1 {
			t.Errorf("port %d: rules %v; want one with weight 1 (the default)", tab.Port, tab.Rules)
		}
	}
	if !slices.Equal(ports, []uint32{80, 9090}) || len(service(t, v.View, "shop/api").RouteTables) != 0 {
		t.Fatalf("tables on web's ports %v, want 80 and 9090 and none on api", ports)
	}
}

// matchOrder is the table's matches as "route#rule" of the rule each belongs to.
func matchOrder(tab *ferryv1.RouteTable) []string {
	var out []string
	for _, m := range tab.Matches {
		r := tab.Rules[m.Rule]
		out = append(out, strings.TrimPrefix(r.Route, "HTTPRoute shop/")+"#"+string(rune('0'+r.Index)))
	}
	return out
}

func TestRoutePrecedence(t *testing.T) {
	// Every match is a rule of its own, named for what should order it.
	v := routeView(t, `
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: b-old, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  parentRefs: [{kind: Service, name: web, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /a}}]
  - matches: [{path: {type: PathPrefix, value: /a}, method: GET}]
  - matches: [{path: {type: PathPrefix, value: /a}, headers: [{name: x, value: "1"}, {name: x2, value: "2"}]}]
  - matches: [{path: {type: PathPrefix, value: /a}, headers: [{name: x, value: "1"}]}]
  - matches: [{path: {type: PathPrefix, value: /a}, headers: [{name: x, value: "1"}], queryParams: [{name: q, value: "1"}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: a-new, namespace: shop, creationTimestamp: "2026-01-02T00:00:00Z"}
spec:
  parentRefs: [{kind: Service, name: web, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /a}}]
  - matches: [{path: {type: Exact, value: /a}}]
  - matches: [{path: {type: PathPrefix, value: /a/longer}}]
  - matches: [{path: {type: RegularExpression, value: /a/.*}}]
  - {}
  - matches: [{headers: [{name: canary, value: "1"}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: c-same-age, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  parentRefs: [{kind: Service, name: web, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /a}}]
`)
	tabs := service(t, v.View, "shop/web").RouteTables
	if len(tabs) != 1 {
		t.Fatalf("%d tables, want 1", len(tabs))
	}
	want := []string{
		"a-new#1", // an exact path
		"a-new#3", // a regular expression
		"a-new#2", // the longest prefix
		"b-old#1", // then, among equal prefixes: a method,
		"b-old#2", // the most headers,
		"b-old#4", // the most query parameters,
		"b-old#3",
		"b-old#0",      // the oldest route,
		"c-same-age#0", // its name,
		"a-new#0",
		"a-new#5", // no path is PathPrefix "/" (Gateway API's default), before fewer headers
		"a-new#4", // a rule without matches: the shortest prefix, "/"
	}
	if got := matchOrder(tabs[0]); !slices.Equal(got, want) {
		s, _ := v.Current()
		t.Fatalf("match order\n%v\nwant\n%v\n%v", got, want, s.ConfigStatus)
	}
}

func TestRouteConsumer(t *testing.T) {
	v := routeView(t, `
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: producer, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: web, port: 80}]
  rules: [{backendRefs: [{name: web, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: consumer, namespace: front}
spec:
  parentRefs: [{kind: Service, namespace: shop, name: web, port: 80}]
  rules: [{backendRefs: [{name: web-canary, namespace: shop, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: front-to-canary, namespace: shop}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: front}]
  to: [{group: "", kind: Service, name: web-canary}]
`)
	tabs := service(t, v.View, "shop/web").RouteTables
	if len(tabs) != 2 || tabs[0].ClientNamespace != "" || tabs[1].ClientNamespace != "front" {
		t.Fatalf("tables %v; want the producer table and front's", tabs)
	}
	if b := tabs[1].Rules[0].Backends[0]; b.Service != "shop/web-canary" || tabs[1].Rules[0].Route != "HTTPRoute front/consumer" {
		t.Fatalf("front's table sends to %v (rule %s), want shop/web-canary", b, tabs[1].Rules[0].Route)
	}
	if cs := configStatus(t, v.View, "HTTPRoute front/consumer"); !slices.Equal(cs.Targets, []string{"shop/web"}) || !condition(cs, "Accepted").Status {
		t.Fatalf("consumer status %v", cs)
	}
}

func TestGRPCRoute(t *testing.T) {
	v := routeView(t, `
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: rpc, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: web, sectionName: grpc}]
  rules:
  - matches:
    - method: {service: shop.Cart, method: Add}
    - method: {service: shop.Cart}
    - method: {method: Health}
    - method: {type: RegularExpression, service: "shop\\..*", method: "Get|List"}
    - headers: [{name: x-tenant, value: a}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {add: [{name: x-grpc, value: "1"}]}
    backendRefs: [{name: web-canary, port: 80}]
`)
	tabs := service(t, v.View, "shop/web").RouteTables
	if len(tabs) != 1 || tabs[0].Port != 9090 {
		t.Fatalf("tables %v; want one on port 9090 (sectionName grpc)", tabs)
	}
	var paths []string
	for _, m := range tabs[0].Matches {
		if m.Path == nil {
			paths = append(paths, "any "+m.Headers[0].Name)
			continue
		}
		paths = append(paths, m.Path.Type+" "+m.Path.Value)
	}
	want := []string{
		"Exact /shop.Cart/Add",
		`RegularExpression /(?:shop\..*)/(?:Get|List)`,
		`RegularExpression /(?:shop\.Cart)/[^/]+`,
		"RegularExpression /[^/]+/(?:Health)",
		"any x-tenant",
	}
	if !slices.Equal(paths, want) {
		t.Fatalf("paths\n%q\nwant\n%q", paths, want)
	}
	if r := tabs[0].Rules[0]; r.Route != "GRPCRoute shop/rpc" || r.Filters[0].GetRequestHeaders().Add[0].Name != "x-grpc" {
		t.Fatalf("rule %v", r)
	}
}

// route is an HTTPRoute on shop/web port 80 with the given rules (YAML, indented
// for spec.rules) and generation.
func route(name string, generation int, rules string) string {
	return `
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: ` + name + `, namespace: shop, generation: ` + string(rune('0'+generation)) + `}
spec:
  parentRefs: [{kind: Service, name: web, port: 80}]
  rules:
` + rules
}

func TestRouteRejected(t *testing.T) {
	for _, tc := range []struct {
		name, rules, parents string
		cond, reason, field  string
	}{
		{name: "unknown backend", rules: `  - backendRefs: [{name: nope, port: 80}]`,
			cond: "ResolvedRefs", reason: "BackendNotFound", field: "spec.rules[0].backendRefs[0].name"},
		{name: "unknown backend port", rules: `  - backendRefs: [{name: api, port: 81}]`,
			cond: "ResolvedRefs", reason: "BackendNotFound", field: "spec.rules[0].backendRefs[0].port"},
		{name: "backend without port", rules: `  - backendRefs: [{name: api}]`,
			cond: "ResolvedRefs", reason: "BackendNotFound", field: "spec.rules[0].backendRefs[0].port"},
		{name: "backend not a Service", rules: `  - backendRefs: [{group: example.com, kind: Bucket, name: api, port: 80}]`,
			cond: "ResolvedRefs", reason: "InvalidKind", field: "spec.rules[0].backendRefs[0].kind"},
		{name: "cross-namespace backend without grant", rules: `  - backendRefs: [{name: ext, namespace: other, port: 80}]`,
			cond: "ResolvedRefs", reason: "RefNotPermitted", field: "spec.rules[0].backendRefs[0].namespace"},
		{name: "mirror to unknown backend", rules: `  - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: nope, port: 80}}}]`,
			cond: "ResolvedRefs", reason: "BackendNotFound", field: "spec.rules[0].filters[0].requestMirror.backendRef.name"},
		{name: "invalid path regex", rules: "  - matches: [{path: {type: PathPrefix, value: /}}, {path: {type: RegularExpression, value: \"/(a\"}}]",
			cond: "Accepted", reason: "UnsupportedValue", field: "spec.rules[0].matches[1].path.value: invalid regular expression"},
		{name: "invalid header regex", rules: "  - matches: [{headers: [{type: RegularExpression, name: x, value: \"[\"}]}]",
			cond: "Accepted", reason: "UnsupportedValue", field: "spec.rules[0].matches[0].headers[0].value: invalid regular expression"},
		{name: "all weights 0", rules: `  - backendRefs: [{name: api, port: 80, weight: 0}, {name: web, port: 80, weight: 0}]`,
			cond: "Accepted", reason: "UnsupportedValue", field: "spec.rules[0].backendRefs: every weight is 0"},
		{name: "unsupported filter", rules: `  - filters: [{type: CORS, cors: {allowOrigins: ["*"]}}]`,
			cond: "Accepted", reason: "UnsupportedValue", field: "spec.rules[0].filters[0].type"},
		{name: "unsupported redirect status", rules: `  - filters: [{type: RequestRedirect, requestRedirect: {statusCode: 308}}]`,
			cond: "Accepted", reason: "UnsupportedValue", field: "spec.rules[0].filters[0].requestRedirect.statusCode"},
		{name: "ReplacePrefixMatch without PathPrefix", rules: "  - matches: [{path: {type: Exact, value: /a}}]\n    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]",
			cond: "Accepted", reason: "UnsupportedValue", field: "spec.rules[0].filters[0].urlRewrite.path.type: ReplacePrefixMatch needs a PathPrefix path match, and spec.rules[0].matches[0]"},
		{name: "redirect and rewrite", rules: "  - filters: [{type: RequestRedirect, requestRedirect: {}}, {type: URLRewrite, urlRewrite: {}}]",
			cond: "Accepted", reason: "IncompatibleFilters", field: "spec.rules[0].filters"},
		{name: "bad timeout", rules: `  - timeouts: {request: 1 second}`,
			cond: "Accepted", reason: "UnsupportedValue", field: "spec.rules[0].timeouts.request"},
		{name: "backend timeout over request timeout", rules: `  - timeouts: {request: 1s, backendRequest: 2s}`,
			cond: "Accepted", reason: "UnsupportedValue", field: "spec.rules[0].timeouts.backendRequest"},
		{name: "retry code out of range", rules: `  - retry: {attempts: 2, codes: [200]}`,
			cond: "Accepted", reason: "UnsupportedValue", field: "spec.rules[0].retry.codes[0]"},
		{name: "session persistence", rules: `  - sessionPersistence: {sessionName: s}`,
			cond: "Accepted", reason: "UnsupportedValue", field: "spec.rules[0].sessionPersistence"},
		{name: "wrong type", rules: `  - matches: [{method: 5}]`,
			cond: "Accepted", reason: "UnsupportedValue", field: "spec.rules.matches.method"},
		{name: "bad header name in a match", rules: "  - matches: [{headers: [{name: \"x y\", value: a}]}]",
			cond: "Accepted", reason: "UnsupportedValue", field: "spec.rules[0].matches[0].headers[0].name"},
		{name: "bad header value in a modifier", rules: "  - filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x, value: \"a\\nb\"}]}}]",
			cond: "Accepted", reason: "UnsupportedValue", field: "spec.rules[0].filters[0].requestHeaderModifier.set[0].value"},
		{name: "second header modifier", rules: "  - filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {}}, {type: ResponseHeaderModifier, responseHeaderModifier: {}}]",
			cond: "Accepted", reason: "UnsupportedValue", field: "spec.rules[0].filters[1].type"},
		{name: "bad redirect hostname", rules: `  - filters: [{type: RequestRedirect, requestRedirect: {hostname: "a:80"}}]`,
			cond: "Accepted", reason: "UnsupportedValue", field: "spec.rules[0].filters[0].requestRedirect.hostname"},
		{name: "relative rewrite path", rules: `  - filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: x}}}]`,
			cond: "Accepted", reason: "UnsupportedValue", field: "spec.rules[0].filters[0].urlRewrite.path.replaceFullPath"},
		{name: "parent does not exist", rules: `  - {}`, parents: `[{kind: Service, name: nope}]`,
			cond: "Accepted", reason: "NoMatchingParent", field: "spec.parentRefs[0].name"},
		{name: "parent port does not exist", rules: `  - {}`, parents: `[{kind: Service, name: web, port: 81}]`,
			cond: "Accepted", reason: "NoMatchingParent", field: "spec.parentRefs[0].port"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			doc := route("bad", 1, tc.rules)
			if tc.parents != "" {
				doc = strings.Replace(doc, "[{kind: Service, name: web, port: 80}]", tc.parents, 1)
			}
			v := routeView(t, doc)
			if tabs := service(t, v.View, "shop/web").RouteTables; len(tabs) != 0 {
				t.Errorf("a rejected route applies: %v", tabs)
			}
			cs := configStatus(t, v.View, "HTTPRoute shop/bad")
			acc, c := condition(cs, "Accepted"), condition(cs, tc.cond)
			if acc.Status || c.Status || c.Reason != tc.reason || !strings.HasPrefix(c.Message, tc.field) || !strings.Contains(c.Message, "nothing of it applies") {
				t.Fatalf("conditions %v; want %s False, reason %s, message from %q", cs.Conditions, tc.cond, tc.reason, tc.field)
			}
			if cs.InForceGeneration != 0 {
				t.Errorf("in force generation %d of a route never valid", cs.InForceGeneration)
			}
		})
	}
}

func TestRouteReferenceGrantAllows(t *testing.T) {
	grant := `
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: shop-routes, namespace: other}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}]
  to: [{group: "", kind: Service}]
`
	v := routeView(t, route("cross", 1, `  - backendRefs: [{name: ext, namespace: other, port: 80}]`)+grant)
	tabs := service(t, v.View, "shop/web").RouteTables
	if len(tabs) != 1 || tabs[0].Rules[0].Backends[0].Service != "other/ext" {
		t.Fatalf("tables %v; want one to other/ext", tabs)
	}
	// The grant is for HTTPRoutes: a GRPCRoute from shop is not allowed.
	v = routeView(t, strings.NewReplacer("kind: HTTPRoute", "kind: GRPCRoute").Replace(route("cross", 1, `  - backendRefs: [{name: ext, namespace: other, port: 80}]`))+grant)
	if c := condition(configStatus(t, v.View, "GRPCRoute shop/cross"), "ResolvedRefs"); c.Status || c.Reason != "RefNotPermitted" {
		t.Fatalf("GRPCRoute's ResolvedRefs %v; want RefNotPermitted", c)
	}
}

// A rejected generation leaves the last good one in force, and says so.
func TestRouteLastGoodKept(t *testing.T) {
	logs, log := newLog()
	good := fromYAML(t, route("canary", 1, `  - backendRefs: [{name: web, port: 80, weight: 90}, {name: web-canary, port: 80, weight: 10}]`))[0].(*unstructured.Unstructured)
	good.SetAnnotations(map[string]string{FileAnnotation: "routes/canary.yaml"})
	v := startViewLog(t, log, append(routeMesh(), good)...)
	v.rebuild()
	before := service(t, v.View, "shop/web").RouteTables
	if len(before) != 1 {
		t.Fatalf("tables %v; want the route's", before)
	}
	ctx := context.Background()
	res := v.policies.Resource(HTTPRouteResource()).Namespace("shop")
	bad := fromYAML(t, route("canary", 2, `  - backendRefs: [{name: web, port: 80, weight: 90}, {name: web-canaryy, port: 80, weight: 10}]`))[0].(*unstructured.Unstructured)
	bad.SetAnnotations(good.GetAnnotations())
	if _, err := res.Update(ctx, bad, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "generation 2 seen", func() bool {
		v.rebuild()
		s, _ := v.Current()
		return len(s.ConfigStatus) == 1 && s.ConfigStatus[0].Generation == 2
	})
	wantProto(t, "tables after a bad generation", &ferryv1.Service{RouteTables: service(t, v.View, "shop/web").RouteTables}, &ferryv1.Service{RouteTables: before})
	cs := configStatus(t, v.View, "HTTPRoute shop/canary")
	if cs.InForceGeneration != 1 || cs.File != "routes/canary.yaml" || condition(cs, "ResolvedRefs").Reason != "BackendNotFound" ||
		!strings.Contains(condition(cs, "Accepted").Message, "generation 1 stays in force") {
		t.Fatalf("status %v; want generation 1 in force, BackendNotFound", cs)
	}
	if len(logs.lines("level=ERROR", "route rejected; its last good generation stays in force", `route="HTTPRoute shop/canary"`, "file=routes/canary.yaml",
		"field=spec.rules[0].backendRefs[1].name", "reason=BackendNotFound", "in_force_generation=1")) != 1 {
		t.Fatalf("no log line naming file and field:\n%s", logs)
	}
	// Deleted, the route and what was kept of it go.
	if err := res.Delete(ctx, "canary", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "route deleted", func() bool {
		v.rebuild()
		return len(service(t, v.View, "shop/web").RouteTables) == 0
	})
	if len(v.goodRoutes) != 0 {
		t.Errorf("last good generations of deleted routes kept: %v", v.goodRoutes)
	}
}

func waitFor(t *testing.T, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: timed out", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A route change is in the next snapshot at once: the view rebuilds on the
// informer's event, with no other change.
func TestRouteWatched(t *testing.T) {
	v := startViewLog(t, slog.New(slog.DiscardHandler), routeMesh()...)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go v.Run(ctx)
	waitFor(t, "first snapshot", func() bool { s, _ := v.Current(); return s != nil })
	res := v.policies.Resource(HTTPRouteResource()).Namespace("shop")
	weights := func() []uint32 {
		var out []uint32
		for _, tab := range service(t, v.View, "shop/web").RouteTables {
			for _, b := range tab.Rules[0].Backends {
				out = append(out, b.Weight)
			}
		}
		return out
	}
	u := fromYAML(t, route("split", 1, `  - backendRefs: [{name: web, port: 80, weight: 90}, {name: web-canary, port: 80, weight: 10}]`))[0].(*unstructured.Unstructured)
	start := time.Now()
	if _, err := res.Create(ctx, u, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "route created", func() bool { return slices.Equal(weights(), []uint32{90, 10}) })
	u = fromYAML(t, route("split", 2, `  - backendRefs: [{name: web, port: 80, weight: 50}, {name: web-canary, port: 80, weight: 50}]`))[0].(*unstructured.Unstructured)
	if _, err := res.Update(ctx, u, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "weights changed", func() bool { return slices.Equal(weights(), []uint32{50, 50}) })
	t.Logf("two route changes in the snapshot after %v", time.Since(start))
	if err := res.Delete(ctx, "split", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "route deleted", func() bool { return len(weights()) == 0 })
}

// A route whose parents are all Gateways is another controller's: no status, no
// table.
func TestRouteOfGatewayIgnored(t *testing.T) {
	v := routeView(t, `
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: edge, namespace: shop}
spec:
  parentRefs: [{name: public-gateway}]
  rules: [{backendRefs: [{name: nope, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: edge-rpc, namespace: shop}
spec:
  parentRefs: [{group: gateway.networking.k8s.io, kind: Service, name: web}]
  rules: [{filters: [{type: ExtensionRef, extensionRef: {group: x, kind: y, name: z}}]}]
`)
	if s, _ := v.Current(); len(s.ConfigStatus) != 0 || len(service(t, v.View, "shop/web").RouteTables) != 0 {
		t.Fatalf("a Gateway's route is in the mesh: %v", s.ConfigStatus)
	}
}
