package local

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/ferrymesh/ferry/operator/mesh"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// Local mode stores the folder's AuthorizationPolicies for the mesh view, as it
// does TrafficPolicies, naming the file they came from.
func TestAuthorizationPolicyLoaded(t *testing.T) {
	l := newTestLoader(t)
	l.SetPolicyClient(NewPolicyClient())
	doc := `apiVersion: ferry.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-test, namespace: shop}
spec:
  action: Deny
  rules: [{from: [{namespaces: [test]}]}]
`
	if err := os.WriteFile(filepath.Join(l.dir, "authz.yaml"), []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := l.Load(t.Context()); err != nil {
		t.Fatalf("load: %v", err)
	}
	u, err := l.policies.Resource(mesh.AuthorizationPolicyResource()).Namespace("shop").Get(t.Context(), "deny-test", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if u.GetKind() != "AuthorizationPolicy" || u.GetGeneration() != 1 || u.GetAnnotations()[mesh.FileAnnotation] != "authz.yaml" {
		t.Fatalf("stored %v", u.Object)
	}
	if action, _, _ := unstructured.NestedString(u.Object, "spec", "action"); action != "Deny" {
		t.Fatalf("action %q", action)
	}
}
