package metrics

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// certExpiryDesc is when each workload certificate the agent holds expires, so an
// alert can say "expires within hours" before traffic fails: renewal happens at
// half life, and a certificate this close to its end means renewals have failed.
var certExpiryDesc = prometheus.NewDesc("ferry_certificate_expiry_timestamp_seconds",
	"When each workload certificate the agent holds expires (Unix seconds), by SPIFFE identity.", []string{"identity"}, nil)

// certCollector reads the held certificates at scrape time. Cardinality is the
// service accounts with pods on this node.
type certCollector struct{ held func() map[string]time.Time }

func (c *certCollector) Describe(ch chan<- *prometheus.Desc) { ch <- certExpiryDesc }

func (c *certCollector) Collect(ch chan<- prometheus.Metric) {
	for id, notAfter := range c.held() {
		ch <- prometheus.MustNewConstMetric(certExpiryDesc, prometheus.GaugeValue, float64(notAfter.Unix()), id)
	}
}
