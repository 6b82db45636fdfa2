package mesh

// TrafficPolicy in the mesh view: which policy applies to each Service, and the
// Service fields it sets (today the load balancer). The policies come from a
// dynamic informer, so the view reads them the same way whether the store is a
// cluster's API server or local mode's in-memory client.

import (
	"cmp"
	"fmt"
	"slices"
	"strings"

	"github.com/ferrymesh/ferry/api/ferryv1"
	"github.com/ferrymesh/ferry/api/v1alpha1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic/dynamicinformer"
)

// TrafficPolicyResource is where TrafficPolicies are served (ferry.io/v1alpha1
// trafficpolicies), for the informer here and local mode's in-memory store.
func TrafficPolicyResource() schema.GroupVersionResource {
	return v1alpha1.GroupVersion().WithResource("trafficpolicies")
}

// proxyLoadBalancer says whether the agent's proxy implements a load balancer
// (agent/proxy.LoadBalancer.Known): an agent rejects a whole state naming another,
// so the operator never sends one.
func proxyLoadBalancer(t v1alpha1.LoadBalancerType) bool {
	switch t {
	case "", v1alpha1.LoadBalancerP2CEWMA, v1alpha1.LoadBalancerRoundRobin, v1alpha1.LoadBalancerRandom, v1alpha1.LoadBalancerLeastRequest:
		return true
	}
	return false
}

// proxyLoadBalancers lists them for messages.
const proxyLoadBalancers = "P2CEWMA, RoundRobin, Random, LeastRequest"

// WatchTrafficPolicies makes the view read TrafficPolicies from factory's informer;
// start the factory after. Called before Run, the first snapshot waits for them;
// called later (the CRD was installed after the operator started), the view is
// rebuilt as they arrive.
func (v *View) WatchTrafficPolicies(factory dynamicinformer.DynamicSharedInformerFactory) error {
	inf := factory.ForResource(TrafficPolicyResource())
	if _, err := inf.Informer().AddEventHandler(v.handler()); err != nil {
		return fmt.Errorf("mesh view: traffic policies: %w", err)
	}
	v.mu.Lock()
	v.policies = inf.Lister()
	if !v.running {
		v.synced = append(v.synced, inf.Informer().HasSynced)
	}
	v.mu.Unlock()
	v.markDirty()
	return nil
}

// policyNote is something a user should hear about a TrafficPolicy: which Service
// it applies to, or why it does not.
type policyNote struct {
	level   noteLevel
	policy  string // namespace/name
	service string // namespace/name, when the note is about one Service
	field   string // spec path of the offending field
	value   string
	winner  string // the policy that applies instead
	lb      string
	err     string
}

type noteLevel int

const (
	noteApplied noteLevel = iota
	noteConflict
	noteRejected
)

func (n policyNote) log(v *View) {
	switch n.level {
	case noteApplied:
		v.log.Info("traffic policy applied", "policy", n.policy, "service", n.service, "load_balancer", n.lb)
	case noteConflict:
		v.log.Warn("traffic policy not applied: an older policy targets the same service", "policy", n.policy, "service", n.service, "applied", n.winner)
	case noteRejected:
		v.log.Error("traffic policy rejected; it applies to none of its services", "policy", n.policy, "field", n.field, "value", n.value, "error", n.err)
	}
}

// trafficPolicies decides which TrafficPolicy applies to each Service of ns (by
// Service name) and adds to notes what the user should be told. A policy that
// cannot be applied whole is rejected whole and takes no part in conflicts;
// among the others the oldest (creationTimestamp, then name) wins each Service,
// as Gateway API resolves conflicting policies.
func (v *View) trafficPolicies(ns string, notes *[]policyNote) (map[string]*v1alpha1.TrafficPolicy, error) {
	v.mu.Lock()
	lister := v.policies
	v.mu.Unlock()
	if lister == nil {
		return nil, nil
	}
	objs, err := lister.ByNamespace(ns).List(labels.Everything())
	if err != nil {
		return nil, fmt.Errorf("list traffic policies: %w", err)
	}
	byService := map[string][]*v1alpha1.TrafficPolicy{}
	for _, o := range objs {
		u, ok := o.(*unstructured.Unstructured)
		if !ok {
			continue
		}
		tp := &v1alpha1.TrafficPolicy{}
		name := u.GetNamespace() + "/" + u.GetName()
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, tp); err != nil {
			*notes = append(*notes, policyNote{level: noteRejected, policy: name, field: "spec", err: err.Error()})
			continue
		}
		if n := checkTrafficPolicy(tp); n != nil {
			n.policy = name
			*notes = append(*notes, *n)
			continue
		}
		for _, ref := range tp.Spec.TargetRefs {
			if !slices.Contains(byService[ref.Name], tp) {
				byService[ref.Name] = append(byService[ref.Name], tp)
			}
		}
	}
	out := map[string]*v1alpha1.TrafficPolicy{}
	for svc, tps := range byService {
		slices.SortFunc(tps, func(a, b *v1alpha1.TrafficPolicy) int {
			if c := a.CreationTimestamp.Compare(b.CreationTimestamp.Time); c != 0 {
				return c
			}
			return strings.Compare(a.Name, b.Name)
		})
		out[svc] = tps[0]
		for _, tp := range tps[1:] {
			*notes = append(*notes, policyNote{level: noteConflict, policy: ns + "/" + tp.Name, service: ns + "/" + svc, winner: ns + "/" + tps[0].Name})
		}
	}
	return out, nil
}

// checkTrafficPolicy says why tp cannot be applied as a whole, or nil. The CRD's
// schema checks the same in a cluster; local mode has no schema.
func checkTrafficPolicy(tp *v1alpha1.TrafficPolicy) *policyNote {
	if len(tp.Spec.TargetRefs) == 0 {
		return &policyNote{level: noteRejected, field: "spec.targetRefs", err: "names no Service"}
	}
	for i, ref := range tp.Spec.TargetRefs {
		field := fmt.Sprintf("spec.targetRefs[%d]", i)
		switch {
		case ref.Group != "" && ref.Group != "core":
			return &policyNote{level: noteRejected, field: field + ".group", value: ref.Group, err: `a Service's group is "" (core)`}
		case ref.Kind != "Service":
			return &policyNote{level: noteRejected, field: field + ".kind", value: ref.Kind, err: "only Services can be targeted"}
		case ref.Name == "":
			return &policyNote{level: noteRejected, field: field + ".name", err: "required"}
		}
	}
	if lb := tp.Spec.LoadBalancer; lb != nil && !proxyLoadBalancer(lb.Type) {
		return &policyNote{level: noteRejected, field: "spec.loadBalancer.type", value: string(lb.Type),
			err: "not implemented by the proxy (it has " + proxyLoadBalancers + ")"}
	}
	return nil
}

// applyTrafficPolicy sets what tp says on fs, and notes it.
func applyTrafficPolicy(fs *ferryv1.Service, tp *v1alpha1.TrafficPolicy, notes *[]policyNote) {
	if lb := tp.Spec.LoadBalancer; lb != nil {
		fs.LoadBalancer = string(lb.Type)
	}
	*notes = append(*notes, policyNote{level: noteApplied, policy: fs.Namespace + "/" + tp.Name, service: fs.Namespace + "/" + fs.Name,
		lb: cmp.Or(fs.LoadBalancer, string(v1alpha1.LoadBalancerP2CEWMA))})
}

// logNotes logs the notes not logged by the previous rebuild, so a policy is
// reported when what happens to it changes, not on every pod event.
func (v *View) logNotes(notes []policyNote) {
	slices.SortFunc(notes, func(a, b policyNote) int {
		return cmp.Or(strings.Compare(a.policy, b.policy), strings.Compare(a.service, b.service), cmp.Compare(a.level, b.level))
	})
	seen := make(map[policyNote]bool, len(notes))
	for _, n := range notes {
		seen[n] = true
		if !v.logged[n] {
			n.log(v)
		}
	}
	v.logged = seen
}
