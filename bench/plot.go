// PNG plots of a run: latency against offered load, and throughput per scenario.

package bench

import (
	"fmt"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strconv"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
)

// Plot writes latency.png and throughput.png into dir.
func Plot(dir string, res *Results) error {
	if err := plotLatency(filepath.Join(dir, "latency.png"), res); err != nil {
		return err
	}
	return plotThroughput(filepath.Join(dir, "throughput.png"), res)
}

// plotLatency draws median p50 and p99 against offered load, one line per
// scenario, one panel per percentile: HTTP/1.1 (1 KiB keep-alive, 16 connections),
// then gRPC unary calls (1 KiB).
func plotLatency(path string, res *Results) error {
	var panels []*plot.Plot
	for _, fam := range []struct {
		kind  workloadKind
		title string
		unit  string
	}{
		{kindHTTP, "HTTP/1.1 keep-alive, 1 KiB, 16 connections", "req/s"},
		{kindGRPC, fmt.Sprintf("gRPC unary, 1 KiB, %d connections × %d streams", grpcConns, grpcStreams), "calls/s"},
	} {
		ps, err := latencyPanels(res, fam.kind, fam.title, fam.unit)
		if err != nil {
			return err
		}
		panels = append(panels, ps...)
	}
	return savePanels(path, panels, 10*vg.Inch, 3.5*vg.Inch*vg.Length(len(panels)))
}

// latencyPanels are the p50 and p99 panels of the fixed-rate 1 KiB workloads of kind;
// none when the plan has no such workload.
func latencyPanels(res *Results, kind workloadKind, title, unit string) ([]*plot.Plot, error) {
	t := index(res.Samples)
	var fixed []Workload
	for _, w := range res.Plan.Workloads {
		if w.kind == kind && w.QPS > 0 && w.Payload == 1024 {
			fixed = append(fixed, w)
		}
	}
	if len(fixed) == 0 {
		return nil, nil
	}
	sort.Slice(fixed, func(i, j int) bool { return fixed[i].QPS < fixed[j].QPS })
	var panels []*plot.Plot
	for _, m := range []metric{mP50, mP99} {
		p := plot.New()
		p.Title.Text = fmt.Sprintf("%s latency, %s", m.name, title)
		p.X.Label.Text = "offered load (" + unit + ")"
		p.Y.Label.Text = m.name + " (ms, median of repetitions)"
		p.Legend.Top = true
		p.Legend.Left = false
		logY := m.name == mP99.name // tails span orders of magnitude between scenarios
		lo, hi := 0.0, 0.0
		for i, sc := range res.Plan.Scenarios {
			var pts plotter.XYs
			for _, w := range fixed {
				st := t.stat(sc.Key, w.Key, m)
				if st.N > 0 && st.Median > 0 {
					pts = append(pts, plotter.XY{X: float64(w.QPS), Y: st.Median})
					if lo == 0 || st.Median < lo {
						lo = st.Median
					}
					hi = max(hi, st.Median)
				}
			}
			if len(pts) == 0 {
				continue
			}
			l, s, err := plotter.NewLinePoints(pts)
			if err != nil {
				return nil, err
			}
			l.Color = plotutil.Color(i)
			l.Dashes = plotutil.Dashes(i / 7)
			s.Color = plotutil.Color(i)
			s.Shape = plotutil.Shape(i)
			p.Add(l, s)
			p.Legend.Add(sc.Key, l, s)
		}
		// The data keeps to the lower half of the panel, so the legend (top right)
		// covers none of it.
		const dataShare = 0.5
		switch {
		case logY && lo > 0:
			p.Y.Min = lo / 1.5
			p.Y.Max = p.Y.Min * math.Pow(hi*1.2/p.Y.Min, 1/dataShare)
			p.Y.Scale = plot.LogScale{}
			p.Y.Tick.Marker = plot.LogTicks{Prec: -1}
			p.Y.Label.Text += ", log scale"
		case hi > 0:
			p.Y.Min, p.Y.Max = 0, hi*1.1/dataShare
		}
		if len(fixed) == 1 { // one rate: a point in the middle, not an axis one req/s wide
			p.X.Min, p.X.Max = 0, 2*float64(fixed[0].QPS)
		}
		p.Add(plotter.NewGrid())
		panels = append(panels, p)
	}
	return panels, nil
}

// plotThroughput draws bars of max req/s (HTTP/1.1 and HTTP/2, 1 KiB), max gRPC
// calls/s, new connections/s and bulk Gbit/s, for the scenarios that ran each.
func plotThroughput(path string, res *Results) error {
	t := index(res.Samples)
	var panels []*plot.Plot
	for _, c := range []struct {
		title, w string
		m        metric
	}{
		{"max req/s, HTTP/1.1 keep-alive, 1 KiB, 16 connections", "http-1k-max", mQPS},
		{"new connections/s (one request each), 1 KiB", "newconn", mConn},
		{"bulk TCP, 1 connection (Gbit/s)", "bulk", mGbps},
		{fmt.Sprintf("max req/s, HTTP/2 h2c (h2load), 1 KiB, %d connections × %d streams", h2Conns, h2Streams), "h2-1k-max", mQPS},
		{fmt.Sprintf("max calls/s, gRPC unary, 1 KiB, %d connections × %d streams", grpcConns, grpcStreams), "grpc-1k-max", mCall},
	} {
		w := res.Plan.workload(c.w)
		var names []string
		for _, sc := range res.Plan.Scenarios {
			if w.runsIn(sc) {
				names = append(names, sc.Key)
			}
		}
		if len(names) == 0 {
			continue
		}
		p := plot.New()
		p.Title.Text = c.title
		p.Y.Label.Text = c.m.name + " (median; bar ends: min, max)"
		var vals plotter.Values
		var errs plotter.YErrors
		for _, sc := range res.Plan.Scenarios {
			if !w.runsIn(sc) {
				continue
			}
			st := t.stat(sc.Key, c.w, c.m)
			vals = append(vals, st.Median)
			errs = append(errs, struct{ Low, High float64 }{st.Median - st.Min, st.Max - st.Median})
		}
		bars, err := plotter.NewBarChart(vals, vg.Points(22))
		if err != nil {
			return err
		}
		bars.Color = plotutil.Color(0)
		p.Add(bars)
		pts := make(plotter.XYs, len(vals))
		for i, v := range vals {
			pts[i] = plotter.XY{X: float64(i), Y: v}
		}
		eb, err := plotter.NewYErrorBars(struct {
			plotter.XYer
			plotter.YErrorer
		}{pts, errs})
		if err != nil {
			return err
		}
		p.Add(eb)
		// Headroom over the highest bar end, which also keeps the default ticker
		// from choosing only two ticks when the top lands on a round number.
		top := 0.0
		for i, v := range vals {
			top = max(top, v+errs[i].High)
		}
		if top > 0 {
			p.Y.Min, p.Y.Max = 0, top*1.1
			p.Y.Tick.Marker = plot.TickerFunc(roundTicks)
		}
		p.NominalX(names...)
		p.Add(plotter.NewGrid())
		panels = append(panels, p)
	}
	return savePanels(path, panels, 11*vg.Inch, 4*vg.Inch*vg.Length(len(panels)))
}

// roundTicks labels 4 to 10 round values (a step of 1, 2 or 5 times a power of ten)
// from 0; gonum's default ticker can pick just two, labelled with decimals.
func roundTicks(lo, hi float64) []plot.Tick {
	step := math.Pow(10, math.Floor(math.Log10((hi-lo)/4)))
	for _, m := range []float64{1, 2, 5, 10} {
		if (hi-lo)/(m*step) <= 10 && (hi-lo)/(m*step) >= 4 {
			step *= m
			break
		}
	}
	decimals := max(0, int(-math.Floor(math.Log10(step))))
	var ticks []plot.Tick
	for i := math.Ceil(lo / step); i*step <= hi; i++ {
		ticks = append(ticks, plot.Tick{Value: i * step, Label: strconv.FormatFloat(i*step, 'f', decimals, 64)})
	}
	return ticks
}

// savePanels stacks the plots vertically in one PNG.
func savePanels(path string, panels []*plot.Plot, w, h vg.Length) error {
	if len(panels) == 0 {
		// A run cut down with --only may have nothing to draw here: no file.
		os.Remove(path)
		return nil
	}
	img := vgimg.New(w, h)
	dc := draw.New(img)
	tiles := draw.Tiles{Rows: len(panels), Cols: 1, PadY: vg.Points(12), PadX: vg.Points(6), PadTop: vg.Points(6), PadBottom: vg.Points(6)}
	cs := plot.Align(column(panels), tiles, dc)
	for i := range panels {
		panels[i].Draw(cs[i][0])
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := (vgimg.PngCanvas{Canvas: img}).WriteTo(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func column(ps []*plot.Plot) [][]*plot.Plot {
	out := make([][]*plot.Plot, len(ps))
	for i, p := range ps {
		out[i] = []*plot.Plot{p}
	}
	return out
}
