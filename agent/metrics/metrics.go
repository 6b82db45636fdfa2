// Package metrics holds the agent's Prometheus metrics: Istio's standard TCP and
// request metrics (same names, labels and buckets, so existing dashboards and queries
// translate), the flow
// ring's counters, and the kernel side: BPF map fill levels and the data path's
// event counters read from BPF maps at scrape time.
package metrics

import (
	"net/http"
	"sync"
	"time"

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
	// ProtocolHTTP and ProtocolGRPC are request_protocol's values: HTTP/1.x and
	// HTTP/2 are both "http", as Istio reports them.
	ProtocolHTTP = "http"
	ProtocolGRPC = "grpc"
	// NoFlags is response_flags when nothing went wrong in the mesh.
	NoFlags = "-"
	// NoRoute is the route label of a request to a Service without routes.
	NoRoute = "-"
)

// DurationBuckets are istio_request_duration_milliseconds' bucket bounds: Envoy's
// default histogram buckets, which Istio's proxies export unless told otherwise, so
// histogram_quantile over Ferry's and Istio's series agrees.
var DurationBuckets = []float64{0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000, 1800000, 3600000}

// SizeBuckets are istio_request_bytes' and istio_response_bytes' bounds: powers of
// ten from 1 byte to 1 GB.
var SizeBuckets = prometheus.ExponentialBuckets(1, 10, 10)

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
		v[i] = orUnknown(v[i])
	}
	return v
}

// requestLabels are the label names of Istio's request metrics, in
// RequestLabels.values' order: the connection's, then the request's.
var requestLabels = append(append([]string(nil), istioLabels...),
	"source_app", "source_version", "source_canonical_service",
	"destination_service_name", "destination_service_namespace",
	"request_protocol", "response_code", "grpc_response_status", "response_flags",
	"route",
)

// RequestLabels are one request's Istio labels: its connection's, the source's app
// labels and the destination service's parts, and the request's outcome. Each value
// is bounded: a status code, a gRPC code, a flag from a short list, never a path or
// an authority.
type RequestLabels struct {
	Labels
	SourceApp                   string
	SourceVersion               string
	SourceCanonicalService      string
	DestinationServiceName      string
	DestinationServiceNamespace string
	// RequestProtocol is ProtocolHTTP or ProtocolGRPC.
	RequestProtocol string
	// ResponseCode is the HTTP status as text, "0" when no response came.
	ResponseCode string
	// GRPCResponseStatus is the gRPC status code as text; "" for plain HTTP.
	GRPCResponseStatus string
	// ResponseFlags are Envoy's response flags for what the mesh did ("UH": no
	// healthy upstream...), comma separated in Envoy's order when several apply
	// ("DI,FI"); NoFlags when nothing.
	ResponseFlags string
	// Route is the route that carried the request ("HTTPRoute default/canary");
	// NoRoute when the Service has none. Istio's standard metrics have no such label
	// (Envoy knows the route only in access logs); it is bounded by the number of
	// routes, so a split's sides can be told apart in one query.
	Route string
}

func (l RequestLabels) values() []string {
	code, flags, route := l.ResponseCode, l.ResponseFlags, l.Route
	if code == "" {
		code = "0"
	}
	if flags == "" {
		flags = NoFlags
	}
	if route == "" {
		route = NoRoute
	}
	return append(l.Labels.values(), orUnknown(l.SourceApp), orUnknown(l.SourceVersion), orUnknown(l.SourceCanonicalService),
		orUnknown(l.DestinationServiceName), orUnknown(l.DestinationServiceNamespace),
		orUnknown(l.RequestProtocol), code, l.GRPCResponseStatus, flags, route)
}

func orUnknown(s string) string {
	if s == "" {
		return Unknown
	}
	return s
}

// Metrics is one agent's metrics, in a registry of its own.
type Metrics struct {
	reg                  *prometheus.Registry
	opened, closed       *prometheus.CounterVec
	sentBytes, recvBytes *prometheus.CounterVec
	requests             *prometheus.CounterVec
	duration             *prometheus.HistogramVec
	reqBytes, respBytes  *prometheus.HistogramVec
	retries              *prometheus.CounterVec
	authz                *prometheus.CounterVec // authz.go
	isolation            isolation              // isolation.go

	// series caches each label set's counters: resolving 9 label values in four
	// vectors costs microseconds a connection, a map hit and four adds far less.
	series sync.Map // Labels -> *tcpSeries
	// requestSeries does the same for requests' 19 labels.
	requestSeries sync.Map // RequestLabels -> *requestSeries
}

type requestSeries struct {
	count                      prometheus.Counter
	duration, reqSize, rspSize prometheus.Observer
}

func (m *Metrics) request(l RequestLabels) *requestSeries {
	if s, ok := m.requestSeries.Load(l); ok {
		return s.(*requestSeries)
	}
	v := l.values()
	s, _ := m.requestSeries.LoadOrStore(l, &requestSeries{
		count: m.requests.WithLabelValues(v...), duration: m.duration.WithLabelValues(v...),
		reqSize: m.reqBytes.WithLabelValues(v...), rspSize: m.respBytes.WithLabelValues(v...),
	})
	return s.(*requestSeries)
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
	// Certificates reports the workload certificates held now: SPIFFE identity to
	// NotAfter (certs.go).
	Certificates func() map[string]time.Time
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
	hist := func(name, help string, buckets []float64) *prometheus.HistogramVec {
		return prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: name, Help: help, Buckets: buckets}, requestLabels)
	}
	m.requests = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_requests_total", Help: "HTTP requests and gRPC calls the proxy carried, counted when the response ends."}, requestLabels)
	m.duration = hist("istio_request_duration_milliseconds", "Time from the request's start to the response's end, in milliseconds.", DurationBuckets)
	m.reqBytes = hist("istio_request_bytes", "Request body sizes, in bytes.", SizeBuckets)
	m.respBytes = hist("istio_response_bytes", "Response body sizes, in bytes.", SizeBuckets)
	m.retries = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ferry_request_retries_total",
		Help: "Tries of HTTP requests and gRPC calls after their first (route or TrafficPolicy retries), by destination service, counted when the request ends."},
		[]string{"destination_service"})
	reg.MustRegister(m.opened, m.closed, m.sentBytes, m.recvBytes, m.requests, m.duration, m.reqBytes, m.respBytes, m.retries)
	m.authz = newAuthzDecisions()
	reg.MustRegister(m.authz)
	m.isolation = newIsolation()
	reg.MustRegister(m.isolation.refusals, m.isolation.panics, m.isolation.dropped)
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
	if src.Certificates != nil {
		reg.MustRegister(&certCollector{held: src.Certificates})
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

// Request counts one HTTP request or gRPC call that ended, how long it took and
// its body sizes: request is source to destination, response destination to source.
func (m *Metrics) Request(l RequestLabels, d time.Duration, request, response int64) {
	s := m.request(l)
	s.count.Inc()
	s.duration.Observe(float64(d) / float64(time.Millisecond))
	s.reqSize.Observe(float64(max(request, 0)))
	s.rspSize.Observe(float64(max(response, 0)))
}

// Retries counts n tries after the first of a request to destinationService (Istio's
// form, name.namespace.svc.cluster.local; "" is unknown).
func (m *Metrics) Retries(destinationService string, n int) {
	if n > 0 {
		m.retries.WithLabelValues(orUnknown(destinationService)).Add(float64(n))
	}
}

// Registry is where the metrics live, for tests and for adding more collectors.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// Handler serves the metrics in the Prometheus text format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError})
}
