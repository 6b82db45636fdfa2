package bench

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestNewStat(t *testing.T) {
	for _, tc := range []struct {
		in   []float64
		want Stat
	}{
		{nil, Stat{}},
		{[]float64{3}, Stat{Median: 3, Min: 3, Max: 3, N: 1}},
		{[]float64{4, 1, 2}, Stat{Median: 2, Min: 1, Max: 4, N: 3}},
		{[]float64{4, 1, 2, 3}, Stat{Median: 2.5, Min: 1, Max: 4, N: 4}},
	} {
		if got := newStat(tc.in); got != tc.want {
			t.Errorf("newStat(%v) = %+v, want %+v", tc.in, got, tc.want)
		}
	}
}

// fakeResults has every scenario and workload of the quick plan, with figures
// that make the ratios easy to check: no mesh 1000 req/s, everything else 500.
func fakeResults() *Results {
	plan := NewPlan(true)
	res := &Results{Plan: plan, Start: time.Date(2026, 1, 2, 3, 4, 0, 0, time.UTC), Elapsed: "1m0s",
		Placement: Placement{Pinned: true, AppCPU: 0, ProxyCPU: 1, CPUs: 2}}
	for rep := 1; rep <= plan.Reps; rep++ {
		for _, sc := range plan.Scenarios {
			for _, w := range plan.Workloads {
				if !w.runsIn(sc) {
					continue
				}
				s := Sample{Scenario: sc.Key, Workload: w.Key, Rep: rep, QPS: 500, P50: 0.2, P90: 0.3, P99: 1, P999: 2, Requests: 500, Gbps: 5, PeakRSS: 40 << 20}
				if sc.proxy == proxyNone {
					s.QPS, s.P50, s.Gbps, s.PeakRSS = 1000, 0.1, 10, 0
				} else {
					s.ProxyCPU, s.CPUPer1k = 0.05, 0.1
					s.Procs = []ProcCost{{Name: "p1", CPU: 0.03, PeakRSS: 30 << 20}, {Name: "p2", CPU: 0.02, PeakRSS: 10 << 20}}
				}
				if sc.proxy == proxyFerry && w.kind.proto().l7() {
					s.Carried = "L4"
				}
				res.Samples = append(res.Samples, s)
			}
			if rep == 1 && sc.Key == "ferry-s" {
				res.Samples = append(res.Samples, Sample{Scenario: sc.Key, Workload: "bulk", Rep: 1, Error: "write: cannot allocate memory"})
			}
		}
	}
	return res
}

func TestWriteReport(t *testing.T) {
	var b strings.Builder
	if err := WriteReport(&b, fakeResults()); err != nil {
		t.Fatal(err)
	}
	md := b.String()
	for _, want := range []string{
		"## Summary",
		"| Ferry mTLS tunnel, across nodes | 0.200 (×nm 2.00, ×hap 1.00) |",
		"Published-figures format",
		"| Ferry mTLS tunnel, across nodes | 0.200 | 0.300 | 1.000 | 2.000 | +0.100 |",
		"`taskset -c 0`",
		"## Summary, HTTP/2 and gRPC",
		// The L7 summary: HTTP/2 max req/s with its ratios, Ferry labelled by how it carried it.
		"| Ferry no fast path, across nodes, carried at L4 | 500 (×nm 0.50, ×hap 1.00) |",
		"| HAProxy pair mTLS, same node | 500 (×nm 0.50, ×hap 1.00) |",
		"## gRPC unary (fortio ping), 1 KiB each way, 4 conns × 4 streams, max calls/s\n\n| scenario | calls/s |",
		"| ferry-s | bulk | 1 | write: cannot allocate memory |",
		"| ferry-x | p1 | 0.060 | 30.0 |",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("report lacks %q:\n%s", want, md)
		}
	}
}

// TestQuickL7Rows checks that the quick run's HTTP/2 and gRPC tables hold the
// scenarios it measures them in and no others.
func TestQuickL7Rows(t *testing.T) {
	var b strings.Builder
	if err := WriteReport(&b, fakeResults()); err != nil {
		t.Fatal(err)
	}
	md := b.String()
	_, l7, _ := strings.Cut(md, "## Summary, HTTP/2 and gRPC")
	l7, _, _ = strings.Cut(l7, "## Published")
	for _, sc := range NewPlan(true).Scenarios {
		row := "| " + sc.Name + " |"
		if sc.proxy == proxyFerry {
			row = "| " + sc.Name + ", carried at L4 |"
		}
		if got, want := strings.Contains(l7, row), slices.Contains(quickL7Scenarios, sc.Key); got != want {
			t.Errorf("L7 summary has row %q: %v, want %v\n%s", row, got, want, l7)
		}
	}
}

func TestRoundTicks(t *testing.T) {
	for _, tc := range []struct {
		hi   float64
		want string
	}{
		{28256, "0 5000 10000 15000 20000 25000"},
		{19.8, "0 2 4 6 8 10 12 14 16 18"},
		{0.9, "0.0 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9"},
	} {
		var got []string
		for _, tk := range roundTicks(0, tc.hi) {
			got = append(got, tk.Label)
		}
		if strings.Join(got, " ") != tc.want {
			t.Errorf("roundTicks(0, %v) = %v, want %s", tc.hi, got, tc.want)
		}
	}
}

func TestSaveWritesPlots(t *testing.T) {
	dir := t.TempDir()
	if _, err := Save(dir, fakeResults()); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"report.md", "samples.json", "latency.png", "throughput.png"} {
		st, err := os.Stat(filepath.Join(dir, f))
		if err != nil || st.Size() == 0 {
			t.Errorf("%s: %v (size %d)", f, err, st.Size())
		}
	}
}

func TestOrderAlternates(t *testing.T) {
	r := &runner{cfg: Config{Plan: NewPlan(true)}}
	first := map[string]bool{}
	for rep := 1; rep <= 3; rep++ {
		o := r.order(rep)
		if len(o) != len(r.cfg.Plan.Scenarios) {
			t.Fatalf("rep %d: %d scenarios, want %d", rep, len(o), len(r.cfg.Plan.Scenarios))
		}
		first[o[0].Key] = true
	}
	if len(first) != 3 {
		t.Errorf("the first scenario should rotate over the three agent modes, got %v", first)
	}
}
