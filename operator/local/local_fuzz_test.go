package local

import (
	"os"
	"path/filepath"
	"testing"

	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"
)

// FuzzParseFile feeds the manifest reader arbitrary file contents: it never
// panics, every error names its file and document, and every object it takes is
// well-formed (named, in a namespace exactly when namespaced) and reads back the
// same after being written out again, so what local mode loads is what the file
// says.
func FuzzParseFile(f *testing.F) {
	for _, s := range []string{
		"apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {ferry.io/mesh: enabled}}\n",
		"apiVersion: v1\nkind: Pod\nmetadata: {name: web-1, namespace: shop, labels: {app: web}}\nspec: {nodeName: node1, containers: [{name: c, image: x}]}\nstatus: {phase: Running, podIP: 10.1.1.10, podIPs: [{ip: 10.1.1.10}, {ip: 'fd00::10'}]}\n",
		"# comment\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}], clusterIP: 10.96.0.10}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n",
		"apiVersion: v1\nkind: Node\nmetadata: {name: node1, namespace: shop}\n",
		"apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: web, namespace: shop}\n",
		"apiVersion: ferry.io/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p, namespace: shop}\nspec: {targetRefs: [{kind: Service, name: web}], loadBalancer: {type: LeastRequest}}\n",
		"apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop}\nspec: {parentRefs: [{kind: Service, name: web}], rules: [{backendRefs: [{name: web, port: 80}]}]}\n",
		"apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nstatus: {podIP: nope}\n",
		"apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {bogus: 1}\n",
		"kind: Pod\n",
		"apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: a}\n",
		"{\"apiVersion\": \"v1\", \"kind\": \"Namespace\", \"metadata\": {\"name\": \"x\"}}",
		"- a\n- b\n",
		":\n\t:",
	} {
		f.Add([]byte(s))
	}
	path := filepath.Join(f.TempDir(), "m.yaml") // one file, rewritten for every input
	f.Fuzz(func(t *testing.T, data []byte) {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		objs, errs := parseFile(path, "m.yaml")
		for _, e := range errs {
			if e.File != "m.yaml" || e.Document < 1 || e.Err == nil {
				t.Fatalf("error without its place or cause: %#v", e)
			}
		}
		for k, o := range objs {
			mo, ok := o.(v1.Object)
			if !ok {
				t.Fatalf("%v: %T is no object", k, o)
			}
			namespaced := k.kind != "Namespace" && k.kind != "Node"
			if k.name == "" || k.name != mo.GetName() || k.namespace != mo.GetNamespace() || namespaced != (k.namespace != "") {
				t.Fatalf("object %T %s/%s filed as %+v", o, mo.GetNamespace(), mo.GetName(), k)
			}
			out, err := yaml.Marshal(o)
			if err != nil {
				t.Fatalf("%v: write out: %v", k, err)
			}
			k2, o2, merr := parseDoc(out)
			if merr != nil {
				t.Fatalf("%v written out reads back with %v:\n%s", k, merr, out)
			}
			if k2 != k || !equality.Semantic.DeepEqual(o, o2) {
				t.Fatalf("%v reads back as %v, %#v:\n%s", k, k2, o2, out)
			}
		}
	})
}
