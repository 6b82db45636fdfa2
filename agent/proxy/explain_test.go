package proxy

import (
	"errors"
	"net/netip"
	"testing"

	"github.com/ferrymesh/ferry/api/admin"
	"github.com/ferrymesh/ferry/api/mesh"
)

// Explain says what enforcement does: the route's endpoints, how each is
// reached, and the deciding policy and rule of each endpoint's policies, per
// connection or, at L7, per request on the normalised path.
func TestExplain(t *testing.T) {
	tp := newTestProxy(t)
	svc := web
	svc.Ports = []ServicePort{{Port: 80, AppProtocol: "http"}, {Port: 9000}}
	svc.Backends = svc.Backends[:2] // b (this node) and c (node2)
	tp.SetServices([]Service{svc})
	tp.SetPathOptions(PathOptions{EscapedSlashes: mesh.EscapedDecode, CaseInsensitive: true})
	tp.SetAuthorization([]AuthzPolicy{
		{Name: "default/no-admin", Action: AuthzDeny, Workloads: []string{"ub", "uc"},
			Rules: []AuthzRule{{To: []AuthzOperation{{Ports: []uint16{9}}}}, {To: []AuthzOperation{{Paths: []string{"/admin"}}}}}},
		{Name: "default/c-from-a", Action: AuthzAllow, Workloads: []string{"uc"},
			Rules: []AuthzRule{{From: []AuthzSource{{Identities: []string{wa.Identity}}}}}},
	})

	// L4 to c's address: c's Allow matches a (rule 0); the Deny's path rule
	// refuses the whole connection, as enforcement's stricter reading does.
	ex, err := tp.Explain(admin.ExplainQuery{Src: "default/a", Dst: "10.1.2.10:8081"})
	if err != nil {
		t.Fatal(err)
	}
	if ex.Destination.Kind != "pod" || len(ex.Decisions) != 1 || ex.Source.Identity != wa.Identity {
		t.Fatalf("explain %+v", ex)
	}
	if v := ex.Decisions[0].Verdict; v.Allowed || v.Policy != "default/no-admin" || v.Rule != 1 || ex.Decisions[0].Level != "connection" {
		t.Fatalf("L4 to c: %+v", ex.Decisions[0])
	}

	// L7 through the Service: each endpoint decides the request.
	ex, err = tp.Explain(admin.ExplainQuery{Src: "default/a", Dst: "web.default.svc.cluster.local:80", Method: "GET", Path: "/x/%2e%2e/ADMIN"})
	if err != nil {
		t.Fatal(err)
	}
	if !ex.Route.L7 || ex.Route.Service != "default/web" || len(ex.Decisions) != 2 {
		t.Fatalf("L7 explain %+v", ex)
	}
	for _, d := range ex.Decisions {
		if d.Verdict.Allowed || d.Verdict.Policy != "default/no-admin" || d.Verdict.Rule != 1 || d.Verdict.Path != "/ADMIN" || d.Level != "request" {
			t.Fatalf("request to %s: %+v", d.Pod, d)
		}
	}
	ex, err = tp.Explain(admin.ExplainQuery{Src: "default/a", Dst: netip.AddrPortFrom(vip, 80).String(), Method: "GET", Path: "/ok"})
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range ex.Decisions {
		wantPolicy, wantRule := "", -1
		if d.Pod == "default/c" {
			wantPolicy, wantRule = "default/c-from-a", 0
		}
		if !d.Verdict.Allowed || d.Verdict.Policy != wantPolicy || d.Verdict.Rule != wantRule {
			t.Fatalf("GET /ok to %s: %+v", d.Pod, d.Verdict)
		}
	}

	// From outside the mesh, in plaintext: c's Allow wants a's identity.
	ex, err = tp.Explain(admin.ExplainQuery{Src: "10.1.3.7", Dst: "10.1.2.10:8081"})
	if err != nil {
		t.Fatal(err)
	}
	if v := ex.Decisions[0]; v.Caller != "" || v.Verdict.Allowed || v.Verdict.Policy != "default/no-admin" {
		t.Fatalf("plaintext to c: %+v", v)
	}

	var ee *admin.ExplainError
	for _, q := range []admin.ExplainQuery{{Src: "default/zz", Dst: "10.1.2.10:80"}, {Src: "default/a", Dst: "nope.default:80"}, {Src: "default/a", Dst: "10.1.2.10"}} {
		if _, err := tp.Explain(q); !errors.As(err, &ee) {
			t.Errorf("%+v: %v, want an ExplainError", q, err)
		}
	}
}
