package controlplane

import (
	"cmp"
	"fmt"
	"slices"
	"strings"

	"github.com/ferrymesh/ferry/api/ferryv1"
)

// Merge applies the delta d to base, the full state of version d.base_version, and
// returns the full state of version d.version. base is not changed; entries that
// did not change are shared between the two. A full d is returned as it is.
func Merge(base, d *ferryv1.NodeState) (*ferryv1.NodeState, error) {
	if !d.GetDelta() {
		return d, nil
	}
	if base == nil || base.GetVersion() != d.GetBaseVersion() {
		return nil, fmt.Errorf("delta from version %d, but the stream's last state is version %d", d.GetBaseVersion(), base.GetVersion())
	}
	out := &ferryv1.NodeState{
		Version:        d.GetVersion(),
		Node:           d.GetNode(),
		TrustDomain:    d.GetTrustDomain(),
		TrustBundlePem: d.GetTrustBundlePem(),
		Certificates:   d.GetCertificates(),
		Mesh:           d.GetMesh(),
		ConfigStatus:   d.GetConfigStatus(),
		Authorization:  d.GetAuthorization(),
	}
	out.Workloads = mergeList(base.GetWorkloads(), d.GetWorkloads(), d.GetRemovedWorkloads(), (*ferryv1.Workload).GetUid,
		func(a, b *ferryv1.Workload) int {
			return compareJoined(a.GetNamespace(), a.GetName(), b.GetNamespace(), b.GetName())
		})
	out.Services = mergeList(base.GetServices(), d.GetServices(), d.GetRemovedServices(), func(s *ferryv1.Service) string { return s.GetNamespace() + "/" + s.GetName() },
		func(a, b *ferryv1.Service) int {
			return compareJoined(a.GetNamespace(), a.GetName(), b.GetNamespace(), b.GetName())
		})
	return out, nil
}

// mergeList is base without the removed keys, with changed replacing or adding
// entries by key, in the order compare gives (the operator's). base is in that
// order already, so only changed is sorted and the two are merged in one pass.
func mergeList[T any](base, changed []T, removed []string, key func(T) string, compare func(a, b T) int) []T {
	if len(changed) == 0 && len(removed) == 0 {
		return base
	}
	drop := make(map[string]bool, len(removed)+len(changed))
	for _, k := range removed {
		drop[k] = true
	}
	for _, m := range changed {
		drop[key(m)] = true
	}
	changed = slices.Clone(changed)
	slices.SortStableFunc(changed, compare)
	out := make([]T, 0, len(base)+len(changed))
	for _, m := range base {
		if drop[key(m)] {
			continue
		}
		for len(changed) > 0 && compare(changed[0], m) < 0 {
			out = append(out, changed[0])
			changed = changed[1:]
		}
		out = append(out, m)
	}
	return append(out, changed...)
}

// compareJoined compares aNS+"/"+aName with bNS+"/"+bName without building them.
func compareJoined(aNS, aName, bNS, bName string) int {
	switch {
	case aNS == bNS:
		return strings.Compare(aName, bName)
	case strings.HasPrefix(bNS, aNS):
		if c := bNS[len(aNS)]; c != '/' {
			return cmp.Compare('/', c)
		}
	case strings.HasPrefix(aNS, bNS):
		if c := aNS[len(bNS)]; c != '/' {
			return cmp.Compare(c, '/')
		}
	default:
		return strings.Compare(aNS, bNS)
	}
	return strings.Compare(aNS+"/"+aName, bNS+"/"+bName)
}
