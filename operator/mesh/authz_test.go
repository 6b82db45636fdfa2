package mesh

import (
	"context"
	"log/slog"
	"strings"
	"testing"

	"github.com/ferrymesh/ferry/api/ferryv1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// authz is the compiled policy of the current snapshot named namespace/name, nil
// when it selects nothing or is not in force.
func authz(tb testing.TB, v *View, name string) *ferryv1.AuthorizationPolicy {
	tb.Helper()
	s, _ := v.Current()
	for _, p := range s.Authorization {
		if p.Name == name {
			return p
		}
	}
	return nil
}

func TestAuthorizationPolicyCompiled(t *testing.T) {
	v := startViewLog(t, slog.New(slog.DiscardHandler), append(shop(), fromYAML(t, `
apiVersion: ferry.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web-readers, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - from:
    - identities: ["spiffe://cluster.local/ns/shop/*"]
      notIdentities: ["*/sa/batch"]
      namespaces: [shop]
      notNamespaces: [test]
      ipBlocks: [10.1.0.0/16, 10.2.3.4]
      notIPBlocks: [10.1.9.1/16]
    to:
    - ports: [8080]
      notPorts: [9090]
      methods: [GET]
      paths: [/api/*]
      hosts: ["*.Shop.svc"]
      headers: [{name: X-Tenant, values: [a]}]
---
apiVersion: ferry.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: ferry-system}
spec: {}
---
apiVersion: ferry.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: nobody, namespace: shop}
spec:
  selector: {matchLabels: {app: none}}
  action: Deny
`)...)...)
	v.rebuild()
	got := authz(t, v.View, "shop/web-readers")
	want := &ferryv1.AuthorizationPolicy{
		Name: "shop/web-readers", Action: "Allow", Workloads: []string{"uid-web-1"},
		Rules: []*ferryv1.AuthorizationRule{{
			From: []*ferryv1.AuthorizationSource{{
				Identities: []string{"spiffe://cluster.local/ns/shop/*"}, NotIdentities: []string{"*/sa/batch"},
				Namespaces: []string{"shop"}, NotNamespaces: []string{"test"},
				IpBlocks: []string{"10.1.0.0/16", "10.2.3.4/32"}, NotIpBlocks: []string{"10.1.0.0/16"},
			}},
			To: []*ferryv1.AuthorizationOperation{{
				Ports: []uint32{8080}, NotPorts: []uint32{9090}, Methods: []string{"GET"}, Paths: []string{"/api/*"},
				Hosts: []string{"*.shop.svc"}, Headers: []*ferryv1.AuthorizationHeader{{Name: "x-tenant", Values: []string{"a"}}},
			}},
		}},
	}
	wantProto(t, "web-readers", got, want)
	// In the operator's namespace, an empty selector picks every workload of the
	// mesh: the default deny.
	wantProto(t, "deny-all", authz(t, v.View, "ferry-system/deny-all"),
		&ferryv1.AuthorizationPolicy{Name: "ferry-system/deny-all", Action: "Allow", Workloads: []string{"uid-api-1", "uid-web-1"}})
	if p := authz(t, v.View, "shop/nobody"); p != nil {
		t.Fatalf("a policy selecting nothing is sent: %v", p)
	}
	cs := configStatus(t, v.View, "AuthorizationPolicy ferry-system/deny-all")
	if c := condition(cs, "Accepted"); !c.Status || !strings.Contains(c.Message, "enforced on 2 workloads") {
		t.Fatalf("status %v", cs)
	}
}

func TestAuthorizationPolicyRejected(t *testing.T) {
	for _, tc := range []struct{ spec, field string }{
		{`{action: Maybe}`, "spec.action"},
		{`{rules: [{from: [{identities: ["*a*"]}]}]}`, "spec.rules[0].from[0].identities[0]"},
		{`{rules: [{from: [{identities: [sa/web]}]}]}`, "spec.rules[0].from[0].identities[0]"},
		{`{rules: [{from: [{notNamespaces: ["a/b"]}]}]}`, "spec.rules[0].from[0].notNamespaces[0]"},
		{`{rules: [{from: [{ipBlocks: [10.0.0.0/33]}]}]}`, "spec.rules[0].from[0].ipBlocks[0]"},
		{`{rules: [{from: [{}]}, {to: [{ports: [0]}]}]}`, "spec.rules[1].to[0].ports[0]"},
		{`{rules: [{to: [{notPorts: [70000]}]}]}`, "spec.rules[0].to[0].notPorts[0]"},
		{`{rules: [{to: [{methods: [get]}]}]}`, "spec.rules[0].to[0].methods[0]"},
		{`{rules: [{to: [{paths: [admin]}]}]}`, "spec.rules[0].to[0].paths[0]"},
		{`{rules: [{to: [{paths: ["/a*b"]}]}]}`, "spec.rules[0].to[0].paths[0]"},
		{`{rules: [{to: [{hosts: ["a.*"]}]}]}`, "spec.rules[0].to[0].hosts[0]"},
		{`{rules: [{to: [{headers: [{name: "a b"}]}]}]}`, "spec.rules[0].to[0].headers[0].name"},
		{`{selector: {matchLabels: {"a b": c}}}`, "spec.selector.matchLabels"},
	} {
		t.Run(tc.field, func(t *testing.T) {
			logs, log := newLog()
			v := startViewLog(t, log, append(shop(), fromYAML(t, `
apiVersion: ferry.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: bad, namespace: shop}
spec: `+tc.spec)...)...)
			v.rebuild()
			if p := authz(t, v.View, "shop/bad"); p != nil {
				t.Fatalf("rejected policy in force: %v", p)
			}
			c := condition(configStatus(t, v.View, "AuthorizationPolicy shop/bad"), "Accepted")
			if c.Status || c.Reason != "Invalid" || !strings.HasPrefix(c.Message, tc.field+":") || !strings.HasSuffix(c.Message, "nothing of it applies") {
				t.Fatalf("condition %v", c)
			}
			if len(logs.lines("level=ERROR", "authorization policy rejected", "policy=shop/bad", "field="+tc.field)) != 1 {
				t.Fatalf("no log line naming the field:\n%s", logs)
			}
		})
	}
}

// A rejected generation leaves the last good one in force, and is logged once.
func TestAuthorizationPolicyLastGoodKept(t *testing.T) {
	logs, log := newLog()
	doc := func(gen, action string) *unstructured.Unstructured {
		return fromYAML(t, `
apiVersion: ferry.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-web, namespace: shop, generation: `+gen+`, annotations: {local.ferry.io/file: authz.yaml}}
spec:
  selector: {matchLabels: {app: web}}
  action: `+action+`
  rules: [{from: [{namespaces: [test]}]}]
`)[0].(*unstructured.Unstructured)
	}
	v := startViewLog(t, log, append(shop(), doc("1", "Deny"))...)
	v.rebuild()
	if p := authz(t, v.View, "shop/deny-web"); p == nil || p.Action != "Deny" {
		t.Fatalf("policy %v", p)
	}
	if _, err := v.policies.Resource(AuthorizationPolicyResource()).Namespace("shop").Update(context.Background(), doc("2", "Refuse"), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "generation 2 seen", func() bool {
		v.rebuild()
		return configStatus(t, v.View, "AuthorizationPolicy shop/deny-web").Generation == 2
	})
	v.rebuild()
	if p := authz(t, v.View, "shop/deny-web"); p == nil || p.Action != "Deny" || len(p.Workloads) != 1 {
		t.Fatalf("policy after a bad generation %v; want generation 1's Deny", p)
	}
	cs := configStatus(t, v.View, "AuthorizationPolicy shop/deny-web")
	if c := condition(cs, "Accepted"); cs.InForceGeneration != 1 || c.Status || cs.File != "authz.yaml" ||
		!strings.Contains(c.Message, `spec.action: "Refuse": not Allow, Deny or Audit; generation 1 stays in force`) {
		t.Fatalf("status %v", cs)
	}
	if n := len(logs.lines("level=ERROR", "authorization policy rejected", "policy=shop/deny-web", "in_force_generation=1")); n != 1 {
		t.Fatalf("%d log lines, want 1:\n%s", n, logs)
	}
	if err := v.policies.Resource(AuthorizationPolicyResource()).Namespace("shop").Delete(context.Background(), "deny-web", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the policy gone", func() bool {
		v.rebuild()
		return authz(t, v.View, "shop/deny-web") == nil
	})
}
