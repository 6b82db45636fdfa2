package local

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ferrymesh/ferry/operator/mesh"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

const routeDocs = `apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: canary, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - backendRefs: [{name: web, port: 80, weight: 90}, {name: web-canary, port: 80, weight: 10}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: rpc, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: cart}]
  rules: [{matches: [{method: {service: shop.Cart, method: Add}}], backendRefs: [{name: cart, port: 9090}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: ReferenceGrant
metadata: {name: from-front, namespace: shop}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: front}]
  to: [{group: "", kind: Service}]
`

// stored lists what the policy client holds of a resource, by name.
func stored(t *testing.T, l *Loader, gvr schema.GroupVersionResource) map[string]unstructured.Unstructured {
	t.Helper()
	list, err := l.policies.Resource(gvr).Namespace("").List(t.Context(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]unstructured.Unstructured{}
	for _, u := range list.Items {
		out[u.GetName()] = u
	}
	return out
}

func TestRoutesLoaded(t *testing.T) {
	l := newTestLoader(t)
	l.SetPolicyClient(NewPolicyClient())
	write := func(text string) {
		t.Helper()
		if err := os.MkdirAll(filepath.Join(l.dir, "routes"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(l.dir, "routes", "shop.yaml"), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := l.Load(t.Context()); err != nil {
			t.Fatalf("load: %v", err)
		}
		if errs := l.Errors(); len(errs) != 0 {
			t.Fatalf("errors: %v", errs)
		}
	}
	write(routeDocs)
	for _, tc := range []struct {
		gvr        schema.GroupVersionResource
		name, kind string
	}{
		{mesh.HTTPRouteResource(), "canary", "HTTPRoute"},
		{mesh.GRPCRouteResource(), "rpc", "GRPCRoute"},
		{mesh.ReferenceGrantResource(), "from-front", "ReferenceGrant"},
	} {
		u, ok := stored(t, l, tc.gvr)[tc.name]
		if !ok {
			t.Fatalf("%s %s not stored", tc.kind, tc.name)
		}
		// Stored as an API server would: its version, a creation time, a
		// generation, and (local mode's own) the file it came from.
		if u.GetKind() != tc.kind || u.GetAPIVersion() != tc.gvr.GroupVersion().String() || u.GetCreationTimestamp().Time.IsZero() ||
			u.GetGeneration() != 1 || u.GetAnnotations()[mesh.FileAnnotation] != "routes/shop.yaml" {
			t.Fatalf("%s stored as %s %s, created %v, generation %d, annotations %v", tc.name, u.GetAPIVersion(), u.GetKind(),
				u.GetCreationTimestamp(), u.GetGeneration(), u.GetAnnotations())
		}
	}
	// An edit is the next generation; what did not change keeps its own.
	write(strings.Replace(routeDocs, "weight: 90", "weight: 80", 1))
	if g := stored(t, l, mesh.HTTPRouteResource())["canary"]; g.GetGeneration() != 2 {
		t.Fatalf("edited route's generation %d, want 2", g.GetGeneration())
	}
	if g := stored(t, l, mesh.GRPCRouteResource())["rpc"]; g.GetGeneration() != 1 {
		t.Fatalf("unchanged route's generation %d, want 1", g.GetGeneration())
	}
	// A misspelt field is a manifest error naming the file and field.
	if err := os.WriteFile(filepath.Join(l.dir, "bad.yaml"), []byte(strings.Replace(routeDocs, "backendRefs", "backendRef", 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := l.Load(t.Context()); err != nil {
		t.Fatal(err)
	}
	if errs := l.Errors(); len(errs) != 1 || errs[0].File != "bad.yaml" || errs[0].Field != "spec.rules[0].backendRef" {
		t.Fatalf("errors %v; want one in bad.yaml at spec.rules[0].backendRef", errs)
	}
}
