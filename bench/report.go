// The report: medians and spread of the repeated samples, each figure as a ratio
// to no mesh and to the HAProxy pair in the same placement, as markdown.

package bench

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// Stat is the median and spread of one figure over the repetitions.
type Stat struct {
	Median, Min, Max float64
	N                int
}

func newStat(vs []float64) Stat {
	if len(vs) == 0 {
		return Stat{}
	}
	s := slices.Clone(vs)
	slices.Sort(s)
	m := s[len(s)/2]
	if len(s)%2 == 0 {
		m = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return Stat{Median: m, Min: s[0], Max: s[len(s)-1], N: len(s)}
}

// metric picks one figure of a sample.
type metric struct {
	name   string
	unit   string
	get    func(Sample) float64
	prec   int
	ratios bool // show ×no mesh and ×HAProxy
}

// The figures the tables show; read-only after initialisation.
var (
	mQPS  = metric{name: "req/s", get: func(s Sample) float64 { return s.QPS }, prec: 0, ratios: true}
	mCall = metric{name: "calls/s", get: func(s Sample) float64 { return s.QPS }, prec: 0, ratios: true}
	mExch = metric{name: "exch/s", get: func(s Sample) float64 { return s.QPS }, prec: 0, ratios: true}
	mConn = metric{name: "conn/s", get: func(s Sample) float64 { return s.QPS }, prec: 0, ratios: true}
	mP50  = metric{name: "p50", unit: "ms", get: func(s Sample) float64 { return s.P50 }, prec: 3, ratios: true}
	mP90  = metric{name: "p90", unit: "ms", get: func(s Sample) float64 { return s.P90 }, prec: 3}
	mP99  = metric{name: "p99", unit: "ms", get: func(s Sample) float64 { return s.P99 }, prec: 3, ratios: true}
	mP999 = metric{name: "p99.9", unit: "ms", get: func(s Sample) float64 { return s.P999 }, prec: 3}
	mGbps = metric{name: "Gbit/s", get: func(s Sample) float64 { return s.Gbps }, prec: 2, ratios: true}
	mCPU  = metric{name: "proxy CPU s/1k req", get: func(s Sample) float64 { return s.CPUPer1k }, prec: 3, ratios: true}
	mCPUG = metric{name: "proxy CPU s/GiB", get: func(s Sample) float64 { return s.CPUPer1k }, prec: 2, ratios: true}
	mRSS  = metric{name: "peak RSS MiB", get: func(s Sample) float64 { return float64(s.PeakRSS) / (1 << 20) }, prec: 1}
	mErr  = metric{name: "errors", get: func(s Sample) float64 { return float64(s.Errors) }, prec: 0}
)

// table indexes the samples by scenario and workload.
type table map[string]map[string][]Sample

func index(samples []Sample) table {
	t := table{}
	for _, s := range samples {
		if s.Error != "" {
			continue
		}
		if t[s.Scenario] == nil {
			t[s.Scenario] = map[string][]Sample{}
		}
		t[s.Scenario][s.Workload] = append(t[s.Scenario][s.Workload], s)
	}
	return t
}

func (t table) stat(sc, w string, m metric) Stat {
	var vs []float64
	for _, s := range t[sc][w] {
		vs = append(vs, m.get(s))
	}
	return newStat(vs)
}

func fmtNum(v float64, prec int) string {
	if prec == 0 {
		return fmt.Sprintf("%.0f", v)
	}
	return fmt.Sprintf("%.*f", prec, v)
}

// cell is "median [min–max]".
func (st Stat) cell(prec int) string {
	if st.N == 0 {
		return "–"
	}
	if st.N == 1 || st.Min == st.Max {
		return fmtNum(st.Median, prec)
	}
	return fmt.Sprintf("%s [%s–%s]", fmtNum(st.Median, prec), fmtNum(st.Min, prec), fmtNum(st.Max, prec))
}

func ratio(a, b Stat) string {
	if a.N == 0 || b.N == 0 || b.Median == 0 {
		return "–"
	}
	return fmt.Sprintf("%.2f", a.Median/b.Median)
}

// metricsFor are the columns of a workload's table.
func metricsFor(w Workload) []metric {
	switch w.kind {
	case kindBulk:
		return []metric{mGbps, mCPUG, mRSS}
	case kindNewConn:
		return []metric{mConn, mP50, mP99, mCPU, mRSS, mErr}
	case kindRR:
		return []metric{mExch, mP50, mP99, mCPU, mRSS}
	}
	rate := mQPS
	if w.kind == kindGRPC {
		rate = mCall
	}
	if w.QPS == 0 {
		return []metric{rate, mP50, mP99, mCPU, mRSS, mErr}
	}
	return []metric{rate, mP50, mP90, mP99, mP999, mCPU, mRSS, mErr}
}

// summaryCol is one column of a summary table: a figure of one workload.
type summaryCol struct {
	title string
	w     string
	m     metric
}

// writeSummary writes a table of the scenarios that ran any of the columns'
// workloads, one figure a column with its ratios; l7 labels Ferry's rows with how
// Ferry carried them.
func writeSummary(b *strings.Builder, p Plan, t table, cols []summaryCol, l7 bool) {
	b.WriteString("| scenario |")
	for _, c := range cols {
		fmt.Fprintf(b, " %s |", c.title)
	}
	b.WriteString("\n|---|")
	for range cols {
		b.WriteString("---|")
	}
	b.WriteString("\n")
	for _, sc := range p.Scenarios {
		if !slices.ContainsFunc(cols, func(c summaryCol) bool { return p.workload(c.w).runsIn(sc) }) {
			continue
		}
		name := sc.Name
		if l7 {
			var ws []string
			for _, c := range cols {
				ws = append(ws, c.w)
			}
			name = rowName(sc, t, ws...)
		}
		fmt.Fprintf(b, "| %s |", name)
		for _, c := range cols {
			st := t.stat(sc.Key, c.w, c.m)
			cell := fmtNum(st.Median, c.m.prec)
			switch {
			case st.N == 0:
				cell = "–"
			case c.m.ratios && sc.proxy != proxyNone && c.m.name == mCPU.name:
				cell += fmt.Sprintf(" (×hap %s)", ratio(st, t.stat(sc.peerKey(), c.w, c.m)))
			case c.m.ratios && sc.proxy != proxyNone:
				cell += fmt.Sprintf(" (×nm %s, ×hap %s)", ratio(st, t.stat(sc.noMeshKey(), c.w, c.m)), ratio(st, t.stat(sc.peerKey(), c.w, c.m)))
			}
			fmt.Fprintf(b, " %s |", cell)
		}
		b.WriteString("\n")
	}
	b.WriteString("\n")
}

// rowName is the scenario's name, and for Ferry how it carried the workloads ws as
// its connection records say ("carried at L4", "carried at L7 http2").
func rowName(sc Scenario, t table, ws ...string) string {
	if sc.proxy != proxyFerry {
		return sc.Name
	}
	var how []string
	for _, w := range ws {
		for _, s := range t[sc.Key][w] {
			if s.Carried != "" && !slices.Contains(how, s.Carried) {
				how = append(how, s.Carried)
			}
		}
	}
	if len(how) == 0 {
		return sc.Name
	}
	return sc.Name + ", carried at " + strings.Join(how, " and ")
}

// WriteReport writes the markdown report.
func WriteReport(w io.Writer, res *Results) error {
	p := res.Plan
	t := index(res.Samples)
	scs := map[string]Scenario{}
	for _, s := range p.Scenarios {
		scs[s.Key] = s
	}
	kind := "full"
	if p.Quick {
		kind = "quick"
	}
	var b strings.Builder
	fmt.Fprintf(&b, "# Ferry benchmark, %s\n\n", res.Start.UTC().Format("2006-01-02 15:04 UTC"))
	fmt.Fprintf(&b, "Run: %s, %d repetitions of %s per workload (after a %s warm-up per scenario), %s in all, %d agent restarts to switch modes. Kernel %s, %s, %s.\n\n",
		kind, p.Reps, p.Duration, p.Warmup, res.Elapsed, res.Placement.Restarts, res.Placement.Kernel, res.Placement.GoVersion, res.Placement.HAProxyVer)
	pl := res.Placement
	if pl.Pinned {
		fmt.Fprintf(&b, "Placement on %d CPUs: load generators (fortio load, h2load, tcp-send) and servers (fortio server, TCP sink) on CPU %d (`taskset -c %d`); proxies (ferry-agent of both nodes, all three HAProxy processes) on CPU %d (`taskset -c %d`, agents re-pinned after each restart). Kernel work (softirq, netfilter, TLS-free TCP) runs on whichever CPU it lands on.\n\n",
			pl.CPUs, pl.AppCPU, pl.AppCPU, pl.ProxyCPU, pl.ProxyCPU)
	} else {
		fmt.Fprintf(&b, "Placement: %d CPU, so load generators, servers and proxies share it (nothing pinned).\n\n", pl.CPUs)
	}
	b.WriteString("Each figure is the median of the repetitions with the spread [min–max]. `×nm` is the median over the no-mesh median and `×hap` over the HAProxy pair's, both in the same placement (across nodes or same node). Latencies in ms. Proxy CPU is user+system time of the proxy processes from /proc/PID/stat (kernel work done in softirq or for iptables is not in it); peak RSS is the sum of their VmHWM. The machine is shared and noisy: compare ratios within this run, not absolute figures across runs.\n\n")

	writeGoals(&b, Goals(res))

	// The headline: a compact table of the key figures.
	b.WriteString("## Summary\n\n")
	writeSummary(&b, p, t, []summaryCol{
		{"p50 @1000 req/s", "http-1k-1000", mP50},
		{"p99 @1000 req/s", "http-1k-1000", mP99},
		{"max req/s 1 KiB", "http-1k-max", mQPS},
		{"max req/s 10 KiB", "http-10k-max", mQPS},
		{"new conn/s", "newconn", mConn},
		{"bulk Gbit/s", "bulk", mGbps},
		{"rr-small exch/s", "rr-small", mExch},
		{"rr-small p99", "rr-small", mP99},
		{"CPU s/1k req @max", "http-1k-max", mCPU},
		{"peak RSS MiB", "http-1k-max", mRSS},
	}, false)
	b.WriteString("## Summary, HTTP/2 and gRPC\n\n")
	fmt.Fprintf(&b, "HTTP/2: h2load (nghttp2), prior knowledge (h2c), %d connections × %d concurrent streams, GET of a 1 KiB body. gRPC: fortio's ping service, unary, 1 KiB each way, %d connections × %d concurrent calls. The HAProxy pair runs these at L7 (mode http, h2 over mTLS between the two). Ferry's clients dial a Service cluster IP whose port declares its protocol (appProtocol `kubernetes.io/h2c`, `grpc`); each Ferry row says how Ferry carried them, as the client node's connection records say: at L7 (requests proxied) or at L4 (a byte stream through the tunnel).\n\n",
		h2Conns, h2Streams, grpcConns, grpcStreams)
	writeSummary(&b, p, t, []summaryCol{
		{"HTTP/2 max req/s", "h2-1k-max", mQPS},
		{"HTTP/2 p50 @max", "h2-1k-max", mP50},
		{"HTTP/2 p99 @max", "h2-1k-max", mP99},
		{"gRPC p50 @1000 calls/s", "grpc-1k-1000", mP50},
		{"gRPC p99 @1000 calls/s", "grpc-1k-1000", mP99},
		{"gRPC max calls/s", "grpc-1k-max", mCall},
		{"CPU s/1k req HTTP/2 @max", "h2-1k-max", mCPU},
		{"CPU s/1k calls gRPC @max", "grpc-1k-max", mCPU},
	}, true)

	// The published-figures format: added latency over no mesh.
	b.WriteString("## Published-figures format: fortio, 1 KiB, 1,000 req/s, 16 connections, across nodes\n\n")
	b.WriteString("Added latency is the scenario's median percentile minus no mesh's, in ms, as mesh benchmarks publish it.\n\n")
	b.WriteString("| scenario | p50 | p90 | p99 | p99.9 | added p50 | added p90 | added p99 | added p99.9 |\n|---|---|---|---|---|---|---|---|---|\n")
	for _, sc := range p.Scenarios {
		if !sc.CrossNode || !p.workload("http-1k-1000").runsIn(sc) {
			continue
		}
		fmt.Fprintf(&b, "| %s |", sc.Name)
		ms := []metric{mP50, mP90, mP99, mP999}
		for _, m := range ms {
			fmt.Fprintf(&b, " %s |", t.stat(sc.Key, "http-1k-1000", m).cell(3))
		}
		for _, m := range ms {
			st, nm := t.stat(sc.Key, "http-1k-1000", m), t.stat("nomesh-x", "http-1k-1000", m)
			if st.N == 0 || nm.N == 0 {
				b.WriteString(" – |")
				continue
			}
			fmt.Fprintf(&b, " %+.3f |", st.Median-nm.Median)
		}
		b.WriteString("\n")
	}
	b.WriteString("\n")

	for _, wl := range p.Workloads {
		ms := metricsFor(wl)
		fmt.Fprintf(&b, "## %s\n\n| scenario |", wl.Name)
		for _, m := range ms {
			unit := ""
			if m.unit != "" {
				unit = " " + m.unit
			}
			fmt.Fprintf(&b, " %s%s |", m.name, unit)
			if m.ratios {
				fmt.Fprintf(&b, " ×nm | ×hap |")
			}
		}
		b.WriteString("\n|---|")
		for _, m := range ms {
			b.WriteString("---|")
			if m.ratios {
				b.WriteString("---|---|")
			}
		}
		b.WriteString("\n")
		for _, sc := range p.Scenarios {
			if !wl.runsIn(sc) {
				continue
			}
			fmt.Fprintf(&b, "| %s |", rowName(sc, t, wl.Key))
			for _, m := range ms {
				st := t.stat(sc.Key, wl.Key, m)
				fmt.Fprintf(&b, " %s |", st.cell(m.prec))
				if m.ratios {
					fmt.Fprintf(&b, " %s | %s |", ratio(st, t.stat(sc.noMeshKey(), wl.Key, m)), ratio(st, t.stat(sc.peerKey(), wl.Key, m)))
				}
			}
			b.WriteString("\n")
		}
		b.WriteString("\n")
	}
	writeProcTable(&b, p, res.Samples)
	writeAgentCosts(&b, p, res.Samples)

	var failed []Sample
	for _, s := range res.Samples {
		if s.Error != "" {
			failed = append(failed, s)
		}
	}
	if len(failed) > 0 {
		fmt.Fprintf(&b, "## Failed runs\n\n%d of %d workload runs failed; their figures are left out above (a cell with fewer repetitions, or –).\n\n| scenario | workload | repetition | error |\n|---|---|---|---|\n", len(failed), len(res.Samples))
		for _, s := range failed {
			fmt.Fprintf(&b, "| %s | %s | %d | %s |\n", s.Scenario, s.Workload, s.Rep, strings.ReplaceAll(s.Error, "\n", " "))
		}
		b.WriteString("\n")
	}
	b.WriteString("Plots: latency.png (p50 and p99 against offered load, HTTP/1.1 and gRPC), throughput.png (max req/s HTTP/1.1 and HTTP/2, max gRPC calls/s, new connections/s, bulk Gbit/s).\n")
	_, err := io.WriteString(w, b.String())
	return err
}

// workload is the plan's workload with key k; the zero Workload (which runs in no
// scenario) when the plan has none.
func (p Plan) workload(k string) Workload {
	if i := slices.IndexFunc(p.Workloads, func(w Workload) bool { return w.Key == k }); i >= 0 {
		return p.Workloads[i]
	}
	return Workload{only: []string{}}
}

// Save writes report.md, samples.json and the plots into dir, and returns the
// report's path.
func Save(dir string, res *Results) (string, error) {
	var md strings.Builder
	if err := WriteReport(&md, res); err != nil {
		return "", err
	}
	report := filepath.Join(dir, "report.md")
	if err := os.WriteFile(report, []byte(md.String()), 0o644); err != nil {
		return "", fmt.Errorf("report: %w", err)
	}
	raw, err := json.MarshalIndent(res, "", "  ")
	if err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(dir, "samples.json"), raw, 0o644); err != nil {
		return "", fmt.Errorf("samples: %w", err)
	}
	if err := Plot(dir, res); err != nil {
		return "", fmt.Errorf("plots: %w", err)
	}
	return report, nil
}

// writeProcTable gives each proxy process's own cost: CPU seconds per 1,000 requests
// at maximum rate (1 KiB, median over repetitions) and its peak RSS over the run.
func writeProcTable(b *strings.Builder, p Plan, samples []Sample) {
	type key struct{ sc, proc string }
	cpu := map[key][]float64{}
	rss := map[key]int64{}
	var order []key
	for _, s := range samples {
		for _, pc := range s.Procs {
			k := key{s.Scenario, pc.Name}
			if _, seen := rss[k]; !seen {
				order = append(order, k)
			}
			rss[k] = max(rss[k], pc.PeakRSS)
			if s.Workload == "http-1k-max" && s.Requests > 0 {
				cpu[k] = append(cpu[k], pc.CPU/(float64(s.Requests)/1000))
			}
		}
	}
	if len(order) == 0 {
		return
	}
	rank := map[string]int{}
	for i, sc := range p.Scenarios {
		rank[sc.Key] = i
	}
	slices.SortStableFunc(order, func(a, b key) int { return rank[a.sc] - rank[b.sc] })
	b.WriteString("## Proxy processes\n\nEach proxy process on its own: CPU seconds per 1,000 requests at maximum rate (1 KiB keep-alive; median [min–max]) and its peak RSS (largest VmHWM seen in the run; agents restart when the mode changes).\n\n| scenario | process | CPU s/1k req | peak RSS MiB |\n|---|---|---|---|\n")
	for _, k := range order {
		if len(cpu[k]) == 0 {
			continue // a scenario without the 1 KiB keep-alive workload
		}
		fmt.Fprintf(b, "| %s | %s | %s | %.1f |\n", k.sc, k.proc, newStat(cpu[k]).cell(3), float64(rss[k])/(1<<20))
	}
	b.WriteString("\n")
}
