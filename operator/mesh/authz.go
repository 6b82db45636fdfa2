package mesh

// AuthorizationPolicy in the mesh view: each policy is checked and compiled whole
// (a policy that cannot be enforced as written is rejected, its last good
// generation staying in force), then given the workloads its selector picks. The
// policies come from a dynamic informer, as TrafficPolicies do.

import (
	"cmp"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"

	"github.com/ferrymesh/ferry/api/ferryv1"
	"github.com/ferrymesh/ferry/api/v1alpha1"
	"golang.org/x/net/http/httpguts"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/tools/cache"
)

// KindAuthorizationPolicy is its kind in ConfigStatus.
const KindAuthorizationPolicy = "AuthorizationPolicy"

// AuthorizationPolicyResource is where AuthorizationPolicies are served
// (ferry.io/v1alpha1 authorizationpolicies).
func AuthorizationPolicyResource() schema.GroupVersionResource {
	return v1alpha1.GroupVersion().WithResource("authorizationpolicies")
}

// WatchAuthorizationPolicies makes the view read AuthorizationPolicies from
// factory's informer (start the factory after). A policy in rootNamespace (the
// operator's) selects workloads in every namespace, so one there with no selector
// and no rules is the mesh-wide default deny.
func (v *View) WatchAuthorizationPolicies(factory dynamicinformer.DynamicSharedInformerFactory, rootNamespace string) error {
	return v.watchRooted(factory, AuthorizationPolicyResource(), "authorization policies", rootNamespace, &v.authz)
}

// watchRooted reads resource from factory's informer into *lister (under v.mu),
// for a kind whose objects in rootNamespace apply across the mesh.
func (v *View) watchRooted(factory dynamicinformer.DynamicSharedInformerFactory, resource schema.GroupVersionResource, what, rootNamespace string, lister *cache.GenericLister) error {
	inf := factory.ForResource(resource)
	if _, err := inf.Informer().AddEventHandler(v.handler()); err != nil {
		return fmt.Errorf("mesh view: %s: %w", what, err)
	}
	v.mu.Lock()
	*lister, v.rootNamespace = inf.Lister(), rootNamespace
	if !v.running {
		v.synced = append(v.synced, inf.Informer().HasSynced)
	}
	v.mu.Unlock()
	v.markDirty()
	return nil
}

// authzSpec is a policy that compiled: its selector, and the policy without
// workloads (they change with pods, not with the policy).
type authzSpec struct {
	selector labels.Selector
	policy   *ferryv1.AuthorizationPolicy
}

// authzRejection says which field of a policy cannot be enforced and why.
type authzRejection struct {
	field, value, err string
}

// goodSpecs keeps, for each object of one policy kind, the last generation that
// compiled and the rejection last logged: a bad generation leaves the good one in
// force, and is logged once.
type goodSpecs[S any] struct {
	good   map[configKey]lastGood[S]
	logged map[configKey]string
}

func newGoodSpecs[S any]() goodSpecs[S] {
	return goodSpecs[S]{good: map[configKey]lastGood[S]{}, logged: map[configKey]string{}}
}

// settle takes the outcome of compiling generation gen of the object at key: spec
// when it compiled (bad nil); else the last good spec, if there is one, with cs's
// rejection condition and in-force generation set and the rejection logged once
// (what names the kind in the log). ok is false when nothing of it applies.
func (g goodSpecs[S]) settle(log *slog.Logger, what string, key configKey, gen int64, cs *ferryv1.ConfigStatus, spec S, bad *authzRejection) (_ S, ok bool) {
	if bad == nil {
		g.good[key] = lastGood[S]{generation: gen, spec: spec}
		delete(g.logged, key)
		return spec, true
	}
	good, ok := g.good[key]
	if ok {
		cs.InForceGeneration = uint64(max(good.generation, 0))
	}
	msg := bad.String() + "; " + inForceText(ok, good.generation)
	cs.Conditions = []*ferryv1.Condition{{Type: CondAccepted, Reason: reasonPolicyInvalid, Message: msg}}
	if g.logged[key] != msg {
		log.Error(what+" rejected", "policy", cs.Name, "file", cs.File, "field", bad.field, "value", bad.value, "error", bad.err, "in_force_generation", good.generation)
	}
	g.logged[key] = msg
	return good.spec, ok
}

// prune forgets the objects not in seen (deleted since).
func (g goodSpecs[S]) prune(seen map[configKey]bool) {
	for k := range g.good {
		if !seen[k] {
			delete(g.good, k)
			delete(g.logged, k)
		}
	}
}

func (r *authzRejection) String() string {
	if r.value != "" {
		return fmt.Sprintf("%s: %q: %s", r.field, r.value, r.err)
	}
	return r.field + ": " + r.err
}

// authorizationPolicies compiles every AuthorizationPolicy against the enrolled
// workloads of byNS, appending each one's ConfigStatus to statuses. The result is
// sorted by name; policies that select no workload are left out.
func (v *View) authorizationPolicies(byNS map[string][]enrolledPod, statuses *[]*ferryv1.ConfigStatus) ([]*ferryv1.AuthorizationPolicy, error) {
	v.mu.Lock()
	lister, root := v.authz, v.rootNamespace
	v.mu.Unlock()
	if lister == nil {
		return nil, nil
	}
	objs, err := lister.List(labels.Everything())
	if err != nil {
		return nil, fmt.Errorf("list authorization policies: %w", err)
	}
	seen := map[configKey]bool{}
	var out []*ferryv1.AuthorizationPolicy
	for _, o := range objs {
		u, ok := o.(*unstructured.Unstructured)
		if !ok {
			continue
		}
		name := u.GetNamespace() + "/" + u.GetName()
		key := configKey{kind: KindAuthorizationPolicy, namespace: u.GetNamespace(), name: u.GetName()}
		seen[key] = true
		cs := &ferryv1.ConfigStatus{Kind: KindAuthorizationPolicy, Name: name, File: u.GetAnnotations()[FileAnnotation], Generation: uint64(max(u.GetGeneration(), 0))}
		*statuses = append(*statuses, cs)
		ap := &v1alpha1.AuthorizationPolicy{}
		var spec *authzSpec
		var bad *authzRejection
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, ap); err != nil {
			bad = &authzRejection{field: "spec", err: err.Error()}
		} else {
			spec, bad = compileAuthorizationPolicy(ap)
		}
		spec, ok = v.goodAuthz.settle(v.log, "authorization policy", key, u.GetGeneration(), cs, spec, bad)
		if !ok {
			continue
		}
		var targets []string
		p := cloneAuthz(spec.policy)
		for ns, pods := range byNS {
			if ns != u.GetNamespace() && u.GetNamespace() != root {
				continue
			}
			for _, pod := range pods {
				if spec.selector.Matches(pod.labels) {
					p.Workloads = append(p.Workloads, pod.w.Uid)
					targets = append(targets, pod.w.Namespace+"/"+pod.w.Name)
				}
			}
		}
		slices.Sort(p.Workloads)
		slices.Sort(targets)
		if bad == nil {
			msg := fmt.Sprintf("enforced on %d workloads", len(targets))
			if u.GetNamespace() == root {
				msg += " (in the operator's namespace it selects across the mesh)"
			}
			cs.Conditions = []*ferryv1.Condition{{Type: CondAccepted, Status: true, Reason: reasonAccepted, Message: msg}}
		}
		if len(p.Workloads) > 0 {
			out = append(out, p)
		}
	}
	v.goodAuthz.prune(seen)
	slices.SortFunc(out, func(a, b *ferryv1.AuthorizationPolicy) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

func cloneAuthz(p *ferryv1.AuthorizationPolicy) *ferryv1.AuthorizationPolicy {
	return &ferryv1.AuthorizationPolicy{Name: p.Name, Action: p.Action, Rules: p.Rules}
}

// compileAuthorizationPolicy checks ap and compiles it, or names the first field
// the proxy could not enforce as written. The CRD's schema checks part of the same
// in a cluster; local mode has no schema.
func compileAuthorizationPolicy(ap *v1alpha1.AuthorizationPolicy) (*authzSpec, *authzRejection) {
	var bad *authzRejection
	check := func(ok bool, field, value, err string) {
		if !ok && bad == nil {
			bad = &authzRejection{field: field, value: value, err: err}
		}
	}
	action := cmp.Or(ap.Spec.Action, v1alpha1.ActionAllow)
	switch action {
	case v1alpha1.ActionAllow, v1alpha1.ActionDeny, v1alpha1.ActionAudit:
	default:
		check(false, "spec.action", string(ap.Spec.Action), "not Allow, Deny or Audit")
	}
	sel := labels.Everything()
	if s := ap.Spec.Selector; s != nil && len(s.MatchLabels) > 0 {
		var err error
		sel, err = labels.ValidatedSelectorFromSet(s.MatchLabels)
		if err != nil {
			check(false, "spec.selector.matchLabels", "", err.Error())
		}
	}
	p := &ferryv1.AuthorizationPolicy{Name: ap.Namespace + "/" + ap.Name, Action: string(action)}
	for i, r := range ap.Spec.Rules {
		at := fmt.Sprintf("spec.rules[%d]", i)
		rule := &ferryv1.AuthorizationRule{}
		for j, s := range r.From {
			f := fmt.Sprintf("%s.from[%d]", at, j)
			src := &ferryv1.AuthorizationSource{
				Identities:    identities(s.Identities, f+".identities", check),
				NotIdentities: identities(s.NotIdentities, f+".notIdentities", check),
				Namespaces:    names(s.Namespaces, f+".namespaces", check),
				NotNamespaces: names(s.NotNamespaces, f+".notNamespaces", check),
				IpBlocks:      ipBlocks(s.IPBlocks, f+".ipBlocks", check),
				NotIpBlocks:   ipBlocks(s.NotIPBlocks, f+".notIPBlocks", check),
			}
			rule.From = append(rule.From, src)
		}
		for j, o := range r.To {
			f := fmt.Sprintf("%s.to[%d]", at, j)
			op := &ferryv1.AuthorizationOperation{
				Ports:    ports(o.Ports, f+".ports", check),
				NotPorts: ports(o.NotPorts, f+".notPorts", check),
				Paths:    slices.Clone(o.Paths),
			}
			for k, m := range o.Methods {
				check(m != "" && httpguts.ValidHeaderFieldName(m) && m == strings.ToUpper(m), fmt.Sprintf("%s.methods[%d]", f, k), m, "not an HTTP method in upper case")
				op.Methods = append(op.Methods, m)
			}
			for k, path := range o.Paths {
				check(validPattern(path, "/"), fmt.Sprintf("%s.paths[%d]", f, k), path, `not a path starting with "/" (a "*" only at its end)`)
			}
			for k, h := range o.Hosts {
				check(h != "" && !strings.Contains(strings.TrimPrefix(h, "*"), "*") && !strings.ContainsAny(h, "/ "), fmt.Sprintf("%s.hosts[%d]", f, k), h, `not a host name (a "*" only at its start)`)
				op.Hosts = append(op.Hosts, strings.ToLower(h))
			}
			for k, h := range o.Headers {
				check(httpguts.ValidHeaderFieldName(h.Name), fmt.Sprintf("%s.headers[%d].name", f, k), h.Name, "not a header name")
				op.Headers = append(op.Headers, &ferryv1.AuthorizationHeader{Name: strings.ToLower(h.Name), Values: slices.Clone(h.Values)})
			}
			rule.To = append(rule.To, op)
		}
		p.Rules = append(p.Rules, rule)
	}
	if bad != nil {
		return nil, bad
	}
	return &authzSpec{selector: sel, policy: p}, nil
}

type checkFunc func(ok bool, field, value, err string)

// validPattern: s starts with prefix (or is "*"), with "*" at most once, at its end.
func validPattern(s, prefix string) bool {
	if s == "*" {
		return true
	}
	return strings.HasPrefix(s, prefix) && !strings.Contains(strings.TrimSuffix(s, "*"), "*")
}

func identities(ids []string, field string, check checkFunc) []string {
	for i, id := range ids {
		inner := strings.TrimSuffix(strings.TrimPrefix(id, "*"), "*")
		ok := id == "*" || (inner != "" && !strings.Contains(inner, "*") &&
			(strings.HasPrefix(id, "*") || strings.HasPrefix(id, "spiffe://")) && !(strings.HasPrefix(id, "*") && strings.HasSuffix(id, "*")))
		check(ok, fmt.Sprintf("%s[%d]", field, i), id, `not a SPIFFE ID (spiffe://...), with at most one "*" at its start or end`)
	}
	return slices.Clone(ids)
}

func names(ns []string, field string, check checkFunc) []string {
	for i, n := range ns {
		check(n != "" && !strings.ContainsAny(n, "*/ "), fmt.Sprintf("%s[%d]", field, i), n, "not a namespace name")
	}
	return slices.Clone(ns)
}

func ipBlocks(blocks []string, field string, check checkFunc) []string {
	var out []string
	for i, b := range blocks {
		pfx, err := netip.ParsePrefix(b)
		if err != nil {
			a, aerr := netip.ParseAddr(b)
			if aerr != nil {
				check(false, fmt.Sprintf("%s[%d]", field, i), b, "not a CIDR or an IP address")
				continue
			}
			pfx = netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen())
		}
		out = append(out, pfx.Masked().String())
	}
	return out
}

func ports(ps []int32, field string, check checkFunc) []uint32 {
	var out []uint32
	for i, p := range ps {
		check(p >= 1 && p <= 65535, fmt.Sprintf("%s[%d]", field, i), fmt.Sprint(p), "not 1 to 65535")
		out = append(out, uint32(max(p, 0)))
	}
	return out
}
