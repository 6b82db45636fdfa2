package metrics

import (
	"github.com/prometheus/client_golang/prometheus"
)

// MapFill is one BPF map's fill level.
type MapFill struct {
	Name       string
	Entries    int
	MaxEntries uint32
}

// KernelReader reads the data path's state at scrape time.
type KernelReader interface {
	// MapFill reports every map's entries and capacity.
	MapFill() ([]MapFill, error)
	// Counters reports the data path's event counters by name (redirects, steers...),
	// summed over CPUs. A data path without a counters map returns none.
	Counters() (map[string]uint64, error)
}

var (
	mapEntriesDesc = prometheus.NewDesc("ferry_bpf_map_entries", "Entries in a BPF map of the data path.", []string{"map"}, nil)
	mapMaxDesc     = prometheus.NewDesc("ferry_bpf_map_max_entries", "Capacity of a BPF map of the data path.", []string{"map"}, nil)
	eventsDesc     = prometheus.NewDesc("ferry_datapath_events_total", "Events counted by the eBPF programs, summed over CPUs.", []string{"event"}, nil)
	readErrDesc    = prometheus.NewDesc("ferry_bpf_read_errors", "1 when the last scrape could not read the BPF maps.", nil, nil)
)

// kernelCollector reads the maps on every scrape: a scrape every few seconds costs a
// walk of maps sized for one node, far less than a goroutine polling them.
type kernelCollector struct{ r KernelReader }

func (c *kernelCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- mapEntriesDesc
	ch <- mapMaxDesc
	ch <- eventsDesc
	ch <- readErrDesc
}

func (c *kernelCollector) Collect(ch chan<- prometheus.Metric) {
	failed := 0.0
	fills, err := c.r.MapFill()
	if err != nil {
		failed = 1
	}
	for _, f := range fills {
		ch <- prometheus.MustNewConstMetric(mapEntriesDesc, prometheus.GaugeValue, float64(f.Entries), f.Name)
		ch <- prometheus.MustNewConstMetric(mapMaxDesc, prometheus.GaugeValue, float64(f.MaxEntries), f.Name)
	}
	counters, err := c.r.Counters()
	if err != nil {
		failed = 1
	}
	for name, v := range counters {
		ch <- prometheus.MustNewConstMetric(eventsDesc, prometheus.CounterValue, float64(v), name)
	}
	ch <- prometheus.MustNewConstMetric(readErrDesc, prometheus.GaugeValue, failed)
}
