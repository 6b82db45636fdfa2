// The goals of issue 14, each computed from a run's medians: what was measured,
// the target, and whether it held.

package bench

import (
	"fmt"
	"io"
	"slices"
	"strings"
)

// Goal is one issue-14 goal as one run measured it.
type Goal struct {
	Key  string `json:"key"`
	What string `json:"what"`
	// Value is the measured figure (a ratio, MiB or vCPU); Target the bound it must
	// meet, from above (AtLeast) or below.
	Value   float64 `json:"value"`
	Target  float64 `json:"target"`
	AtLeast bool    `json:"at_least"`
	Unit    string  `json:"unit"` // "×" for ratios
	// Measured is false when the run lacked a figure the goal needs (a workload or
	// scenario not in the plan, or every repetition failed); Detail says which, or
	// what the value was computed from.
	Measured bool   `json:"measured"`
	Detail   string `json:"detail"`
}

// Held says whether the measured value meets the target.
func (g Goal) Held() bool {
	if !g.Measured {
		return false
	}
	if g.AtLeast {
		return g.Value >= g.Target
	}
	return g.Value <= g.Target
}

// Status is "held", "missed" or "not measured".
func (g Goal) Status() string {
	switch {
	case !g.Measured:
		return "not measured"
	case g.Held():
		return "held"
	}
	return "missed"
}

func (g Goal) cmp() string {
	if g.AtLeast {
		return "≥"
	}
	return "≤"
}

func (g Goal) fmtValue(v float64) string {
	if g.Unit == "×" {
		return fmt.Sprintf("%.2f×", v)
	}
	return fmt.Sprintf("%.3f %s", v, g.Unit)
}

// Scenarios the goals judge: Ferry as tested across nodes (eBPF capture, fast path
// on); HTTP/2 and gRPC in the --fast-path=false scenarios, which both the quick and
// the full run measure them in, beside the same Ferry through ports declared tcp.
const (
	goalFerry  = "ferry-x"
	goalL7     = "nofast-x"
	goalL4     = "nofast-tcp-x"
	goalPeer   = "haproxy-x"
	goalNoMesh = "nomesh-x"
	goalGoTLS  = "gotls-x"
	goalFast   = "ferry-s"
	goalNoFast = "nofast-s"
	goalLoadWl = "http-1k-1000"
)

// Goals computes every issue-14 goal from res.
func Goals(res *Results) []Goal {
	t := index(res.Samples)
	var gs []Goal
	// ratio goals: a figure of scenario a over the same figure of b.
	rat := func(key, what, w string, m metric, a, b string, target float64, atLeast bool) {
		g := Goal{Key: key, What: what, Target: target, AtLeast: atLeast, Unit: "×"}
		sa, sb := t.stat(a, w, m), t.stat(b, w, m)
		switch {
		case sa.N == 0:
			g.Detail = fmt.Sprintf("no %s %s figure in this run", a, w)
		case sb.N == 0:
			g.Detail = fmt.Sprintf("no %s %s figure in this run", b, w)
		case sb.Median == 0:
			g.Detail = fmt.Sprintf("%s %s %s is 0", b, w, m.name)
		default:
			g.Measured, g.Value = true, sa.Median/sb.Median
			g.Detail = fmt.Sprintf("%s %s / %s %s (%s)", a, fmtNum(sa.Median, m.prec), b, fmtNum(sb.Median, m.prec), m.name)
			if reps := res.Plan.Reps; sa.N < reps || sb.N < reps {
				g.Detail += fmt.Sprintf("; from %d and %d of %d repetitions, the others failed", sa.N, sb.N, reps)
			}
		}
		gs = append(gs, g)
	}
	// added-latency goals: Ferry's latency over no mesh against the pair's.
	added := func(key, what string, m metric) {
		g := Goal{Key: key, What: what, Target: 0.7, Unit: "×"}
		f, p, n := t.stat(goalFerry, goalLoadWl, m), t.stat(goalPeer, goalLoadWl, m), t.stat(goalNoMesh, goalLoadWl, m)
		switch {
		case f.N == 0 || p.N == 0 || n.N == 0:
			g.Detail = fmt.Sprintf("needs %s in %s, %s and %s", goalLoadWl, goalFerry, goalPeer, goalNoMesh)
		case p.Median <= n.Median:
			g.Detail = fmt.Sprintf("the pair added no %s latency (%.3f ≤ %.3f ms)", m.name, p.Median, n.Median)
		default:
			g.Measured, g.Value = true, (f.Median-n.Median)/(p.Median-n.Median)
			g.Detail = fmt.Sprintf("Ferry +%.3f ms / pair +%.3f ms over no mesh %.3f ms", f.Median-n.Median, p.Median-n.Median, n.Median)
		}
		gs = append(gs, g)
	}
	rat("max-1k", "max req/s, HTTP/1.1 1 KiB, ≥1.2× the pair", "http-1k-max", mQPS, goalFerry, goalPeer, 1.2, true)
	rat("max-10k", "max req/s, HTTP/1.1 10 KiB, ≥1.2× the pair", "http-10k-max", mQPS, goalFerry, goalPeer, 1.2, true)
	added("added-p50", "added p50 @1000 req/s ≤0.7× the pair's", mP50)
	added("added-p99", "added p99 @1000 req/s ≤0.7× the pair's", mP99)
	rat("cpu-1k", "proxy CPU per 1,000 req (1 KiB @1000 req/s) ≤ the pair's", goalLoadWl, mCPU, goalFerry, goalPeer, 1, false)
	rat("bulk-pair", "bulk Gbit/s ≥1.1× the pair", "bulk", mGbps, goalFerry, goalPeer, 1.1, true)
	rat("bulk-gotls", "bulk Gbit/s ≥0.8× Go crypto/tls without mesh", "bulk", mGbps, goalFerry, goalGoTLS, 0.8, true)
	rat("newconn", "new connections/s ≥3× the pair", "newconn", mConn, goalFerry, goalPeer, 3, true)
	rat("rr-nomesh", "rr-small exchanges/s ≥0.6× no mesh", "rr-small", mExch, goalFerry, goalNoMesh, 0.6, true)
	rat("rr-pair", "rr-small exchanges/s ≥1.2× the pair", "rr-small", mExch, goalFerry, goalPeer, 1.2, true)
	rat("fast-max", "same node: fast path max req/s (1 KiB) ≥1.3× no fast path", "http-1k-max", mQPS, goalFast, goalNoFast, 1.3, true)
	rat("fast-bulk", "same node: fast path bulk ≥1.3× no fast path", "bulk", mGbps, goalFast, goalNoFast, 1.3, true)
	rat("fast-p99", "same node: fast path p99 @1000 req/s no worse than no fast path", goalLoadWl, mP99, goalFast, goalNoFast, 1, false)
	rat("l7-h2", "HTTP/2 max req/s at L7 ≥ the pair", "h2-1k-max", mQPS, goalL7, goalPeer, 1, true)
	rat("l7-grpc", "gRPC max calls/s at L7 ≥ the pair", "grpc-1k-max", mCall, goalL7, goalPeer, 1, true)
	rat("l7-cost-h2", "HTTP/2 proxy CPU per 1,000 req at L7 ≤1.3× at L4", "h2-1k-max", mCPU, goalL7, goalL4, 1.3, false)
	rat("l7-cost-grpc", "gRPC proxy CPU per 1,000 calls at L7 ≤1.3× at L4", "grpc-1k-max", mCPU, goalL7, goalL4, 1.3, false)
	for _, a := range agentCosts(res.Samples, goalFerry) {
		mem := Goal{Key: "agent-mem " + a.node, What: "agent " + a.node + ": MiB per 1,000 req/s ≤12", Target: 12, Unit: "MiB", Measured: true,
			Value:  a.loadMiB / (a.qps / 1000),
			Detail: fmt.Sprintf("RSS %.1f MiB at %.0f req/s (idle %.1f MiB)", a.loadMiB, a.qps, a.idleMiB)}
		cpu := Goal{Key: "agent-cpu " + a.node, What: "agent " + a.node + ": vCPU per 1,000 req/s ≤0.06", Target: 0.06, Unit: "vCPU", Measured: true,
			Value:  a.vcpu / (a.qps / 1000),
			Detail: fmt.Sprintf("%.3f CPU s per s at %.0f req/s", a.vcpu, a.qps)}
		gs = append(gs, mem, cpu)
	}
	if !slices.ContainsFunc(gs, func(g Goal) bool { return strings.HasPrefix(g.Key, "agent-mem") }) {
		missing := fmt.Sprintf("no %s %s figure in this run", goalFerry, goalLoadWl)
		gs = append(gs,
			Goal{Key: "agent-mem", What: "agent: MiB per 1,000 req/s ≤12", Target: 12, Unit: "MiB", Detail: missing},
			Goal{Key: "agent-cpu", What: "agent: vCPU per 1,000 req/s ≤0.06", Target: 0.06, Unit: "vCPU", Detail: missing})
	}
	return gs
}

// agentCost is one agent's memory and CPU in one scenario at 1,000 req/s (medians
// over the repetitions).
type agentCost struct {
	node              string
	idleMiB, loadMiB  float64
	fileMiB           float64 // the file-backed part of loadMiB (the binary's pages)
	vcpu              float64 // CPU seconds per second of run
	qps               float64 // achieved rate
	deltaMiBPer1k     float64
	scenario, process string
}

// agentCosts are the agents' costs during the 1,000 req/s run of scenario sc, one
// per agent, in node order.
func agentCosts(samples []Sample, sc string) []agentCost {
	type acc struct{ idle, load, file, vcpu, qps []float64 }
	by := map[string]*acc{}
	var names []string
	for _, s := range samples {
		if s.Scenario != sc || s.Workload != goalLoadWl || s.Error != "" || s.Seconds <= 0 || s.QPS <= 0 {
			continue
		}
		for _, p := range s.Procs {
			if !strings.HasPrefix(p.Name, "ferry-agent ") || p.LoadRSS == 0 {
				continue
			}
			a := by[p.Name]
			if a == nil {
				a = &acc{}
				by[p.Name] = a
				names = append(names, p.Name)
			}
			a.idle = append(a.idle, float64(p.IdleRSS)/(1<<20))
			a.load = append(a.load, float64(p.LoadRSS)/(1<<20))
			a.file = append(a.file, float64(p.LoadFileRSS)/(1<<20))
			a.vcpu = append(a.vcpu, p.CPU/s.Seconds)
			a.qps = append(a.qps, s.QPS)
		}
	}
	slices.Sort(names)
	var out []agentCost
	for _, n := range names {
		a := by[n]
		c := agentCost{node: strings.TrimPrefix(n, "ferry-agent "), process: n, scenario: sc,
			idleMiB: newStat(a.idle).Median, loadMiB: newStat(a.load).Median, fileMiB: newStat(a.file).Median, vcpu: newStat(a.vcpu).Median, qps: newStat(a.qps).Median}
		c.deltaMiBPer1k = (c.loadMiB - c.idleMiB) / (c.qps / 1000)
		out = append(out, c)
	}
	return out
}

// writeGoals writes the goals as a markdown table.
func writeGoals(b *strings.Builder, gs []Goal) {
	held, measured := 0, 0
	for _, g := range gs {
		if g.Measured {
			measured++
		}
		if g.Held() {
			held++
		}
	}
	fmt.Fprintf(b, "## Issue 14 goals\n\n%d of %d goals held, %d missed, %d not measured in this run. Across nodes Ferry is `%s` (eBPF, fast path on), the pair `%s`, no mesh `%s`; HTTP/2 and gRPC compare `%s` (ports that declare the protocol) with `%s` (the same ports declared tcp). Agent memory is the RSS during the %s run divided by the rate in thousands (how ztunnel publishes MB per 1,000 req/s); vCPU is CPU seconds per second of that run over the same.\n\n",
		held, len(gs), measured-held, len(gs)-measured, goalFerry, goalPeer, goalNoMesh, goalL7, goalL4, goalLoadWl)
	b.WriteString("| goal | measured | target | status | from |\n|---|---|---|---|---|\n")
	for _, g := range gs {
		v := "–"
		if g.Measured {
			v = g.fmtValue(g.Value)
		}
		fmt.Fprintf(b, "| %s | %s | %s %s | %s | %s |\n", g.What, v, g.cmp(), g.fmtValue(g.Target), g.Status(), g.Detail)
	}
	b.WriteString("\n")
}

// WriteGoalsText prints the goals one a line, for the end of a run.
func WriteGoalsText(w io.Writer, gs []Goal) error {
	for _, g := range gs {
		v := "–"
		if g.Measured {
			v = g.fmtValue(g.Value)
		}
		if _, err := fmt.Fprintf(w, "  %-13s %-12s %-12s %-11s %s\n", g.Status(), v, g.cmp()+" "+g.fmtValue(g.Target), g.Key, g.Detail); err != nil {
			return err
		}
	}
	return nil
}

// writeAgentCosts writes each agent's memory and CPU at 1,000 req/s, per Ferry scenario.
func writeAgentCosts(b *strings.Builder, p Plan, samples []Sample) {
	var rows []agentCost
	for _, sc := range p.Scenarios {
		if sc.proxy == proxyFerry {
			rows = append(rows, agentCosts(samples, sc.Key)...)
		}
	}
	if len(rows) == 0 {
		return
	}
	fmt.Fprintf(b, "## Agent memory and CPU at 1,000 req/s\n\nPer agent, during the %s run (medians over repetitions). Idle RSS is VmRSS right before the run (after the warm-up and earlier runs, no load); RSS at load the largest VmRSS sampled every 100 ms during it. Of which file-backed is the part of RSS at load that is the binary's pages (RssFile), shared by every process running the binary; the rest is the agent's own memory. MiB per 1k req/s is RSS at load / (rate/1000), ztunnel's way; Δ per 1k is (RSS at load − idle) / (rate/1000), what the load itself costs. vCPU per 1k req/s is CPU seconds per second of run / (rate/1000).\n\n", goalLoadWl)
	b.WriteString("| scenario | agent | req/s | idle RSS MiB | RSS at load MiB | of which file-backed MiB | MiB per 1k req/s | Δ MiB per 1k req/s | vCPU per 1k req/s |\n|---|---|---|---|---|---|---|---|---|\n")
	for _, a := range rows {
		fmt.Fprintf(b, "| %s | %s | %.0f | %.1f | %.1f | %.1f | %.1f | %.2f | %.4f |\n", a.scenario, a.node, a.qps, a.idleMiB, a.loadMiB, a.fileMiB, a.loadMiB/(a.qps/1000), a.deltaMiBPer1k, a.vcpu/(a.qps/1000))
	}
	b.WriteString("\n")
}
