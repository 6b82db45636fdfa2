package mesh

import (
	"context"
	"log/slog"
	"maps"
	"slices"
	"strconv"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"

	"github.com/ferrymesh/ferry/api/v1alpha1"
)

// modes is each workload's mTLS mode and per-port modes in the current snapshot.
func modes(tb testing.TB, v *View) map[string]string {
	tb.Helper()
	s, _ := v.Current()
	out := map[string]string{}
	for _, w := range s.Workloads {
		m := w.MtlsMode
		for _, p := range sortedPorts(w.PortMtlsModes) {
			m += " " + p
		}
		out[w.Namespace+"/"+w.Name] = m
	}
	return out
}

func sortedPorts(ps map[uint32]string) []string {
	var out []string
	for p, m := range ps {
		out = append(out, strconv.FormatUint(uint64(p), 10)+"="+m)
	}
	slices.Sort(out)
	return out
}

func blog() []runtime.Object {
	return []runtime.Object{
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "blog", Labels: map[string]string{v1alpha1.MeshLabel: v1alpha1.MeshEnabled}}},
		&corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "post-1", Namespace: "blog", UID: types.UID("uid-post-1"), Labels: map[string]string{"app": "post"}},
			Spec:       corev1.PodSpec{NodeName: "node1"},
			Status:     corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "10.1.1.20"},
		},
	}
}

// TestPeerAuthenticationMostSpecificWins: mesh-wide STRICT, shop's namespace-wide
// PERMISSIVE, and a workload-level one for web with an empty mode (inherited) and
// a STRICT port; blog has none of its own and takes the mesh's.
func TestPeerAuthenticationMostSpecificWins(t *testing.T) {
	objs := append(shop(), blog()...)
	v := startViewLog(t, slog.New(slog.DiscardHandler), append(objs, fromYAML(t, `
apiVersion: ferry.io/v1alpha1
kind: PeerAuthentication
metadata: {name: mesh, namespace: ferry-system}
spec: {mtls: {mode: Strict}}
---
apiVersion: ferry.io/v1alpha1
kind: PeerAuthentication
metadata: {name: shop, namespace: shop}
spec: {mtls: {mode: Permissive}}
---
apiVersion: ferry.io/v1alpha1
kind: PeerAuthentication
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  mtls: {}
  portLevelMtls: {8443: {mode: Strict}, 8080: {mode: Permissive}}
`)...)...)
	v.rebuild()
	want := map[string]string{"shop/web-1": "Permissive 8080=Permissive 8443=Strict", "shop/api-1": "Permissive", "blog/post-1": "Strict"}
	if got := modes(t, v.View); !maps.Equal(got, want) {
		t.Fatalf("modes %v, want %v", got, want)
	}
	for name, says := range map[string]string{
		"PeerAuthentication ferry-system/mesh": "decides the mTLS mode of 3 workloads (mesh-wide",
		"PeerAuthentication shop/shop":         "decides the mTLS mode of 2 workloads",
		"PeerAuthentication shop/web":          "decides the mTLS mode of 1 workloads",
	} {
		c := condition(configStatus(t, v.View, name), "Accepted")
		if !c.Status || !strings.HasPrefix(c.Message, says) {
			t.Errorf("%s: condition %v, want accepted saying %q", name, c, says)
		}
	}

	// The workload-level one set STRICT: it wins over the namespace's PERMISSIVE.
	web := fromYAML(t, `
apiVersion: ferry.io/v1alpha1
kind: PeerAuthentication
metadata: {name: web, namespace: shop, generation: 2}
spec:
  selector: {matchLabels: {app: web}}
  mtls: {mode: Strict}
  portLevelMtls: {8080: {mode: Permissive}}
`)[0].(*unstructured.Unstructured)
	if _, err := v.policies.Resource(PeerAuthenticationResource()).Namespace("shop").Update(context.Background(), web, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "web STRICT", func() bool {
		v.rebuild()
		return modes(t, v.View)["shop/web-1"] == "Strict 8080=Permissive"
	})
	// Without any, every workload is PERMISSIVE (no mode sent).
	for _, n := range []struct{ ns, name string }{{"ferry-system", "mesh"}, {"shop", "shop"}, {"shop", "web"}} {
		if err := v.policies.Resource(PeerAuthenticationResource()).Namespace(n.ns).Delete(context.Background(), n.name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "all PERMISSIVE", func() bool {
		v.rebuild()
		return maps.Equal(modes(t, v.View), map[string]string{"shop/web-1": "", "shop/api-1": "", "blog/post-1": ""})
	})
}

func TestPeerAuthenticationRejected(t *testing.T) {
	for _, tc := range []struct{ spec, field string }{
		{`{mtls: {mode: strict}}`, "spec.mtls.mode"},
		{`{mtls: {mode: Strict}, portLevelMtls: {80: {mode: Permissive}}}`, "spec.portLevelMtls"},
		{`{selector: {matchLabels: {app: web}}, mtls: {}, portLevelMtls: {80: {mode: Disable}}}`, "spec.portLevelMtls[80].mode"},
		{`{selector: {matchLabels: {app: web}}, mtls: {}, portLevelMtls: {70000: {mode: Strict}}}`, "spec.portLevelMtls[70000]"},
		{`{selector: {matchLabels: {"a b": c}}, mtls: {}}`, "spec.selector.matchLabels"},
	} {
		t.Run(tc.field, func(t *testing.T) {
			logs, log := newLog()
			v := startViewLog(t, log, append(shop(), fromYAML(t, `
apiVersion: ferry.io/v1alpha1
kind: PeerAuthentication
metadata: {name: bad, namespace: shop}
spec: `+tc.spec)...)...)
			v.rebuild()
			if got := modes(t, v.View); got["shop/web-1"] != "" {
				t.Fatalf("a rejected PeerAuthentication set modes %v", got)
			}
			c := condition(configStatus(t, v.View, "PeerAuthentication shop/bad"), "Accepted")
			if c.Status || c.Reason != "Invalid" || !strings.HasPrefix(c.Message, tc.field+":") || !strings.HasSuffix(c.Message, "nothing of it applies") {
				t.Fatalf("condition %v", c)
			}
			if len(logs.lines("level=ERROR", "peer authentication rejected", "policy=shop/bad", "field="+tc.field)) != 1 {
				t.Fatalf("no log line naming the field:\n%s", logs)
			}
		})
	}
}
