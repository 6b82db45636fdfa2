package e2e

import (
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"
)

// requestCounts sums istio_requests_total in a scrape by reporter and response_code.
func requestCounts(text string) map[string]float64 {
	counts := map[string]float64{}
	for _, line := range strings.Split(text, "\n") {
		labels, ok := strings.CutPrefix(line, "istio_requests_total{")
		if !ok {
			continue
		}
		end := strings.LastIndexByte(labels, '}')
		v, err := strconv.ParseFloat(strings.Fields(labels[end+1:])[0], 64)
		if err != nil {
			continue
		}
		var reporter, code string
		for _, kv := range strings.Split(labels[:end], ",") {
			k, val, _ := strings.Cut(kv, "=")
			switch k {
			case "reporter":
				reporter = strings.Trim(val, `"`)
			case "response_code":
				code = strings.Trim(val, `"`)
			}
		}
		counts[reporter+"/"+code] += v
	}
	return counts
}

// Metrics equal flows at L7: requests with a mix of statuses on one keep-alive
// connection to a Service on the other node are counted once by each side
// (reporter source on node1, destination on node2), by status, and each is a flow.
func TestL7MetricsEqualFlows(t *testing.T) {
	e := setup(t)
	before := map[string]map[string]float64{}
	for _, n := range []string{"node1", "node2"} {
		before[n] = requestCounts(e.scrape(t, n))
	}
	since := time.Now().UTC().Format(time.RFC3339Nano)
	want := map[string]int{"200": 20, "404": 6, "503": 4}
	args := []string{"-sS", "--max-time", "20"}
	for code, n := range want {
		for range n {
			args = append(args, "-o", "/dev/null", fmt.Sprintf("http://%s/status/%s", echoHTTPCVIP, code))
		}
	}
	if out, err := e.lab.Command(t.Context(), "a", "curl", args...).CombinedOutput(); err != nil {
		t.Fatalf("curl: %v\n%s", err, out)
	}

	for node, reporter := range map[string]string{"node1": "source", "node2": "destination"} {
		var after map[string]float64
		deadline := time.Now().Add(5 * time.Second) // a request is counted as its handler returns
		for {
			text := e.scrape(t, node)
			after = requestCounts(text)
			done := true
			for code, n := range want {
				done = done && after[reporter+"/"+code]-before[node][reporter+"/"+code] >= float64(n)
			}
			if done || time.Now().After(deadline) {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		for code, n := range want {
			if got := after[reporter+"/"+code] - before[node][reporter+"/"+code]; got != float64(n) {
				t.Errorf("%s: istio_requests_total{reporter=%q,response_code=%q} grew by %v, want %d", node, reporter, code, got, n)
			}
		}
	}
	for code, n := range want {
		flows := e.observe(t, "--since", since, "--protocol", "http", "--http-status", code, "--to-pod", "c")
		if len(flows) != 2*n { // one flow on each node
			t.Errorf("status %s: %d request flows, want %d (one per node per request):\n%s", code, len(flows), 2*n, flowsText(flows))
		}
	}
}
