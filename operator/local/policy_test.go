package local

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ferrymesh/ferry/operator/mesh"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

const tpDoc = `apiVersion: ferry.io/v1alpha1
kind: TrafficPolicy
metadata:
  name: web-lb
  namespace: shop
spec:
  targetRefs: [{kind: Service, name: web}]
  loadBalancer: {type: RoundRobin}
`

// loadPolicies writes files into the loader's folder, loads it, and returns the
// TrafficPolicies the policy client then holds, by name.
func loadPolicies(t *testing.T, l *Loader, files map[string]string) map[string]unstructured.Unstructured {
	t.Helper()
	for name, text := range files {
		path := filepath.Join(l.dir, name)
		if text == "" {
			if err := os.Remove(path); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Load(t.Context()); err != nil {
		t.Fatalf("load: %v", err)
	}
	list, err := l.policies.Resource(mesh.TrafficPolicyResource()).Namespace("").List(t.Context(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]unstructured.Unstructured{}
	for _, u := range list.Items {
		out[u.GetName()] = u
	}
	return out
}

func TestTrafficPolicyLoaded(t *testing.T) {
	l := newTestLoader(t)
	l.SetPolicyClient(NewPolicyClient())
	got := loadPolicies(t, l, map[string]string{"tp.yaml": tpDoc})
	web, ok := got["web-lb"]
	if !ok || len(got) != 1 {
		t.Fatalf("policies %v, want web-lb", got)
	}
	if web.GetAPIVersion() != "ferry.io/v1alpha1" || web.GetKind() != "TrafficPolicy" || web.GetNamespace() != "shop" {
		t.Fatalf("stored as %s %s in %q", web.GetAPIVersion(), web.GetKind(), web.GetNamespace())
	}
	if lb, _, _ := unstructured.NestedString(web.Object, "spec", "loadBalancer", "type"); lb != "RoundRobin" {
		t.Fatalf("spec.loadBalancer.type %q", lb)
	}
	created := web.GetCreationTimestamp()
	if created.IsZero() {
		t.Fatal("no creationTimestamp: the oldest of two policies cannot win")
	}

	// An edit keeps the creation time, as the API server does.
	got = loadPolicies(t, l, map[string]string{"tp.yaml": strings.Replace(tpDoc, "RoundRobin", "Random", 1)})
	web = got["web-lb"]
	if lb, _, _ := unstructured.NestedString(web.Object, "spec", "loadBalancer", "type"); lb != "Random" || !web.GetCreationTimestamp().Time.Equal(created.Time) {
		t.Fatalf("after an edit: type %q, created %v (was %v)", lb, web.GetCreationTimestamp(), created)
	}
	// A creation time the manifest sets is kept.
	set := strings.Replace(tpDoc, "  namespace: shop\n", "  namespace: shop\n  creationTimestamp: \"2020-01-02T03:04:05Z\"\n", 1)
	set = strings.Replace(set, "name: web-lb", "name: old", 1)
	got = loadPolicies(t, l, map[string]string{"old.yaml": set})
	if old := got["old"]; old.GetCreationTimestamp().UTC().Format("2006-01-02T15:04:05Z") != "2020-01-02T03:04:05Z" {
		t.Fatalf("manifest's creationTimestamp became %v", old.GetCreationTimestamp())
	}
	// Removing the file removes the policy and forgets its creation time.
	got = loadPolicies(t, l, map[string]string{"tp.yaml": ""})
	if _, ok := got["web-lb"]; ok || len(got) != 1 {
		t.Fatalf("after removing tp.yaml: %v", got)
	}
	if _, ok := l.created[key{kind: "TrafficPolicy", namespace: "shop", name: "web-lb"}]; ok {
		t.Fatal("a removed policy keeps its creation time")
	}
	if errs := l.Errors(); len(errs) != 0 {
		t.Fatalf("errors: %v", errs)
	}
}

func TestTrafficPolicyErrors(t *testing.T) {
	for _, tc := range []struct {
		name, doc, field string
	}{
		{"unknown field", strings.Replace(tpDoc, "{type: RoundRobin}", "{type: RoundRobin, weight: 3}", 1), "spec.loadBalancer.weight"},
		{"wrong type", strings.Replace(tpDoc, "[{kind: Service, name: web}]", "web", 1), "spec.targetRefs"},
		{"no name", strings.Replace(tpDoc, "  name: web-lb\n", "", 1), "metadata.name"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := newTestLoader(t)
			l.SetPolicyClient(NewPolicyClient())
			if got := loadPolicies(t, l, map[string]string{"tp.yaml": tc.doc}); len(got) != 0 {
				t.Fatalf("a bad policy was loaded: %v", got)
			}
			errs := l.Errors()
			if len(errs) != 1 || errs[0].File != "tp.yaml" || errs[0].Field != tc.field {
				t.Fatalf("errors %v; want one in tp.yaml at %s", errs, tc.field)
			}
			t.Logf("reported: %v", errs[0])
		})
	}
	// A loader with no policy client says so rather than drop the policy.
	l := newTestLoader(t)
	if err := os.WriteFile(filepath.Join(l.dir, "tp.yaml"), []byte(tpDoc), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := l.Load(t.Context()); err == nil || !strings.Contains(err.Error(), "TrafficPolicy shop/web-lb") {
		t.Fatalf("load without a policy client: %v", err)
	}
}
