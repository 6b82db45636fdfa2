package server

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/ferrymesh/ferry/agent/controlplane"
	"github.com/ferrymesh/ferry/api/ferryv1"
	"github.com/ferrymesh/ferry/operator/mesh"
	"google.golang.org/protobuf/proto"
)

// randomSnapshot is a snapshot of up to n workloads and services drawn from a
// small universe, so successive ones share, change and drop entries.
func randomSnapshot(r *rand.Rand, version uint64, n int) *mesh.Snapshot {
	s := &mesh.Snapshot{Version: version}
	for i := range n {
		if r.IntN(3) == 0 {
			continue
		}
		// Namespaces "a" and "a-b" sort differently by namespace then name than by
		// "namespace/name", the operator's order.
		ns := []string{"a", "a-b", "b"}[i%3]
		s.Workloads = append(s.Workloads, &ferryv1.Workload{Uid: fmt.Sprintf("uid-%d", i), Name: fmt.Sprintf("p%d", i), Namespace: ns, Ips: []string{fmt.Sprintf("10.0.0.%d", r.IntN(3))}})
		s.Services = append(s.Services, &ferryv1.Service{Name: fmt.Sprintf("s%d", i), Namespace: ns, Endpoints: []string{fmt.Sprintf("uid-%d", r.IntN(n))}})
	}
	slices.SortFunc(s.Workloads, func(a, b *ferryv1.Workload) int {
		return strings.Compare(a.Namespace+"/"+a.Name, b.Namespace+"/"+b.Name)
	})
	slices.SortFunc(s.Services, func(a, b *ferryv1.Service) int {
		return strings.Compare(a.Namespace+"/"+a.Name, b.Namespace+"/"+b.Name)
	})
	return s
}

func full(s *mesh.Snapshot) *ferryv1.NodeState {
	return &ferryv1.NodeState{Version: s.Version, Node: "n", Workloads: s.Workloads, Services: s.Services}
}

// A chain of deltas merged by the agent's client equals each full snapshot, and
// a delta carries only what changed.
func TestDeltasMergeToFullState(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	var c deltas
	prev := randomSnapshot(r, 1, 40)
	have := full(prev)
	for v := uint64(2); v < 200; v++ {
		next := randomSnapshot(r, v, 40)
		d := c.get(prev, next)
		msg := &ferryv1.NodeState{Version: v, Node: "n", Delta: true, BaseVersion: prev.Version,
			Workloads: d.workloads, Services: d.services, RemovedWorkloads: d.removedWorkloads, RemovedServices: d.removedServices}
		got, err := controlplane.Merge(have, msg)
		if err != nil {
			t.Fatal(err)
		}
		if want := full(next); !proto.Equal(got, want) {
			t.Fatalf("version %d: merged delta\n%v\nwant\n%v", v, got, want)
		}
		if len(d.workloads)+len(d.removedWorkloads) > len(next.Workloads)+len(prev.Workloads) {
			t.Fatalf("version %d: delta larger than both states", v)
		}
		if c.get(prev, next) != d {
			t.Fatal("the same delta was computed twice")
		}
		have, prev = got, next
	}
	// Unchanged: an empty delta.
	same := &mesh.Snapshot{Version: prev.Version + 1, Workloads: prev.Workloads, Services: prev.Services}
	if d := c.get(prev, same); len(d.workloads)+len(d.services)+len(d.removedWorkloads)+len(d.removedServices) != 0 {
		t.Fatalf("delta between equal states: %+v", d)
	}
	// A delta from another version than the one held is refused.
	if _, err := controlplane.Merge(have, &ferryv1.NodeState{Version: 9999, Delta: true, BaseVersion: 5}); err == nil {
		t.Fatal("delta from a version the client does not hold was merged")
	}
}
