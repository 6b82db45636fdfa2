package mesh

// PeerAuthentication in the mesh view: each one is checked and compiled whole (a
// bad one is rejected naming the field, its last good generation staying in
// force), then every enrolled workload gets the mode of the most specific one that
// applies to it: one whose selector picks it, else its namespace's without a
// selector, else the mesh-wide one (the operator's namespace, no selector). An
// empty mode is taken from the next less specific one; per-port overrides come
// from the workload-level one. The agents enforce STRICT in the kernel.

import (
	"cmp"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/ferrymesh/ferry/api/ferryv1"
	"github.com/ferrymesh/ferry/api/v1alpha1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic/dynamicinformer"
)

// KindPeerAuthentication is its kind in ConfigStatus.
const KindPeerAuthentication = "PeerAuthentication"

// PeerAuthenticationResource is where PeerAuthentications are served
// (ferry.io/v1alpha1 peerauthentications).
func PeerAuthenticationResource() schema.GroupVersionResource {
	return v1alpha1.GroupVersion().WithResource("peerauthentications")
}

// WatchPeerAuthentications makes the view read PeerAuthentications from
// factory's informer (start the factory after). One in rootNamespace (the
// operator's) without a selector sets the mesh-wide mode.
func (v *View) WatchPeerAuthentications(factory dynamicinformer.DynamicSharedInformerFactory, rootNamespace string) error {
	return v.watchRooted(factory, PeerAuthenticationResource(), "peer authentications", rootNamespace, &v.peerAuthn)
}

// peerAuthnSpec is a PeerAuthentication that compiled. A nil selector is a
// namespace-wide (or, in the root namespace, mesh-wide) one.
type peerAuthnSpec struct {
	selector labels.Selector
	mode     v1alpha1.MTLSMode            // "" inherits
	ports    map[uint32]v1alpha1.MTLSMode // workload level only
}

// peerAuthn is one PeerAuthentication in force, in the order that breaks ties.
type peerAuthn struct {
	key     configKey
	created int64 // creation time, Unix seconds
	spec    *peerAuthnSpec
	status  *ferryv1.ConfigStatus
	targets int
}

// peerAuthentications compiles every PeerAuthentication, sets the mode of each
// workload of byNS, and appends each one's ConfigStatus to statuses.
func (v *View) peerAuthentications(byNS map[string][]enrolledPod, statuses *[]*ferryv1.ConfigStatus) error {
	v.mu.Lock()
	lister, root := v.peerAuthn, v.rootNamespace
	v.mu.Unlock()
	if lister == nil {
		return nil
	}
	objs, err := lister.List(labels.Everything())
	if err != nil {
		return fmt.Errorf("list peer authentications: %w", err)
	}
	seen := map[configKey]bool{}
	var inForce []*peerAuthn
	for _, o := range objs {
		u, ok := o.(*unstructured.Unstructured)
		if !ok {
			continue
		}
		key := configKey{kind: KindPeerAuthentication, namespace: u.GetNamespace(), name: u.GetName()}
		seen[key] = true
		name := u.GetNamespace() + "/" + u.GetName()
		cs := &ferryv1.ConfigStatus{Kind: KindPeerAuthentication, Name: name, File: u.GetAnnotations()[FileAnnotation], Generation: uint64(max(u.GetGeneration(), 0))}
		*statuses = append(*statuses, cs)
		pa := &v1alpha1.PeerAuthentication{}
		var spec *peerAuthnSpec
		var bad *authzRejection
		// Through JSON, not the unstructured converter: that cannot read
		// portLevelMtls's port numbers, which JSON carries as object keys.
		if err := fromUnstructuredJSON(u, pa); err != nil {
			bad = &authzRejection{field: "spec", err: err.Error()}
		} else {
			spec, bad = compilePeerAuthentication(pa)
		}
		spec, ok = v.goodPeerAuthn.settle(v.log, "peer authentication", key, u.GetGeneration(), cs, spec, bad)
		if ok {
			p := &peerAuthn{key: key, created: u.GetCreationTimestamp().Unix(), spec: spec}
			if bad == nil {
				p.status = cs
			}
			inForce = append(inForce, p)
		}
	}
	v.goodPeerAuthn.prune(seen)
	// The oldest of equally specific ones wins (Istio's rule): try them in that order.
	slices.SortFunc(inForce, func(a, b *peerAuthn) int {
		return cmp.Or(cmp.Compare(a.created, b.created), strings.Compare(a.key.namespace, b.key.namespace), strings.Compare(a.key.name, b.key.name))
	})
	var mesh *peerAuthn
	nsWide := map[string]*peerAuthn{}
	for _, p := range inForce {
		if p.spec.selector != nil {
			continue
		}
		if p.key.namespace == root && mesh == nil {
			mesh = p
		}
		if _, ok := nsWide[p.key.namespace]; !ok && p.key.namespace != root {
			nsWide[p.key.namespace] = p
		}
	}
	for ns, pods := range byNS {
		for _, pod := range pods {
			var workload *peerAuthn
			for _, p := range inForce {
				if p.spec.selector != nil && p.key.namespace == ns && p.spec.selector.Matches(pod.labels) {
					workload = p
					break
				}
			}
			var mode v1alpha1.MTLSMode
			// In the root namespace the mesh-wide one is the namespace's too.
			for _, p := range []*peerAuthn{mesh, nsWide[ns], workload} {
				if p == nil {
					continue
				}
				p.targets++
				if p.spec.mode != "" {
					mode = p.spec.mode
				}
			}
			pod.w.MtlsMode = string(mode)
			if workload != nil && len(workload.spec.ports) > 0 {
				pod.w.PortMtlsModes = map[uint32]string{}
				for port, m := range workload.spec.ports {
					pod.w.PortMtlsModes[port] = string(m)
				}
			}
		}
	}
	for _, p := range inForce {
		if p.status == nil {
			continue
		}
		msg := fmt.Sprintf("decides the mTLS mode of %d workloads", p.targets)
		switch {
		case p.spec.selector == nil && p.key.namespace == root && mesh == p:
			msg += " (mesh-wide: the operator's namespace, no selector)"
		case p.spec.selector == nil && p.key.namespace == root:
			msg = "an older mesh-wide PeerAuthentication wins; this one decides nothing"
		case p.spec.selector == nil && p.key.namespace != root && nsWide[p.key.namespace] != p:
			msg = "an older namespace-wide PeerAuthentication of this namespace wins; this one decides nothing"
		}
		p.status.Conditions = []*ferryv1.Condition{{Type: CondAccepted, Status: true, Reason: reasonAccepted, Message: msg}}
	}
	return nil
}

func fromUnstructuredJSON(u *unstructured.Unstructured, out any) error {
	b, err := u.MarshalJSON()
	if err != nil {
		return err
	}
	return json.Unmarshal(b, out)
}

// compilePeerAuthentication checks pa, or names the first field the agents could
// not enforce as written. The CRD's schema checks part of the same in a cluster;
// local mode has no schema.
func compilePeerAuthentication(pa *v1alpha1.PeerAuthentication) (*peerAuthnSpec, *authzRejection) {
	validMode := func(m v1alpha1.MTLSMode) bool { return m == v1alpha1.MTLSPermissive || m == v1alpha1.MTLSStrict }
	spec := &peerAuthnSpec{mode: pa.Spec.MTLS.Mode}
	if spec.mode != "" && !validMode(spec.mode) {
		return nil, &authzRejection{field: "spec.mtls.mode", value: string(spec.mode), err: "not Permissive or Strict"}
	}
	if s := pa.Spec.Selector; s != nil && len(s.MatchLabels) > 0 {
		sel, err := labels.ValidatedSelectorFromSet(s.MatchLabels)
		if err != nil {
			return nil, &authzRejection{field: "spec.selector.matchLabels", err: err.Error()}
		}
		spec.selector = sel
	}
	if len(pa.Spec.PortLevelMTLS) > 0 && spec.selector == nil {
		return nil, &authzRejection{field: "spec.portLevelMtls", err: "needs a selector (per-port modes are for the selected workloads only)"}
	}
	for _, port := range slices.Sorted(maps.Keys(pa.Spec.PortLevelMTLS)) {
		m := pa.Spec.PortLevelMTLS[port]
		field := fmt.Sprintf("spec.portLevelMtls[%d]", port)
		if port < 1 || port > 65535 {
			return nil, &authzRejection{field: field, err: "not a port from 1 to 65535"}
		}
		if !validMode(m.Mode) {
			return nil, &authzRejection{field: field + ".mode", value: string(m.Mode), err: "not Permissive or Strict"}
		}
		if spec.ports == nil {
			spec.ports = map[uint32]v1alpha1.MTLSMode{}
		}
		spec.ports[port] = m.Mode
	}
	return spec, nil
}
