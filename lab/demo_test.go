package lab

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/api/ferryv1"
)

// The demo's Services have cluster IPs of their own, and the route the demo
// applies names api-canary, which is one of them, over pods that run its server.
func TestDemoServicesAndRoute(t *testing.T) {
	ips := map[netip.Addr]string{}
	for _, s := range DemoServices {
		if other, ok := ips[s.ClusterIP]; ok {
			t.Errorf("%s and %s share cluster IP %s", s.Name, other, s.ClusterIP)
		}
		ips[s.ClusterIP] = s.Name
	}
	refs, err := configRefs(fmt.Sprintf(demoRoute, 3))
	if err != nil {
		t.Fatal(err)
	}
	if len(refs) != 1 || refs[0] != (ConfigRef{Kind: "HTTPRoute", Name: "default/" + demoCanary}) {
		t.Fatalf("the demo's manifest holds %v, want HTTPRoute default/%s", refs, demoCanary)
	}
	var canary *ServiceConfig
	for i := range DemoServices {
		if DemoServices[i].Name == demoCanary {
			canary = &DemoServices[i]
		}
	}
	if canary == nil || canary.TargetPort != DemoCanaryPort || len(canary.Pods) == 0 {
		t.Fatalf("DemoServices' %s: %+v, want pods on port %d", demoCanary, canary, DemoCanaryPort)
	}
}

// The status line reads as `ferry agent routes` lists a route, with when each
// agent applied it, nodes in order.
func TestConfigStatusLine(t *testing.T) {
	c := &ferryv1.ConfigStatus{
		Kind: "HTTPRoute", Name: "default/api-canary", File: "demo-api-canary.yaml", Generation: 1,
		Targets: []string{"default/api"},
		Conditions: []*ferryv1.Condition{
			{Type: "Accepted", Status: true, Reason: "Accepted"}, {Type: "ResolvedRefs", Status: false, Reason: "BackendNotFound"},
		},
	}
	got := configStatusLine(c, Applied{"node2": 91400 * time.Microsecond, "node1": 80 * time.Millisecond})
	want := "HTTPRoute default/api-canary (file demo-api-canary.yaml, generation 1) → default/api: Accepted True, ResolvedRefs False; applied on node1 after 80ms, node2 after 91ms"
	if got != want {
		t.Errorf("got  %s\nwant %s", got, want)
	}
}
