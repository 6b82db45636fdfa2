package server

import (
	"sync"

	"github.com/ferrymesh/ferry/api/ferryv1"
	"github.com/ferrymesh/ferry/operator/mesh"
	"google.golang.org/protobuf/proto"
)

// delta is what changed in the workloads and services between two snapshots.
// Every stream that last sent the same version gets the same delta, so it is
// computed once (deltas) and shared read-only.
type delta struct {
	from, to         uint64
	workloads        []*ferryv1.Workload
	services         []*ferryv1.Service
	removedWorkloads []string
	removedServices  []string
}

// deltas computes each delta once for every stream that needs it. It keeps the
// deltas into the newest snapshot only: streams are at most a few versions apart.
type deltas struct {
	mu   sync.Mutex
	to   uint64
	byFr map[uint64]*deltaOnce
}

type deltaOnce struct {
	once sync.Once
	d    *delta
}

func (c *deltas) get(from, to *mesh.Snapshot) *delta {
	c.mu.Lock()
	if c.to != to.Version {
		c.to, c.byFr = to.Version, map[uint64]*deltaOnce{}
	}
	e := c.byFr[from.Version]
	if e == nil {
		e = &deltaOnce{}
		c.byFr[from.Version] = e
	}
	c.mu.Unlock()
	e.once.Do(func() { e.d = diff(from, to) })
	return e.d
}

func serviceKey(s *ferryv1.Service) string { return s.GetNamespace() + "/" + s.GetName() }

// diff returns the workloads and services of to that are new or differ from from,
// and the keys of those from has and to has not.
func diff(from, to *mesh.Snapshot) *delta {
	d := &delta{from: from.Version, to: to.Version}
	d.workloads, d.removedWorkloads = diffList(from.Workloads, to.Workloads, (*ferryv1.Workload).GetUid)
	d.services, d.removedServices = diffList(from.Services, to.Services, serviceKey)
	return d
}

func diffList[T proto.Message](from, to []T, key func(T) string) (changed []T, removed []string) {
	old := make(map[string]T, len(from))
	for _, m := range from {
		old[key(m)] = m
	}
	for _, m := range to {
		k := key(m)
		prev, ok := old[k]
		delete(old, k)
		if ok && (any(prev) == any(m) || proto.Equal(prev, m)) {
			continue
		}
		changed = append(changed, m)
	}
	for _, m := range from {
		if _, gone := old[key(m)]; gone {
			removed = append(removed, key(m))
		}
	}
	return changed, removed
}
