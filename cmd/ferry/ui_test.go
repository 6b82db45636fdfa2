package main

import (
	"bytes"
	"context"
	"net/http/httptest"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/api/ferryv1"
	"github.com/ferrymesh/ferry/internal/privileged"
	"github.com/ferrymesh/ferry/operator/relay"
)

// The web view's service edges, in headless Chromium as the lab's web view test
// reads the page: 200 requests from a to Service default/web — 180 answered 200
// in 1 to 180 ms, 10 answered 503, 10 gRPC calls that came back 200 with grpc-status
// 14 — give an edge a → default/web with 200 requests, 90% success and the p99 of
// the latencies; a plain connection keeps its connection edge.
func TestWebViewServiceEdges(t *testing.T) {
	browser := privileged.LookPath(t, "chromium", "Debian chromium; make deps installs it")
	now := time.Now()
	var fs []*ferryv1.Flow
	var latencies []time.Duration
	for i := range 200 {
		at := now.Add(-time.Duration(200-i) * 10 * time.Millisecond)
		var f *ferryv1.Flow
		switch {
		case i%20 == 5:
			f = requestFlow(at, "http", "GET", "/items", 503, "", 500*time.Microsecond)
			f.Reason = "no_endpoints"
		case i%20 == 15:
			f = requestFlow(at, "grpc", "POST", "/shop.Cart/Add", 200, "14", 2*time.Millisecond)
		default:
			d := time.Duration(len(latencies)+1) * time.Millisecond
			latencies = append(latencies, d)
			f = requestFlow(at, "http", "GET", "/items", 200, "", d)
		}
		fs = append(fs, f)
	}
	conn := requestFlow(now, "tcp", "", "", 0, "", time.Second)
	conn.Http, conn.Service = nil, ""
	fs = append(fs, conn)
	sock := serveFlows(t, fs...)

	r, err := relay.New(relay.Config{Agents: []relay.Agent{{Name: "node1", Address: "unix://" + sock}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	defer r.Stop()
	srv := httptest.NewServer(uiHandler(r))
	defer srv.Close()

	ctx, cancel := context.WithTimeout(t.Context(), 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
		"--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
		"--user-data-dir="+t.TempDir(), "--window-size=1400,1100", "--virtual-time-budget=4000", "--dump-dom", srv.URL+"/")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("chromium: %v\n%s", err, stderr.String())
	}
	dom := string(out)
	if shot := os.Getenv("FERRY_UI_SCREENSHOT"); shot != "" {
		exec.CommandContext(ctx, browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--user-data-dir="+t.TempDir(),
			"--window-size=1400,1100", "--virtual-time-budget=4000", "--screenshot="+shot, srv.URL+"/").Run()
	}
	edge := regexp.MustCompile(`<g class="edge requests failing" data-edge="default/a-&gt;svc:default/web requests"[^>]*>`).FindString(dom)
	if edge == "" {
		t.Fatalf("no request edge default/a → service default/web in:\n%s", dom)
	}
	// Nearest rank: the 99th percentile of 180 latencies of 1..180 ms, the 503s' and
	// the calls' among them, is the 198th of 200 sorted: 178 ms.
	for _, want := range []string{`data-requests="200"`, `data-success="90.0"`, `data-p99-ms="178.0"`, `data-rate="3.33"`, `data-mtls="true"`} {
		if !strings.Contains(edge, want) {
			t.Errorf("edge %s lacks %s", edge, want)
		}
	}
	if !strings.Contains(dom, `200 req · 3.33/s · 90.0% ok · p99 178.0 ms`) {
		t.Errorf("the edge's label does not read 200 req · 3.33/s · 90.0%% ok · p99 178.0 ms")
	}
	if !strings.Contains(dom, `class="node service" data-node="svc:default/web"`) {
		t.Error("the map has no node for service default/web")
	}
	if !regexp.MustCompile(`<g class="edge mtls" data-edge="default/a-&gt;default/c" [^>]*data-conns="1"`).MatchString(dom) {
		t.Error("the connection edge a → c is gone")
	}
	if !strings.Contains(dom, `<td class="request">GET web.default/items</td><td class="status">503</td>`) ||
		!strings.Contains(dom, `<td class="status">200 grpc 14</td>`) {
		t.Error("the flow table lacks request and status cells")
	}
}
