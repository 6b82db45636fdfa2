package mesh

import (
	"log/slog"
	"strings"
	"testing"

	"github.com/ferrymesh/ferry/agent"
	"github.com/ferrymesh/ferry/api/ferryv1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/tools/cache"
	"sigs.k8s.io/yaml"
)

// fuzzSeeds are route and policy documents using every feature the compile knows,
// for the fuzzer to mutate.
var fuzzSeeds = []string{`
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
`, `
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: rpc, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: web, sectionName: grpc}]
  rules:
  - matches:
    - method: {service: shop.Cart, method: Add}
    - method: {type: RegularExpression, service: "shop\\..*", method: "Get|List"}
    - headers: [{name: x-tenant, value: a}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {add: [{name: x-grpc, value: "1"}]}
    backendRefs: [{name: web-canary, port: 80}]
`, `
apiVersion: ferry.io/v1alpha1
kind: TrafficPolicy
metadata: {name: web-policy, namespace: shop, generation: 2}
spec:
  targetRefs: [{kind: Service, name: web}]
  loadBalancer: {type: RingHash, hashHeader: x-user}
  timeouts: {connect: 1s, request: 3s, idle: 1m}
  retries: {attempts: 2, "on": [gateway-error, retriable-4xx], backoff: 30ms}
  circuitBreaker: {maxConnections: 100, maxPendingRequests: 10, maxRequests: 50, maxRequestsPerConnection: 20}
  outlierDetection: {consecutiveErrors: 5, consecutiveGatewayErrors: 3, interval: 1s, baseEjectionTime: 30s, maxEjectionPercent: 50}
  fault:
    abort: {percent: 10, httpStatus: 503}
    delay: {percent: 50, duration: 100ms}
  retryBudget: {percent: 20, minRetriesPerSecond: 10}
  rateLimit: {requestsPerSecond: 100}
`, `
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: consumer, namespace: front}
spec:
  parentRefs: [{kind: Service, name: web, namespace: shop, port: 80}]
  rules:
  - matches: [{path: {type: Exact, value: /a}}, {path: {type: RegularExpression, value: "/b/.*"}}]
    backendRefs: [{name: ext, namespace: other, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: allow, namespace: other}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: front}]
  to: [{group: "", kind: Service}]
`}

// FuzzRouteCompile feeds arbitrary documents (HTTPRoutes, GRPCRoutes,
// TrafficPolicies, ReferenceGrants, as the API server or local mode would hold
// them) through the view's compile: it never panics, and the state it builds is
// one every agent takes. An agent refuses a malformed state whole, so the operator
// must reject what an agent would: anything else takes every Service of the node
// off the mesh's new state.
func FuzzRouteCompile(f *testing.F) {
	for _, s := range fuzzSeeds {
		f.Add(s)
	}
	v := startViewLog(f, slog.New(slog.DiscardHandler), routeMesh()...)
	f.Fuzz(func(t *testing.T, docs string) {
		listers := map[string]cache.Indexer{}
		for _, kind := range []string{KindHTTPRoute, KindGRPCRoute, "TrafficPolicy", "ReferenceGrant"} {
			listers[kind] = cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc})
		}
		for _, doc := range strings.Split(docs, "\n---\n") {
			js, err := yaml.YAMLToJSON([]byte(doc))
			if err != nil {
				continue
			}
			u := &unstructured.Unstructured{}
			if err := u.UnmarshalJSON(js); err != nil {
				continue
			}
			if idx, ok := listers[u.GetKind()]; ok {
				_ = idx.Add(u) // a key error (no name) leaves it out, as an API server would
			}
		}
		v.mu.Lock()
		v.httpRoutes = cache.NewGenericLister(listers[KindHTTPRoute], HTTPRouteResource().GroupResource())
		v.grpcRoutes = cache.NewGenericLister(listers[KindGRPCRoute], GRPCRouteResource().GroupResource())
		v.View.policies = cache.NewGenericLister(listers["TrafficPolicy"], TrafficPolicyResource().GroupResource())
		v.grants = cache.NewGenericLister(listers["ReferenceGrant"], ReferenceGrantResource().GroupResource())
		v.mu.Unlock()
		// Each input on its own: no last good generation from an earlier one.
		v.goodRoutes = map[configKey]lastGood[*routeSpec]{}
		v.goodPolicies = map[configKey]lastGood[*policyResult]{}
		v.rebuild()
		snap, _ := v.Current()
		if snap == nil {
			t.Fatal("no snapshot")
		}
		st := &ferryv1.NodeState{Node: "node1", Workloads: snap.Workloads, Services: snap.Services, ConfigStatus: snap.ConfigStatus}
		if err := agent.CheckState(st); err != nil {
			t.Fatalf("the operator built a state agents refuse: %v", err)
		}
	})
}
