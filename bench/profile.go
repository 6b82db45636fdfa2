// CPU profiles of the agents during the max-rate runs (ferry bench --profile):
// each agent's /debug/pprof/profile over its admin socket, saved as is and as a
// top list like `go tool pprof -top`, for the docs' "where the time goes".

package bench

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/google/pprof/profile"
)

// profiler fetches the agents' CPU profiles during one run.
type profiler struct {
	wg   sync.WaitGroup
	errs []error
}

// startProfiles starts fetching a CPU profile of d from every agent socket, into
// dir as <name>-<node>.pprof and .top.txt.
func startProfiles(ctx context.Context, dir, name string, sockets map[string]string, d time.Duration) *profiler {
	p := &profiler{errs: make([]error, len(sockets))}
	i := 0
	for node, sock := range sockets {
		p.wg.Add(1)
		go func(i int, node, sock string) {
			defer p.wg.Done()
			p.errs[i] = fetchProfile(ctx, sock, d, filepath.Join(dir, name+"-"+node))
		}(i, node, sock)
		i++
	}
	return p
}

// wait waits for the profiles and returns the first error.
func (p *profiler) wait() error {
	p.wg.Wait()
	for _, err := range p.errs {
		if err != nil {
			return err
		}
	}
	return nil
}

func fetchProfile(ctx context.Context, socket string, d time.Duration, base string) error {
	hc := &http.Client{Timeout: d + 10*time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var dl net.Dialer
			return dl.DialContext(ctx, "unix", socket)
		},
		DisableKeepAlives: true,
	}}
	secs := max(1, int(d.Round(time.Second)/time.Second))
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("http://agent/debug/pprof/profile?seconds=%d", secs), nil)
	if err != nil {
		return err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return fmt.Errorf("cpu profile: %w", err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("cpu profile: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("cpu profile: %s: %s", resp.Status, bytes.TrimSpace(raw))
	}
	if err := os.WriteFile(base+".pprof", raw, 0o644); err != nil {
		return fmt.Errorf("cpu profile: %w", err)
	}
	prof, err := profile.Parse(bytes.NewReader(raw))
	if err != nil {
		return fmt.Errorf("cpu profile: %w", err)
	}
	var top strings.Builder
	if err := writeTop(&top, prof, 25); err != nil {
		return err
	}
	return os.WriteFile(base+".top.txt", []byte(top.String()), 0o644)
}

// writeTop writes the n functions with the most CPU time of their own (flat), with
// their share and their cumulative time, as `go tool pprof -top` orders them.
func writeTop(w io.Writer, p *profile.Profile, n int) error {
	vi := slices.IndexFunc(p.SampleType, func(st *profile.ValueType) bool { return st.Type == "cpu" })
	if vi < 0 {
		vi = len(p.SampleType) - 1
	}
	if vi < 0 {
		return fmt.Errorf("cpu profile: no sample types")
	}
	flat, cum := map[string]int64{}, map[string]int64{}
	var total int64
	for _, s := range p.Sample {
		v := s.Value[vi]
		total += v
		seen := map[string]bool{}
		for li, loc := range s.Location {
			for lj, line := range loc.Line {
				if line.Function == nil {
					continue
				}
				fn := line.Function.Name
				// The leaf is the first line of the first location (inlined frames
				// come first).
				if li == 0 && lj == 0 {
					flat[fn] += v
				}
				if !seen[fn] {
					seen[fn] = true
					cum[fn] += v
				}
			}
		}
	}
	names := make([]string, 0, len(cum))
	for fn := range cum {
		names = append(names, fn)
	}
	slices.SortFunc(names, func(a, b string) int {
		if flat[a] != flat[b] {
			if flat[a] > flat[b] {
				return -1
			}
			return 1
		}
		return strings.Compare(a, b)
	})
	unit := "ns"
	if vi < len(p.SampleType) {
		unit = p.SampleType[vi].Unit
	}
	pct := func(v int64) float64 {
		if total == 0 {
			return 0
		}
		return float64(v) * 100 / float64(total)
	}
	sec := func(v int64) float64 {
		if unit == "nanoseconds" || unit == "ns" {
			return float64(v) / 1e9
		}
		return float64(v)
	}
	fmt.Fprintf(w, "Duration: %s, total samples = %.2fs\n      flat  flat%%   sum%%        cum   cum%%\n", time.Duration(p.DurationNanos).Round(10*time.Millisecond), sec(total))
	var sum int64
	for _, fn := range names[:min(n, len(names))] {
		sum += flat[fn]
		if _, err := fmt.Fprintf(w, "%9.2fs %5.2f%% %5.2f%% %9.2fs %5.2f%%  %s\n", sec(flat[fn]), pct(flat[fn]), pct(sum), sec(cum[fn]), pct(cum[fn]), fn); err != nil {
			return err
		}
	}
	return nil
}
