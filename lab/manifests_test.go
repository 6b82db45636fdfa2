package lab

import (
	"slices"
	"testing"
)

func TestConfigRefs(t *testing.T) {
	refs, err := configRefs(`apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split, generation: 2}
spec: {}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
---
# a comment
apiVersion: ferry.io/v1alpha1
kind: TrafficPolicy
metadata:
  name: web
  namespace: shop
---
kind: GRPCRoute
metadata: {name: calls, namespace: shop}
`)
	if err != nil {
		t.Fatal(err)
	}
	want := []ConfigRef{{"HTTPRoute", "default/split"}, {"TrafficPolicy", "shop/web"}, {"GRPCRoute", "shop/calls"}}
	if !slices.Equal(refs, want) {
		t.Errorf("refs %v, want %v", refs, want)
	}
	if _, err := configRefs("kind: [unclosed"); err == nil {
		t.Error("bad YAML accepted")
	}
}

func TestManifestPathChecked(t *testing.T) {
	l := &Lab{}
	l.desc.Op = &operatorInfo{ManifestDir: t.TempDir()}
	for _, bad := range []string{"", "a/b.yaml", "../x.yaml", "x.json", "ns-default.yaml", "nodes.yaml"} {
		if _, _, err := l.manifestPath(bad); err == nil {
			t.Errorf("manifest %q accepted", bad)
		}
	}
	if p, _, err := l.manifestPath("routes.yaml"); err != nil || p != l.desc.Op.ManifestDir+"/routes.yaml" {
		t.Errorf("routes.yaml: %q, %v", p, err)
	}
}
