package agent

import (
	"net/netip"
	"reflect"
	"strings"
	"testing"

	"github.com/ferrymesh/ferry/agent/proxy"
	"github.com/ferrymesh/ferry/api/ferryv1"
	"google.golang.org/protobuf/proto"
)

func TestAuthorizationFromState(t *testing.T) {
	good := &ferryv1.NodeState{
		Workloads: []*ferryv1.Workload{{Uid: "ub", Name: "b", Namespace: "default", Node: "n1", Identity: "spiffe://cluster.local/ns/default/sa/b", Ips: []string{"10.1.1.11"}}},
		Authorization: []*ferryv1.AuthorizationPolicy{{
			Name: "default/b-in", Action: "Allow", Workloads: []string{"ub"},
			Rules: []*ferryv1.AuthorizationRule{{
				From: []*ferryv1.AuthorizationSource{{
					Identities: []string{"*/sa/a"}, NotIdentities: []string{"spiffe://cluster.local/ns/default/*"},
					Namespaces: []string{"default"}, NotNamespaces: []string{"test"},
					IpBlocks: []string{"10.1.0.0/16"}, NotIpBlocks: []string{"10.1.9.0/24"},
				}},
				To: []*ferryv1.AuthorizationOperation{{
					Ports: []uint32{8080}, NotPorts: []uint32{9090}, Methods: []string{"GET"}, Paths: []string{"/api/*"},
					Hosts: []string{"*.svc"}, Headers: []*ferryv1.AuthorizationHeader{{Name: "x-tenant", Values: []string{"a"}}},
				}},
			}},
		}},
	}
	got, err := authorization(good)
	if err != nil {
		t.Fatal(err)
	}
	want := []proxy.AuthzPolicy{{
		Name: "default/b-in", Action: proxy.AuthzAllow, Workloads: []string{"ub"},
		Rules: []proxy.AuthzRule{{
			From: []proxy.AuthzSource{{
				Identities: []string{"*/sa/a"}, NotIdentities: []string{"spiffe://cluster.local/ns/default/*"},
				Namespaces: []string{"default"}, NotNamespaces: []string{"test"},
				IPBlocks: []netip.Prefix{netip.MustParsePrefix("10.1.0.0/16")}, NotIPBlocks: []netip.Prefix{netip.MustParsePrefix("10.1.9.0/24")},
			}},
			To: []proxy.AuthzOperation{{
				Ports: []uint16{8080}, NotPorts: []uint16{9090}, Methods: []string{"GET"}, Paths: []string{"/api/*"},
				Hosts: []string{"*.svc"}, Headers: []proxy.AuthzHeader{{Name: "x-tenant", Values: []string{"a"}}},
			}},
		}},
	}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("converted\n%+v\nwant\n%+v", got, want)
	}
	for _, tc := range []struct {
		edit func(*ferryv1.AuthorizationPolicy)
		says string
	}{
		{func(p *ferryv1.AuthorizationPolicy) { p.Name = "" }, "a name is required"},
		{func(p *ferryv1.AuthorizationPolicy) { p.Action = "Maybe" }, `action "Maybe"`},
		{func(p *ferryv1.AuthorizationPolicy) { p.Workloads = []string{"gone"} }, `workload "gone" is not in the state`},
		{func(p *ferryv1.AuthorizationPolicy) { p.Rules[0].From[0].Identities = []string{"*a*"} }, `rules[0]: from[0]: identity "*a*"`},
		{func(p *ferryv1.AuthorizationPolicy) { p.Rules[0].From[0].NotIdentities = []string{"sa/a"} }, `identity "sa/a"`},
		{func(p *ferryv1.AuthorizationPolicy) { p.Rules[0].From[0].NotNamespaces = []string{"*"} }, `namespace "*"`},
		{func(p *ferryv1.AuthorizationPolicy) { p.Rules[0].From[0].IpBlocks = []string{"10.1.1.1/16"} }, "ip_blocks: 10.1.1.1/16 has bits past its length"},
		{func(p *ferryv1.AuthorizationPolicy) { p.Rules[0].From[0].NotIpBlocks = []string{"x"} }, "not_ip_blocks"},
		{func(p *ferryv1.AuthorizationPolicy) { p.Rules[0].To[0].Ports = []uint32{0} }, "to[0]: ports: port 0 out of range"},
		{func(p *ferryv1.AuthorizationPolicy) { p.Rules[0].To[0].NotPorts = []uint32{70000} }, "not_ports: port 70000"},
		{func(p *ferryv1.AuthorizationPolicy) { p.Rules[0].To[0].Methods = []string{"get"} }, `method "get"`},
		{func(p *ferryv1.AuthorizationPolicy) { p.Rules[0].To[0].Paths = []string{"/a*b"} }, `path "/a*b"`},
		{func(p *ferryv1.AuthorizationPolicy) { p.Rules[0].To[0].Hosts = []string{"A.svc"} }, `host "A.svc"`},
		{func(p *ferryv1.AuthorizationPolicy) { p.Rules[0].To[0].Headers[0].Name = "X-Tenant" }, `header "X-Tenant"`},
	} {
		st := proto.Clone(good).(*ferryv1.NodeState)
		tc.edit(st.Authorization[0])
		if _, err := authorization(st); err == nil || !strings.Contains(err.Error(), tc.says) {
			t.Errorf("error %v, want one saying %q", err, tc.says)
		}
	}
	dup := proto.Clone(good).(*ferryv1.NodeState)
	dup.Authorization = append(dup.Authorization, dup.Authorization[0])
	if _, err := authorization(dup); err == nil {
		t.Error("two policies of one name accepted")
	}
}
