package mesh

// TrafficPolicy in the mesh view: which policy applies to each Service, and the
// Service fields it sets (the load balancer and the ServicePolicy). The policies come from a
// dynamic informer, so the view reads them the same way whether the store is a
// cluster's API server or local mode's in-memory client.

import (
	"cmp"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/ferrymesh/ferry/api/ferryv1"
	"github.com/ferrymesh/ferry/api/v1alpha1"
	"golang.org/x/net/http/httpguts"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
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
	case "", v1alpha1.LoadBalancerP2CEWMA, v1alpha1.LoadBalancerRoundRobin, v1alpha1.LoadBalancerRandom, v1alpha1.LoadBalancerLeastRequest, v1alpha1.LoadBalancerRingHash:
		return true
	}
	return false
}

// proxyLoadBalancers lists them for messages.
const proxyLoadBalancers = "P2CEWMA, RoundRobin, Random, LeastRequest, RingHash"

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
	file    string // local mode's manifest
	service string // namespace/name, when the note is about one Service
	field   string // spec path of the offending field
	value   string
	winner  string // the policy that applies instead
	lb      string
	err     string
	inForce int64 // rejected: the generation that stays in force, 0 for none
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
		if n.inForce > 0 {
			v.log.Error("traffic policy rejected; its last good generation stays in force", "policy", n.policy, "file", n.file, "field", n.field, "value", n.value, "error", n.err, "in_force_generation", n.inForce)
			return
		}
		v.log.Error("traffic policy rejected; it applies to none of its services", "policy", n.policy, "file", n.file, "field", n.field, "value", n.value, "error", n.err)
	}
}

// policyResult is a TrafficPolicy that compiled: the object (for conflicts) and
// what it sets on each Service it targets.
type policyResult struct {
	tp     *v1alpha1.TrafficPolicy
	lb     string
	policy *ferryv1.ServicePolicy
}

// trafficPolicies decides which TrafficPolicy applies to each Service of ns (by
// Service name), adds to notes what the user should be told and to statuses each
// policy's conditions. A policy that cannot be applied whole is rejected whole; its
// last good generation, if it had one, stays in force and takes its place in
// conflicts. Among the policies in force the oldest (creationTimestamp, then name)
// wins each Service, as Gateway API resolves conflicting policies.
func (v *View) trafficPolicies(ns string, notes *[]policyNote, statuses *[]*ferryv1.ConfigStatus) (map[string]*policyResult, error) {
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
	type entry struct {
		cs        *ferryv1.ConfigStatus
		won, lost []string
	}
	inForce := map[*policyResult]*entry{}
	byService := map[string][]*policyResult{}
	for _, o := range objs {
		u, ok := o.(*unstructured.Unstructured)
		if !ok {
			continue
		}
		name := u.GetNamespace() + "/" + u.GetName()
		key := configKey{kind: KindTrafficPolicy, namespace: u.GetNamespace(), name: u.GetName()}
		v.seenPolicies[key] = true
		cs := &ferryv1.ConfigStatus{Kind: KindTrafficPolicy, Name: name, File: u.GetAnnotations()[FileAnnotation], Generation: uint64(max(u.GetGeneration(), 0))}
		*statuses = append(*statuses, cs)
		tp := &v1alpha1.TrafficPolicy{}
		var res *policyResult
		var n *policyNote
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, tp); err != nil {
			n = &policyNote{level: noteRejected, field: "spec", err: err.Error()}
		} else {
			for _, ref := range tp.Spec.TargetRefs {
				if t := ns + "/" + ref.Name; ref.Name != "" && !slices.Contains(cs.Targets, t) {
					cs.Targets = append(cs.Targets, t)
				}
			}
			slices.Sort(cs.Targets)
			res, n = compileTrafficPolicy(tp)
		}
		if n != nil {
			n.policy, n.file = name, cs.File
			if good, ok := v.goodPolicies[key]; ok {
				res, n.inForce = good.spec, good.generation
				cs.InForceGeneration = uint64(max(good.generation, 0))
			}
			*notes = append(*notes, *n)
			msg := n.field + ": "
			if n.value != "" {
				msg += fmt.Sprintf("%q: ", n.value)
			}
			msg += n.err + "; " + inForceText(res != nil, n.inForce)
			cs.Conditions = []*ferryv1.Condition{{Type: CondAccepted, Reason: reasonPolicyInvalid, Message: msg}}
		} else {
			v.goodPolicies[key] = lastGood[*policyResult]{generation: u.GetGeneration(), spec: res}
		}
		if res == nil {
			continue
		}
		e := &entry{}
		if n == nil {
			e.cs = cs
		}
		inForce[res] = e
		for _, ref := range res.tp.Spec.TargetRefs {
			if !slices.Contains(byService[ref.Name], res) {
				byService[ref.Name] = append(byService[ref.Name], res)
			}
		}
	}
	out := map[string]*policyResult{}
	for svc, rs := range byService {
		slices.SortFunc(rs, func(a, b *policyResult) int {
			if c := a.tp.CreationTimestamp.Compare(b.tp.CreationTimestamp.Time); c != 0 {
				return c
			}
			return strings.Compare(a.tp.Name, b.tp.Name)
		})
		out[svc] = rs[0]
		inForce[rs[0]].won = append(inForce[rs[0]].won, ns+"/"+svc)
		for _, r := range rs[1:] {
			inForce[r].lost = append(inForce[r].lost, ns+"/"+svc+" (has "+ns+"/"+rs[0].tp.Name+")")
			*notes = append(*notes, policyNote{level: noteConflict, policy: ns + "/" + r.tp.Name, service: ns + "/" + svc, winner: ns + "/" + rs[0].tp.Name})
		}
	}
	for _, e := range inForce {
		if e.cs == nil {
			continue // rejected: its conditions say so
		}
		slices.Sort(e.won)
		slices.Sort(e.lost)
		c := &ferryv1.Condition{Type: CondAccepted, Status: true, Reason: reasonAccepted, Message: "applied to " + strings.Join(e.won, ", ")}
		switch {
		case len(e.won) == 0 && len(e.lost) == 0:
			c.Message = "applied; none of its Services is in the mesh"
		case len(e.won) == 0:
			c.Status, c.Reason, c.Message = false, reasonPolicyConflicted, "an older policy applies to each of its Services: "+strings.Join(e.lost, ", ")
		case len(e.lost) > 0:
			c.Message += "; an older policy applies to " + strings.Join(e.lost, ", ")
		}
		e.cs.Conditions = []*ferryv1.Condition{c}
	}
	return out, nil
}

// compileTrafficPolicy checks tp and compiles what it sets, or says why it cannot
// be applied as a whole. The CRD's schema checks most of the same in a cluster;
// local mode has no schema.
func compileTrafficPolicy(tp *v1alpha1.TrafficPolicy) (*policyResult, *policyNote) {
	reject := func(field, value, err string) (*policyResult, *policyNote) {
		return nil, &policyNote{level: noteRejected, field: field, value: value, err: err}
	}
	if len(tp.Spec.TargetRefs) == 0 {
		return reject("spec.targetRefs", "", "names no Service")
	}
	for i, ref := range tp.Spec.TargetRefs {
		field := fmt.Sprintf("spec.targetRefs[%d]", i)
		switch {
		case ref.Group != "" && ref.Group != "core":
			return reject(field+".group", ref.Group, `a Service's group is "" (core)`)
		case ref.Kind != "Service":
			return reject(field+".kind", ref.Kind, "only Services can be targeted")
		case ref.Name == "":
			return reject(field+".name", "", "required")
		}
	}
	res := &policyResult{tp: tp, policy: &ferryv1.ServicePolicy{Name: tp.Namespace + "/" + tp.Name}}
	sp := res.policy
	if lb := tp.Spec.LoadBalancer; lb != nil {
		if !proxyLoadBalancer(lb.Type) {
			return reject("spec.loadBalancer.type", string(lb.Type), "not implemented by the proxy (it has "+proxyLoadBalancers+")")
		}
		if lb.HashHeader != "" && lb.Type != v1alpha1.LoadBalancerRingHash {
			return reject("spec.loadBalancer.hashHeader", lb.HashHeader, "only RingHash hashes a header")
		}
		if lb.HashHeader != "" && !httpguts.ValidHeaderFieldName(lb.HashHeader) {
			return reject("spec.loadBalancer.hashHeader", lb.HashHeader, "not a header name")
		}
		res.lb, sp.HashHeader = string(lb.Type), lb.HashHeader
	}
	var bad *policyNote
	check := func(ok bool, field, value, err string) {
		if !ok && bad == nil {
			bad = &policyNote{level: noteRejected, field: field, value: value, err: err}
		}
	}
	ms := func(d *metav1.Duration, field string) uint32 {
		if d == nil {
			return 0
		}
		check(d.Duration >= 0 && d.Duration <= maxPolicyDuration, field, d.Duration.String(), "not 0 to "+maxPolicyDuration.String())
		if d.Duration > 0 && d.Milliseconds() == 0 {
			return 1
		}
		return uint32(max(d.Milliseconds(), 0))
	}
	count := func(n *int32, field string) uint32 {
		if n == nil {
			return 0
		}
		check(*n >= 0, field, fmt.Sprint(*n), "not 0 or more")
		return uint32(max(*n, 0))
	}
	percent := func(n int32, field string) float64 {
		check(n >= 0 && n <= 100, field, fmt.Sprint(n), "not 0 to 100")
		return float64(n)
	}
	if t := tp.Spec.Timeouts; t != nil {
		sp.ConnectTimeoutMs = ms(t.Connect, "spec.timeouts.connect")
		sp.RequestTimeoutMs = ms(t.Request, "spec.timeouts.request")
		sp.IdleTimeoutMs = ms(t.Idle, "spec.timeouts.idle")
	}
	if r := tp.Spec.Retries; r != nil {
		check(r.Attempts >= 0 && r.Attempts <= 10, "spec.retries.attempts", fmt.Sprint(r.Attempts), "not 0 to 10")
		if r.PerTryTimeout != nil {
			check(false, "spec.retries.perTryTimeout", r.PerTryTimeout.Duration.String(),
				"not implemented by the proxy for policies; an HTTPRoute rule's timeouts.backendRequest bounds each try")
		}
		sp.Retry = &ferryv1.RouteRetry{Attempts: uint32(max(r.Attempts, 0)), BackoffMs: ms(r.Backoff, "spec.retries.backoff")}
		on := r.On
		if len(on) == 0 {
			on = []string{"connect-failure", "reset", "gateway-error"}
		}
		for i, cond := range on {
			codes, ok := retryCodes[cond]
			check(ok, fmt.Sprintf("spec.retries.on[%d]", i), cond, "not connect-failure, reset, 5xx, gateway-error or retriable-4xx")
			for _, c := range codes {
				if !slices.Contains(sp.Retry.Codes, c) {
					sp.Retry.Codes = append(sp.Retry.Codes, c)
				}
			}
		}
		slices.Sort(sp.Retry.Codes)
	}
	if c := tp.Spec.CircuitBreaker; c != nil {
		sp.MaxConnections = count(c.MaxConnections, "spec.circuitBreaker.maxConnections")
		sp.MaxPendingRequests = count(c.MaxPendingRequests, "spec.circuitBreaker.maxPendingRequests")
		sp.MaxRequests = count(c.MaxRequests, "spec.circuitBreaker.maxRequests")
		sp.MaxRequestsPerConnection = count(c.MaxRequestsPerConnection, "spec.circuitBreaker.maxRequestsPerConnection")
		if c.MaxRetries != nil {
			check(false, "spec.circuitBreaker.maxRetries", fmt.Sprint(*c.MaxRetries), "not implemented by the proxy; spec.retryBudget bounds retries")
		}
	}
	if o := tp.Spec.OutlierDetection; o != nil {
		check(deref(o.ConsecutiveErrors) > 0 || deref(o.ConsecutiveGatewayErrors) > 0, "spec.outlierDetection", "",
			"consecutiveErrors or consecutiveGatewayErrors is required, or nothing ejects an endpoint")
		sp.OutlierDetection = &ferryv1.OutlierDetection{
			Consecutive_5Xx:          count(o.ConsecutiveErrors, "spec.outlierDetection.consecutiveErrors"),
			ConsecutiveGatewayErrors: count(o.ConsecutiveGatewayErrors, "spec.outlierDetection.consecutiveGatewayErrors"),
			IntervalMs:               ms(o.Interval, "spec.outlierDetection.interval"),
			BaseEjectionMs:           ms(o.BaseEjectionTime, "spec.outlierDetection.baseEjectionTime"),
		}
		if o.MaxEjectionPercent != nil {
			sp.OutlierDetection.MaxEjectionPercent = uint32(percent(*o.MaxEjectionPercent, "spec.outlierDetection.maxEjectionPercent"))
		}
	}
	if f := tp.Spec.Fault; f != nil && (f.Abort != nil || f.Delay != nil) {
		sp.Fault = &ferryv1.Fault{}
		if a := f.Abort; a != nil {
			sp.Fault.AbortPercent = percent(a.Percent, "spec.fault.abort.percent")
			check(a.HTTPStatus >= 200 && a.HTTPStatus <= 599, "spec.fault.abort.httpStatus", fmt.Sprint(a.HTTPStatus), "not 200 to 599")
			sp.Fault.AbortStatus = uint32(max(a.HTTPStatus, 0))
		}
		if d := f.Delay; d != nil {
			sp.Fault.DelayPercent = percent(d.Percent, "spec.fault.delay.percent")
			sp.Fault.DelayMs = ms(&d.Duration, "spec.fault.delay.duration")
			check(sp.Fault.DelayMs > 0 || d.Percent == 0, "spec.fault.delay.duration", d.Duration.Duration.String(), "a delay of 0 delays nothing")
		}
	}
	if b := tp.Spec.RetryBudget; b != nil {
		sp.RetryBudget = &ferryv1.RetryBudget{
			Percent:             percent(b.Percent, "spec.retryBudget.percent"),
			MinRetriesPerSecond: count(b.MinRetriesPerSecond, "spec.retryBudget.minRetriesPerSecond"),
			TtlMs:               uint32(defaultRetryBudgetTTL.Milliseconds()),
		}
		if b.TTL != nil {
			sp.RetryBudget.TtlMs = ms(b.TTL, "spec.retryBudget.ttl")
			check(b.TTL.Duration > 0, "spec.retryBudget.ttl", b.TTL.Duration.String(), "not more than 0")
		}
	}
	if r := tp.Spec.RateLimit; r != nil {
		check(r.RequestsPerSecond >= 1, "spec.rateLimit.requestsPerSecond", fmt.Sprint(r.RequestsPerSecond), "not 1 or more")
		sp.RateLimit = &ferryv1.RateLimit{RequestsPerSecond: uint32(max(r.RequestsPerSecond, 0)), Burst: uint32(max(r.RequestsPerSecond, 0))}
		if r.Burst != nil {
			check(*r.Burst >= 1, "spec.rateLimit.burst", fmt.Sprint(*r.Burst), "not 1 or more")
			sp.RateLimit.Burst = uint32(max(*r.Burst, 0))
		}
	}
	if bad != nil {
		return nil, bad
	}
	return res, nil
}

// maxPolicyDuration bounds every duration of a policy, as the agent does (it
// rejects a state with a longer one).
const maxPolicyDuration = 24 * time.Hour

// defaultRetryBudgetTTL is the window of a retry budget that does not say (as
// Linkerd's).
const defaultRetryBudgetTTL = 10 * time.Second

// retryCodes are the response statuses each of RetryPolicy.On's failure classes
// retries; connection failures and resets the proxy always retries.
var retryCodes = map[string][]uint32{
	"connect-failure": nil,
	"reset":           nil,
	"5xx":             statusRange(500, 599),
	"gateway-error":   {502, 503, 504},
	"retriable-4xx":   {409},
}

func statusRange(from, to uint32) []uint32 {
	var out []uint32
	for c := from; c <= to; c++ {
		out = append(out, c)
	}
	return out
}

// applyTrafficPolicy sets what a policy says on fs, and notes it.
func applyTrafficPolicy(fs *ferryv1.Service, res *policyResult, notes *[]policyNote) {
	fs.LoadBalancer = res.lb
	fs.Policy = res.policy
	*notes = append(*notes, policyNote{level: noteApplied, policy: fs.Namespace + "/" + res.tp.Name, service: fs.Namespace + "/" + fs.Name,
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
