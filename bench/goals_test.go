package bench

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// goalResults is a quick plan's results where Ferry across nodes does 1.5× the
// pair's max req/s, adds 0.05 ms p50 where the pair adds 0.1, and the agents hold
// 20 and 10 MiB at 1,000 req/s.
func goalResults() *Results {
	res := fakeResults()
	for i := range res.Samples {
		s := &res.Samples[i]
		switch {
		case s.Scenario == "ferry-x" && s.Workload == "http-1k-max":
			s.QPS = 750
		case s.Scenario == "ferry-x" && s.Workload == "http-1k-1000":
			s.P50, s.QPS, s.Seconds = 0.15, 1000, 2
			s.Procs = []ProcCost{
				{Name: "ferry-agent node1", CPU: 0.1, IdleRSS: 15 << 20, LoadRSS: 20 << 20, LoadFileRSS: 12 << 20},
				{Name: "ferry-agent node2", CPU: 0.2, IdleRSS: 8 << 20, LoadRSS: 10 << 20},
			}
		}
	}
	return res
}

func goalByKey(t *testing.T, gs []Goal, key string) Goal {
	t.Helper()
	for _, g := range gs {
		if g.Key == key {
			return g
		}
	}
	t.Fatalf("no goal %q", key)
	return Goal{}
}

func TestGoals(t *testing.T) {
	gs := Goals(goalResults())
	for _, tc := range []struct {
		key    string
		value  float64
		status string
	}{
		{"max-1k", 1.5, "held"},            // 750 / 500
		{"max-10k", 1, "missed"},           // 500 / 500
		{"added-p50", 0.5, "held"},         // (0.15−0.1) / (0.2−0.1)
		{"rr-nomesh", 0.5, "missed"},       // 500 / 1000
		{"cpu-1k", 1, "held"},              // equal CPU per 1k meets ≤
		{"agent-mem node1", 20, "missed"},  // 20 MiB at 1000 req/s
		{"agent-mem node2", 10, "held"},    // 10 MiB
		{"agent-cpu node1", 0.05, "held"},  // 0.1 CPU s over 2 s at 1k req/s
		{"agent-cpu node2", 0.1, "missed"}, // 0.2 / 2
		{"bulk-gotls", 0.5, "missed"},      // 5 Gbit/s over no-mesh Go TLS 10
		{"fast-p99", 1, "held"},            // same p99
		{"l7-cost-h2", 1, "held"},          // same CPU at L7 and L4
		{"newconn", 1, "missed"},           // needs 3×
		{"added-p99", 0, "not measured"},   // the pair adds no p99 in the fake
	} {
		g := goalByKey(t, gs, tc.key)
		if g.Status() != tc.status {
			t.Errorf("%s: status %q, want %q (%+v)", tc.key, g.Status(), tc.status, g)
		}
		if g.Measured && (g.Value < tc.value-1e-9 || g.Value > tc.value+1e-9) {
			t.Errorf("%s: value %v, want %v", tc.key, g.Value, tc.value)
		}
	}
}

// TestGoalsWithoutWorkload: a run without the workloads a goal needs says so
// rather than passing or failing it.
func TestGoalsWithoutWorkload(t *testing.T) {
	res := goalResults()
	if err := res.Plan.Select([]string{"rr-small"}, []string{"nomesh-x", "ferry-x"}); err != nil {
		t.Fatal(err)
	}
	var keep []Sample
	for _, s := range res.Samples {
		if s.Workload == "rr-small" && (s.Scenario == "nomesh-x" || s.Scenario == "ferry-x") {
			keep = append(keep, s)
		}
	}
	res.Samples = keep
	gs := Goals(res)
	if g := goalByKey(t, gs, "rr-nomesh"); g.Status() != "missed" || g.Value != 0.5 {
		t.Errorf("rr-nomesh = %+v, want measured 0.5 and missed", g)
	}
	for _, k := range []string{"rr-pair", "max-1k", "agent-mem"} {
		if g := goalByKey(t, gs, k); g.Measured || !strings.Contains(g.Detail, "no ") {
			t.Errorf("%s = %+v, want not measured with the missing figure named", k, g)
		}
	}
}

// TestGoalsSayFailedRepetitions: a goal computed from fewer repetitions than the
// plan's says so.
func TestGoalsSayFailedRepetitions(t *testing.T) {
	res := goalResults()
	for i, s := range res.Samples {
		if s.Scenario == "ferry-x" && s.Workload == "rr-small" && s.Rep == 2 {
			res.Samples[i] = Sample{Scenario: s.Scenario, Workload: s.Workload, Rep: 2, Error: "rr-client: exit status 1"}
		}
	}
	g := goalByKey(t, Goals(res), "rr-pair")
	if !g.Measured || !strings.Contains(g.Detail, "from 2 and 3 of 3 repetitions") {
		t.Errorf("rr-pair = %+v, want measured from 2 of 3 repetitions", g)
	}
}

func TestReportHasGoalsAndAgentCosts(t *testing.T) {
	var b strings.Builder
	if err := WriteReport(&b, goalResults()); err != nil {
		t.Fatal(err)
	}
	md := b.String()
	goals, _, _ := strings.Cut(md, "## Summary")
	for _, want := range []string{
		"## Issue 14 goals",
		"| max req/s, HTTP/1.1 1 KiB, ≥1.2× the pair | 1.50× | ≥ 1.20× | held | ferry-x 750 / haproxy-x 500 (req/s) |",
		"| agent node1: MiB per 1,000 req/s ≤12 | 20.000 MiB | ≤ 12.000 MiB | missed |",
	} {
		if !strings.Contains(goals, want) {
			t.Errorf("goals section lacks %q:\n%s", want, goals)
		}
	}
	for _, want := range []string{
		"## Agent memory and CPU at 1,000 req/s",
		"| ferry-x | node1 | 1000 | 15.0 | 20.0 | 12.0 | 20.0 | 5.00 | 0.0500 |",
		"## small request-response, 16 B request, 64 B reply, 64 conns, no pipelining, max\n\n| scenario | exch/s | ×nm | ×hap |",
		"| Ferry mTLS tunnel, across nodes | 0.150 (×nm 1.50, ×hap 0.75) |",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("report lacks %q", want)
		}
	}
}

func TestHistoryAppendAndTable(t *testing.T) {
	file := filepath.Join(t.TempDir(), "results", "history.tsv")
	res := goalResults()
	gs := Goals(res)
	if err := AppendHistory(file, HistoryRows(res, gs, "abc123", false)); err != nil {
		t.Fatal(err)
	}
	// A second, later run where Ferry's max req/s fell to 600.
	res2 := goalResults()
	res2.Start = res.Start.Add(time.Hour)
	for i := range res2.Samples {
		if s := &res2.Samples[i]; s.Scenario == "ferry-x" && s.Workload == "http-1k-max" {
			s.QPS = 600
		}
	}
	if err := AppendHistory(file, HistoryRows(res2, Goals(res2), "def456", true)); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rows, err := ReadHistory(f)
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) != 2*len(gs) {
		t.Fatalf("%d rows, want %d", len(rows), 2*len(gs))
	}
	var b strings.Builder
	if err := WriteHistoryTable(&b, rows, "max-1k"); err != nil {
		t.Fatal(err)
	}
	want := "| goal | time (UTC) | commit | run | value | target | status | Δ |\n|---|---|---|---|---|---|---|---|\n" +
		"| max-1k | 2026-01-02 03:04 | abc123 | quick | 1.500 | ≥ 1.2 | held | – |\n" +
		"| max-1k | 2026-01-02 04:04 | def456 (dirty) | quick | 1.200 | ≥ 1.2 | held | -20.0% |\n"
	if b.String() != want {
		t.Errorf("history table:\n%s\nwant:\n%s", b.String(), want)
	}
	md, err := os.ReadFile(filepath.Join(filepath.Dir(file), "history.md"))
	if err != nil || !strings.Contains(string(md), "| max-1k | 2026-01-02 04:04 | def456 (dirty) |") {
		t.Errorf("history.md: %v\n%s", err, md)
	}
	// A goal not measured keeps its row, without a value.
	if !strings.Contains(string(md), "| added-p99 | 2026-01-02 03:04 | abc123 | quick | – | ≤ 0.7 | not measured | – |") {
		t.Errorf("history.md lacks the unmeasured added-p99 row:\n%s", md)
	}
}

func TestReadHistoryRejectsOtherFiles(t *testing.T) {
	if _, err := ReadHistory(strings.NewReader("a\tb\n")); err == nil {
		t.Error("a file without the history header was read as history")
	}
}

func TestSelect(t *testing.T) {
	p := NewPlan(true)
	if err := p.Select([]string{"rr-small"}, nil); err != nil {
		t.Fatal(err)
	}
	if p.Runs() != len(rrScenarios)*p.Reps || !p.Selected {
		t.Errorf("rr-small only: %d runs, want %d", p.Runs(), len(rrScenarios)*p.Reps)
	}
	if err := p.Select(nil, []string{"ipt-x"}); err == nil {
		t.Error("rr-small in ipt-x only should be no run at all")
	}
	q := NewPlan(true)
	if err := q.Select([]string{"no-such"}, nil); err == nil || !strings.Contains(err.Error(), "rr-small") {
		t.Errorf("unknown workload: %v, want an error listing the keys", err)
	}
}

// TestSaveSubsetWithoutPlots: a run of rr-small only has no latency curve to draw;
// saving it writes the report without failing.
func TestSaveSubsetWithoutPlots(t *testing.T) {
	res := goalResults()
	if err := res.Plan.Select([]string{"rr-small"}, nil); err != nil {
		t.Fatal(err)
	}
	var keep []Sample
	for _, s := range res.Samples {
		if s.Workload == "rr-small" {
			keep = append(keep, s)
		}
	}
	res.Samples = keep
	dir := t.TempDir()
	if _, err := Save(dir, res); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "report.md")); err != nil {
		t.Error(err)
	}
}
