package metrics

import "github.com/prometheus/client_golang/prometheus"

// isolation counts what keeps one pod from hurting the others in the shared node
// proxy: refusals by a per-pod budget, and panics recovered in one connection's or
// request's handler.
type isolation struct {
	refusals *prometheus.CounterVec
	panics   *prometheus.CounterVec
	dropped  *prometheus.GaugeVec
}

func newIsolation() isolation {
	return isolation{
		refusals: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ferry_budget_refusals_total",
			Help: "Connections and requests refused at once because their tenant was over a per-pod budget, by tenant (a local pod, or inbound a source identity or address) and budget."},
			[]string{"pod", "budget"}),
		panics: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ferry_proxy_panics_total",
			Help: "Panics recovered in the proxy's handler of one connection or request (the connection was closed, the agent kept running), by pod."},
			[]string{"pod"}),
		dropped: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "ferry_state_dropped_entries",
			Help: "Entries of the applied NodeState the agent left out as malformed (the rest applied), by kind (workload, service)."},
			[]string{"kind"}),
	}
}

// StateDropped sets how many entries of kind the applied state had left out.
func (m *Metrics) StateDropped(kind string, n int) {
	m.isolation.dropped.WithLabelValues(kind).Set(float64(n))
}

// BudgetRefused counts one refusal of pod's traffic by budget.
func (m *Metrics) BudgetRefused(pod, budget string) {
	m.isolation.refusals.WithLabelValues(orUnknown(pod), budget).Inc()
}

// Panicked counts one panic recovered in a handler of pod's traffic.
func (m *Metrics) Panicked(pod string) { m.isolation.panics.WithLabelValues(orUnknown(pod)).Inc() }
