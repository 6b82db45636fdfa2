// HTTP/2 load with h2load (Debian nghttp2-client), and how Ferry carried an HTTP/2
// or gRPC workload, read from the client node's connection records.

package bench

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"math"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/ferrymesh/ferry/api/admin"
)

// h2load runs h2load in the scenario's client pod: w.Conns connections with
// w.Streams concurrent streams each, prior knowledge (h2c), GET of a w.Payload-byte
// body from fortio's echo, for d; at w.QPS requests per second when set. Latency
// percentiles come from its per-request log.
func (r *runner) h2load(ctx context.Context, sc Scenario, w Workload, d time.Duration) (Sample, error) {
	target := sc.target(protoH2, r.podIP(sc.server))
	logPath := filepath.Join(r.tmp, "h2load.log")
	os.Remove(logPath) // h2load appends
	args := []string{"-c", strconv.Itoa(w.Conns), "-m", strconv.Itoa(max(1, w.Streams)), "-t", "1",
		"-D", d.String(), "--log-file", logPath}
	if wu := r.cfg.Plan.H2Warmup; wu > 0 {
		args = append(args, "--warm-up-time", wu.String())
	}
	if w.QPS > 0 {
		// --rps is per connection.
		args = append(args, "--rps", strconv.Itoa(max(1, w.QPS/w.Conns)))
	}
	args = append(args, fmt.Sprintf("http://%s/echo?size=%d", target, w.Payload))
	bin, args := r.onApp("h2load", args...)
	rctx, cancel := context.WithTimeout(ctx, r.cfg.Plan.H2Warmup+d+30*time.Second)
	defer cancel()
	out, err := r.lab.Command(rctx, sc.client, bin, args...).CombinedOutput()
	if err != nil {
		return Sample{}, fmt.Errorf("h2load: %w: %s", err, lastLines(out, 5))
	}
	s, err := parseH2load(out)
	if err != nil {
		return Sample{}, err
	}
	lg, err := os.ReadFile(logPath)
	if err != nil {
		return Sample{}, fmt.Errorf("h2load log: %w", err)
	}
	lat, err := h2loadLatencies(lg)
	if err != nil {
		return Sample{}, err
	}
	s.P50, s.P90, s.P99, s.P999 = percentile(lat, 50), percentile(lat, 90), percentile(lat, 99), percentile(lat, 99.9)
	if s.Requests == 0 || s.Errors == s.Requests {
		return s, fmt.Errorf("no successful request (%d sent): %s", s.Requests, lastLines(out, 8))
	}
	return s, nil
}

var (
	h2Finished = regexp.MustCompile(`(?m)^finished in [^,]+, ([0-9.]+) req/s`)
	h2Requests = regexp.MustCompile(`(?m)^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout`)
	h2Statuses = regexp.MustCompile(`(?m)^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx`)
)

// parseH2load reads h2load's summary: the rate over the measured time, the requests
// done, and as errors those that failed or were not answered 2xx.
func parseH2load(out []byte) (Sample, error) {
	f, q, st := h2Finished.FindSubmatch(out), h2Requests.FindSubmatch(out), h2Statuses.FindSubmatch(out)
	if f == nil || q == nil || st == nil {
		return Sample{}, fmt.Errorf("h2load output: no summary: %s", lastLines(out, 8))
	}
	n := func(b []byte) int64 { v, _ := strconv.ParseInt(string(b), 10, 64); return v }
	qps, _ := strconv.ParseFloat(string(f[1]), 64)
	return Sample{QPS: qps, Requests: n(q[3]), Errors: n(q[5]) + n(st[2]) + n(st[3]) + n(st[4])}, nil
}

// h2loadLatencies are the response times in ms of the requests in h2load's log
// (tab-separated: start µs since the epoch, status, µs to the end of the response),
// sorted. Status -1 is a failed stream; status 0 a request that began in the
// warm-up and ended in the measured time (h2load counts it done but not in the
// status codes): neither is a measured request.
func h2loadLatencies(log []byte) ([]float64, error) {
	var lat []float64
	sc := bufio.NewScanner(bytes.NewReader(log))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 3 {
			continue
		}
		if f[1] == "-1" || f[1] == "0" {
			continue
		}
		us, err := strconv.ParseFloat(f[2], 64)
		if err != nil {
			return nil, fmt.Errorf("h2load log line %q: %w", sc.Text(), err)
		}
		lat = append(lat, us/1000)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("h2load log: %w", err)
	}
	slices.Sort(lat)
	return lat, nil
}

// percentile is the nearest-rank p-th percentile of sorted values; 0 for none.
func percentile(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(p/100*float64(len(sorted)))) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

// carried says how Ferry carried the workload's connections to the Service address
// since start, from the connection records of the client node's agent: "L7 http2"
// or "L7 grpc" when the proxy carried requests, "L4" when it carried byte streams,
// "" when the agent has no record of them (or does not answer).
func (r *runner) carried(ctx context.Context, sc Scenario, w Workload, start time.Time) string {
	svc, err := netip.ParseAddrPort(sc.via[w.kind.proto()])
	if err != nil {
		return ""
	}
	pod, _ := r.lab.Pod(sc.client)
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	cs, err := admin.NewClient(r.lab.AgentSocket(pod.Node)).Connections(ctx)
	if err != nil {
		r.log.Warn("connection records", "node", pod.Node, "error", err)
		return ""
	}
	return carriedBy(append(cs.Live, cs.Ended...), svc, start)
}

// carriedBy is what the records of connections to svc that began after start say.
func carriedBy(conns []admin.Conn, svc netip.AddrPort, start time.Time) string {
	seen := false
	for _, c := range conns {
		if c.Service != svc || c.Start.Before(start) {
			continue
		}
		seen = true
		if c.HTTP != nil || c.Protocol == admin.HTTP2 || c.Protocol == admin.GRPC || c.Protocol == admin.HTTP1 {
			if c.Protocol == "" {
				return "L7"
			}
			return "L7 " + string(c.Protocol)
		}
	}
	if seen {
		return "L4"
	}
	return ""
}
