package metrics

import "github.com/prometheus/client_golang/prometheus"

// newAuthzDecisions counts what AuthorizationPolicies decided at this node's
// destinations, by policy (namespace/name) and action: "deny" for each connection
// or request a policy refused (a Deny that matched, or an Allow none of which
// matched), "audit" for each one an Audit policy matched.
func newAuthzDecisions() *prometheus.CounterVec {
	return prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ferry_authorization_decisions_total",
		Help: "Connections and requests an AuthorizationPolicy denied (action deny) or audited (action audit), by policy."},
		[]string{"policy", "action"})
}

// Authorization counts one decision of policy; action is "deny" or "audit".
func (m *Metrics) Authorization(policy, action string) {
	m.authz.WithLabelValues(orUnknown(policy), action).Inc()
}
