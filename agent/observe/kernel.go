package observe

import (
	"github.com/ferrymesh/ferry/agent/datapath"
	"github.com/ferrymesh/ferry/agent/metrics"
	"github.com/ferrymesh/ferry/bpf"
)

// kernelReader reads the data path's pinned maps for the metrics.
type kernelReader struct{ pinDir string }

func (k kernelReader) MapFill() ([]metrics.MapFill, error) {
	d, err := datapath.DumpMaps(k.pinDir)
	if err != nil {
		return nil, err
	}
	out := make([]metrics.MapFill, 0, len(d.Maps))
	for _, m := range d.Maps {
		out = append(out, metrics.MapFill{Name: m.Name, Entries: m.Entries, MaxEntries: m.MaxEntries})
	}
	return out, nil
}

func (k kernelReader) Counters() (map[string]uint64, error) { return bpf.ReadCounters(k.pinDir) }
