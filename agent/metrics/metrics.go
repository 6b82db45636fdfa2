// Package metrics holds the agent's Prometheus metrics: Istio's standard TCP metrics
// (same names and labels, so existing dashboards and queries translate), the flow
// ring's counters, and the kernel side: BPF map fill levels and the data path's
// event counters read from BPF maps at scrape time.
package metrics

import (
	"net/http"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Label values Istio uses when a side is not known.
const (
	Unknown   = "unknown"
	MutualTLS = "mutual_tls"
	None      = "none"
	// ReporterSource: recorded by the agent of the connection's source pod;
	// ReporterDestination: by the agent of its destination pod.
	ReporterSource      = "source"
	ReporterDestination = "destination"
)

// istioLabels are the label names of Istio's TCP metrics, in Labels' field order.
var istioLabels = []string{
	"reporter",
	"source_workload", "source_workload_namespace", "source_principal",
	"destination_workload", "destination_workload_namespace", "destination_service", "destination_principal",
	"connection_security_policy",
}

// Labels are one connection's Istio labels. Every value is bounded by the number of
// workloads and services: never a client port or a pod IP.
type Labels struct {
	Reporter                     string
	SourceWorkload               string
	SourceWorkloadNamespace      string
	SourcePrincipal              string
	DestinationWorkload          string
	DestinationWorkloadNamespace string
	DestinationService           string
	DestinationPrincipal         string
	ConnectionSecurityPolicy     string
}

func (l Labels) values() []string {
	v := []string{
		l.Reporter,
		l.SourceWorkload, l.SourceWorkloadNamespace, l.SourcePrincipal,
		l.DestinationWorkload, l.DestinationWorkloadNamespace, l.DestinationService, l.DestinationPrincipal,
		l.ConnectionSecurityPolicy,
	}
	for i := range v {
		if v[i] == "" {
			v[i] = Unknown
		}
	}
	return v
}

// Metrics is one agent's metrics, in a registry of its own.
type Metrics struct {
	reg                  *prometheus.Registry
	opened, closed       *prometheus.CounterVec
	sentBytes, recvBytes *prometheus.CounterVec

	// series caches each label set's counters: resolving 9 label values in four
	// vectors costs microseconds a connection, a map hit and four adds far less.
	series sync.Map // Labels -> *tcpSeries
}

type tcpSeries struct {
	opened, closed, sent, recv prometheus.Counter
}

func (m *Metrics) tcp(l Labels) *tcpSeries {
	if s, ok := m.series.Load(l); ok {
		return s.(*tcpSeries)
	}
	v := l.values()
	s, _ := m.series.LoadOrStore(l, &tcpSeries{
		opened: m.opened.WithLabelValues(v...), closed: m.closed.WithLabelValues(v...),
		sent: m.sentBytes.WithLabelValues(v...), recv: m.recvBytes.WithLabelValues(v...),
	})
	return s.(*tcpSeries)
}

// Sources are what the metrics read at scrape time; any may be nil.
type Sources struct {
	// Flows reports the flow ring: stored, capacity, seen since start, lost by followers.
	Flows func() (stored, capacity int, seen, lost uint64)
	// LiveConns counts the connections being proxied now.
	LiveConns func() int
	// Kernel reads the BPF maps; see KernelReader.
	Kernel KernelReader
}

// New registers the agent's metrics, plus Go runtime and process metrics. node is not
// a label: the scraper adds the target's own (instance, or node in Kubernetes SD).
func New(node string, src Sources) *Metrics {
	reg := prometheus.NewRegistry()
	tcp := func(name, help string) *prometheus.CounterVec {
		return prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: help}, istioLabels)
	}
	m := &Metrics{
		reg:       reg,
		opened:    tcp("istio_tcp_connections_opened_total", "TCP connections opened, counted when the proxy accepts them."),
		closed:    tcp("istio_tcp_connections_closed_total", "TCP connections closed."),
		sentBytes: tcp("istio_tcp_sent_bytes_total", "Bytes sent in response (destination to source), counted when the connection closes."),
		recvBytes: tcp("istio_tcp_received_bytes_total", "Bytes received in request (source to destination), counted when the connection closes."),
	}
	reg.MustRegister(m.opened, m.closed, m.sentBytes, m.recvBytes)
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if f := src.Flows; f != nil {
		reg.MustRegister(
			prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "ferry_flows_total", Help: "Flows recorded since the agent started."},
				func() float64 { _, _, seen, _ := f(); return float64(seen) }),
			prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "ferry_flows_lost_total", Help: "Flows a slow follower of the Observer API missed."},
				func() float64 { _, _, _, lost := f(); return float64(lost) }),
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "ferry_flow_ring_flows", Help: "Flows held in the ring now."},
				func() float64 { n, _, _, _ := f(); return float64(n) }),
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "ferry_flow_ring_capacity", Help: "Most flows the ring holds."},
				func() float64 { _, c, _, _ := f(); return float64(c) }),
		)
	}
	if f := src.LiveConns; f != nil {
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "ferry_proxy_live_connections", Help: "Connections the node proxy carries now."},
			func() float64 { return float64(f()) }))
	}
	if src.Kernel != nil {
		reg.MustRegister(&kernelCollector{r: src.Kernel})
	}
	return m
}

// ConnOpened counts a connection that opened.
func (m *Metrics) ConnOpened(l Labels) { m.tcp(l).opened.Inc() }

// ConnClosed counts a connection that ended and its bytes: request is source to
// destination, response destination to source.
func (m *Metrics) ConnClosed(l Labels, request, response int64) {
	s := m.tcp(l)
	s.closed.Inc()
	s.recv.Add(float64(request))
	s.sent.Add(float64(response))
}

// Registry is where the metrics live, for tests and for adding more collectors.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// Handler serves the metrics in the Prometheus text format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError})
}
