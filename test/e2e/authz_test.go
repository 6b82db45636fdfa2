package e2e

// AuthorizationPolicy end to end, on a lab of its own (prefix "az", pods in
// 10.110.0.0/16) with the operator in local mode: a Deny written to its folder
// stops a→c across nodes, the client sees a reset, and c's agent records a denied
// flow that names the policy; removing the policy lets a through again.

import (
	"context"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/api/admin"
	"github.com/ferrymesh/ferry/lab"
)

const (
	azPrefix = "az"
	azPodNet = 110
)

var azLab = onceLab{what: "authorization lab", bringUp: azBringUp}

func azBringUp() (*env, error) {
	cfg := lab.Config{
		Prefix: azPrefix,
		PodNet: azPodNet,
		Nodes: []lab.NodeConfig{
			{Name: "node1", Pods: []lab.PodConfig{
				{Name: "a", Namespace: "shop", ServiceAccount: "web", Enrolled: true},
				{Name: "b", Namespace: "shop", ServiceAccount: "api", Enrolled: true},
			}},
			{Name: "node2", Pods: []lab.PodConfig{
				{Name: "c", Namespace: "shop", ServiceAccount: "db", Enrolled: true},
			}},
		},
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	e, err := newEnv(ctx, cfg, "ferry", "ferry-agent", "ferry-operator")
	if err != nil {
		return nil, err
	}
	if err := e.startServer(ctx, "c", echoPort); err != nil {
		return e.fail(err)
	}
	return e, nil
}

func TestAuthorizationDenyAcrossNodes(t *testing.T) {
	e := azLab.get(t)
	e.waitEnrolled(t, "node1", "shop/a", "shop/b")
	e.waitEnrolled(t, "node2", "shop/c")
	a := e.pod("a")
	e.mustRun(t, "a", "echo", e.addr("c", echoPort), "4096")

	since := time.Now()
	e.apply(t, "deny-web.yaml", `apiVersion: ferry.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-web, namespace: shop, generation: {gen}}
spec:
  action: Deny
  rules:
  - from: [{identities: ["*/sa/web"]}]
    to: [{ports: [`+strconv.Itoa(echoPort)+`]}]
`)
	if cs := e.configStatus(t, "node2", "AuthorizationPolicy shop/deny-web"); len(cs.GetConditions()) == 0 || !cs.GetConditions()[0].GetStatus() {
		t.Fatalf("status %v", cs)
	}
	e.mustRun(t, "a", "refused", e.addr("c", echoPort))
	in := e.findConn(t, "node2", func(c connRecord) bool {
		return c.Direction == admin.Inbound && c.Src.Addr() == a.IP && c.End.After(since) && c.Verdict == admin.VerdictDenied
	})
	if in.Reason != admin.ReasonPolicy || in.Policy != "shop/deny-web" || in.Status != 403 || in.SrcIdentity != a.Identity {
		t.Fatalf("node2's record of the denied stream: %+v", in)
	}
	out := e.findConn(t, "node1", func(c connRecord) bool {
		return c.Direction == admin.Outbound && c.Src.Addr() == a.IP && c.End.After(since) && c.Verdict == admin.VerdictDenied
	})
	if out.Reason != admin.ReasonPolicy || out.Policy != "shop/deny-web" {
		t.Fatalf("node1's record of the refused connection: %+v", out)
	}
	// b's identity is not the policy's.
	e.mustRun(t, "b", "echo", e.addr("c", echoPort), "4096")
	if m := e.scrape(t, "node2"); !strings.Contains(m, `ferry_authorization_decisions_total{action="deny",policy="shop/deny-web"} `) {
		t.Fatalf("no deny counted:\n%s", grepLines(m, "ferry_authorization"))
	}

	e.unapply(t, "deny-web.yaml")
	e.mustRun(t, "a", "echo", e.addr("c", echoPort), "4096")
}

func grepLines(text, substr string) string {
	var out []string
	for _, l := range strings.Split(text, "\n") {
		if strings.Contains(l, substr) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
