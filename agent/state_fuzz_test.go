package agent

import (
	"testing"

	"github.com/ferrymesh/ferry/api/ferryv1"
	"google.golang.org/protobuf/proto"
)

// FuzzNodeState feeds the agent's state conversion arbitrary protobuf bytes, as a
// buggy or hostile stream could send them: it never panics, leaves entries out or
// takes them the same way twice and after a trip through the wire, and what it
// takes (a bad entry is left out, the rest taken) is well-formed for the proxy (valid unmapped addresses, ports in range, one
// port per Service port on every backend, no address on two workloads).
func FuzzNodeState(f *testing.F) {
	policy := &ferryv1.NodeState{Services: []*ferryv1.Service{{
		Name: "web", Namespace: "shop", ClusterIps: []string{"10.96.0.50"}, Ports: []*ferryv1.ServicePort{{Port: 80}},
		LoadBalancer: "RingHash",
		Backends:     []*ferryv1.Backend{{Pod: "web-1", Ips: []string{"10.1.1.10", "fd00::10"}, Ready: true, Ports: []uint32{8080}}},
		Policy: &ferryv1.ServicePolicy{
			Name: "shop/web", HashHeader: "x-user", MaxConnections: 10,
			OutlierDetection: &ferryv1.OutlierDetection{Consecutive_5Xx: 3, IntervalMs: 1000, BaseEjectionMs: 2000, MaxEjectionPercent: 50},
			Fault:            &ferryv1.Fault{AbortPercent: 10, AbortStatus: 503, DelayPercent: 50, DelayMs: 100},
			RetryBudget:      &ferryv1.RetryBudget{Percent: 20, MinRetriesPerSecond: 10, TtlMs: 10000},
			RateLimit:        &ferryv1.RateLimit{RequestsPerSecond: 100, Burst: 10},
			Retry:            &ferryv1.RouteRetry{Attempts: 2, Codes: []uint32{503}, BackoffMs: 10},
		},
	}}, Workloads: []*ferryv1.Workload{{Uid: "u1", Name: "web-1", Namespace: "shop", Node: "node1", Identity: "spiffe://cluster.local/ns/shop/sa/web", Ips: []string{"10.1.1.10"}}}}
	for _, st := range []*ferryv1.NodeState{routedState(), policy, {}} {
		b, err := proto.Marshal(st)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		st := &ferryv1.NodeState{}
		if err := proto.Unmarshal(b, st); err != nil {
			return
		}
		err := CheckState(st)
		if again := CheckState(st); (err == nil) != (again == nil) {
			t.Fatalf("the same state checked twice: %v, then %v", err, again)
		}
		wire, merr := proto.Marshal(st)
		if merr != nil {
			t.Fatalf("marshal a state that unmarshalled: %v", merr)
		}
		back := &ferryv1.NodeState{}
		if uerr := proto.Unmarshal(wire, back); uerr != nil {
			t.Fatalf("unmarshal a marshalled state: %v", uerr)
		}
		if again := CheckState(back); (err == nil) != (again == nil) {
			t.Fatalf("a state and its trip through the wire: %v, then %v", err, again)
		}
		// What is taken is well-formed whether or not entries were left out: a
		// bad entry is dropped, never half taken.
		ws, _ := workloads(st)
		owner := map[string]bool{}
		for _, w := range ws {
			for _, ip := range w.IPs {
				if !ip.IsValid() || ip.Is4In6() || owner[ip.String()] {
					t.Fatalf("workload %s: address %s taken", w.Name, ip)
				}
				owner[ip.String()] = true
			}
		}
		svcs, _ := services(st)
		for _, s := range svcs {
			for _, ip := range s.VIPs {
				if !ip.IsValid() || ip.Is4In6() {
					t.Fatalf("service %s: vip %s", s.Name, ip)
				}
			}
			for _, p := range s.Ports {
				if p.Port == 0 {
					t.Fatalf("service %s: port 0 taken", s.Name)
				}
			}
			for _, be := range s.Backends {
				if len(be.Ports) != len(s.Ports) {
					t.Fatalf("service %s: backend with %d ports for %d", s.Name, len(be.Ports), len(s.Ports))
				}
				for _, ip := range be.IPs {
					if !ip.IsValid() || ip.Is4In6() {
						t.Fatalf("service %s: backend ip %s", s.Name, ip)
					}
				}
			}
			if !s.LoadBalancer.Known() {
				t.Fatalf("service %s: load balancer %q taken", s.Name, s.LoadBalancer)
			}
		}
	})
}
