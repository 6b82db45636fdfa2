package e2e

// Observability end to end: lab traffic as flows through `ferry observe` (every
// filter, follow, the merge of both nodes in time order) and the agents' Prometheus
// metrics agreeing with the flows.

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"github.com/ferrymesh/ferry/internal/promcheck"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/api/ferryv1"
	"google.golang.org/protobuf/encoding/protojson"
)

// observe runs `ferry observe --lab e2e -o json ARGS...` and returns its flows.
func (e *env) observe(t *testing.T, args ...string) []*ferryv1.Flow {
	t.Helper()
	return e.observeLab(t, prefix, args...)
}

// observeLab is observe for the lab with prefix lab.
func (e *env) observeLab(t *testing.T, lab string, args ...string) []*ferryv1.Flow {
	t.Helper()
	cmd := exec.Command(filepath.Join(e.bin, "ferry"), append([]string{"observe", "--lab", lab, "-o", "json"}, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("ferry observe %v: %v\n%s", args, err, stderr.String())
	}
	return parseFlows(t, out)
}

func parseFlows(t *testing.T, out []byte) []*ferryv1.Flow {
	t.Helper()
	var fs []*ferryv1.Flow
	for _, line := range bytes.Split(bytes.TrimSpace(out), []byte("\n")) {
		if len(line) == 0 {
			continue
		}
		f := &ferryv1.Flow{}
		if err := protojson.Unmarshal(line, f); err != nil {
			t.Fatalf("flow %q: %v", line, err)
		}
		fs = append(fs, f)
	}
	return fs
}

func flowText(f *ferryv1.Flow) string {
	s, d := f.GetSource(), f.GetDestination()
	return fmt.Sprintf("%s %s %s/%s(%s) -> %s/%s(%s):%d %s %s %d/%d %s", f.GetTime().AsTime().Format("15:04:05.000000"),
		f.GetNode(), s.GetNamespace(), s.GetPod(), s.GetIdentity(), d.GetNamespace(), d.GetPod(), d.GetIdentity(), d.GetPort(),
		f.GetSecurity(), f.GetVerdict(), f.GetBytesSent(), f.GetBytesReceived(), f.GetReason())
}

func flowsText(fs []*ferryv1.Flow) string {
	var b strings.Builder
	for _, f := range fs {
		b.WriteString("  " + flowText(f) + "\n")
	}
	return b.String()
}

// expectFlow is what one flow must show.
type expectFlow struct {
	name            string
	node, direction string
	srcPod, dstPod  string
	srcID, dstID    string
	port            uint32
	security        string
	verdict         ferryv1.Verdict
	bytesEachWay    uint64 // 0: not checked
}

func (x expectFlow) match(f *ferryv1.Flow) bool {
	s, d := f.GetSource(), f.GetDestination()
	return f.GetNode() == x.node && f.GetDirection() == x.direction && s.GetPod() == x.srcPod && d.GetPod() == x.dstPod &&
		s.GetIdentity() == x.srcID && d.GetIdentity() == x.dstID && d.GetPort() == x.port && f.GetSecurity() == x.security &&
		f.GetVerdict() == x.verdict && (x.bytesEachWay == 0 || f.GetBytesSent() == x.bytesEachWay && f.GetBytesReceived() == x.bytesEachWay)
}

func id(pod string) string { return "spiffe://cluster.local/ns/default/sa/" + pod }

// metricSums scrapes node's agent /metrics through its admin socket and sums each
// metric over its series.
func (e *env) scrape(t *testing.T, node string) string {
	t.Helper()
	resp, err := e.lab.AgentClient(node).Get("http://agent/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics on %s: %s %v", node, resp.Status, err)
	}
	return string(b)
}

func metricSums(text string) map[string]float64 {
	sums := map[string]float64{}
	for _, line := range strings.Split(text, "\n") {
		if line == "" || line[0] == '#' {
			continue
		}
		name, rest, _ := strings.Cut(line, " ")
		if i := strings.IndexByte(line, '{'); i >= 0 {
			name = line[:i]
			rest = line[strings.LastIndexByte(line, '}')+2:]
		}
		v, err := strconv.ParseFloat(strings.Fields(rest)[0], 64)
		if err == nil {
			sums[name] += v
		}
	}
	return sums
}

// foreign says whether a flow is not TestObserve's: on another port than its own.
func foreign(f *ferryv1.Flow) bool {
	p := f.GetDestination().GetPort()
	return p != echoPort && p != closedPort
}

func TestObserve(t *testing.T) {
	e := setup(t)
	nodes := e.lab.Nodes()
	// The lab is shared: a connection an earlier test left open (a keep-alive client
	// still closing) would end inside this test's window and be one flow more. Wait
	// for the agents to carry nothing before counting.
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		live := 0
		for _, n := range nodes {
			if cs, err := e.admin(n).Connections(context.Background()); err == nil {
				live += len(cs.Live)
			}
		}
		if live == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Logf("%d connections of earlier tests still live after 30 s; counting anyway", live)
			break
		}
	}
	before := map[string]map[string]float64{}
	for _, n := range nodes {
		before[n] = metricSums(e.scrape(t, n))
	}
	start := time.Now()
	since := start.UTC().Format(time.RFC3339Nano)

	// Traffic on every path: across nodes (mTLS), on one node, from a pod outside the
	// mesh, and to a port where nothing listens.
	e.mustRun(t, "a", "echo", e.addr("c", echoPort), "100000")
	sent := time.Now()
	want := []expectFlow{
		{name: "a→c at the source", node: "node1", direction: "outbound", srcPod: "a", dstPod: "c", srcID: id("a"), dstID: id("c"),
			port: echoPort, security: "mtls", verdict: ferryv1.Verdict_VERDICT_FORWARDED, bytesEachWay: 100000},
		{name: "a→c at the destination", node: "node2", direction: "inbound", srcPod: "a", dstPod: "c", srcID: id("a"), dstID: id("c"),
			port: echoPort, security: "mtls", verdict: ferryv1.Verdict_VERDICT_FORWARDED, bytesEachWay: 100000},
	}
	// How soon after the client's exit the flows are in ferry observe is reported; the
	// deadline only stops a hung test.
	var fs []*ferryv1.Flow
	for {
		// Only this test's ports: on the shared lab other tests' long connections
		// (a bulk stream to c:8092) may end inside this window.
		fs = slices.DeleteFunc(e.observe(t, "--since", since), foreign)
		if countMatches(fs, want) == len(want) {
			break
		}
		if time.Since(sent) > carryWait {
			t.Fatalf("%v after the connection ended, ferry observe shows:\n%swant %+v", carryWait, flowsText(fs), want)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("flows of a→c visible in ferry observe %v after the client ended", time.Since(sent).Round(time.Millisecond))

	e.mustRun(t, "a", "echo", e.addr("b", echoPort), "5000")
	e.mustRun(t, "d", "echo", e.addr("b", echoPort), "7000")
	e.mustRun(t, "a", "refused", e.addr("c", closedPort))
	want = append(want,
		expectFlow{name: "a→b on one node", node: "node1", direction: "outbound", srcPod: "a", dstPod: "b", srcID: id("a"), dstID: id("b"),
			port: echoPort, security: "same-node", verdict: ferryv1.Verdict_VERDICT_FORWARDED, bytesEachWay: 5000},
		expectFlow{name: "d (outside the mesh)→b", node: "node1", direction: "inbound", srcPod: "", dstPod: "b", srcID: "", dstID: id("b"),
			port: echoPort, security: "plaintext", verdict: ferryv1.Verdict_VERDICT_FORWARDED, bytesEachWay: 7000},
		expectFlow{name: "a→c closed port at the source", node: "node1", direction: "outbound", srcPod: "a", dstPod: "c", srcID: id("a"), dstID: id("c"),
			port: closedPort, security: "mtls", verdict: ferryv1.Verdict_VERDICT_ERROR},
		expectFlow{name: "a→c closed port at the destination", node: "node2", direction: "inbound", srcPod: "a", dstPod: "c", srcID: id("a"), dstID: id("c"),
			port: closedPort, security: "mtls", verdict: ferryv1.Verdict_VERDICT_ERROR},
	)
	deadline := time.Now().Add(carryWait)
	for {
		// Only this test's ports: on the shared lab other tests' long connections
		// (a bulk stream to c:8092) may end inside this window.
		fs = slices.DeleteFunc(e.observe(t, "--since", since), foreign)
		if countMatches(fs, want) == len(want) {
			break
		}
		if time.Now().After(deadline) {
			for _, w := range want {
				if countMatches(fs, []expectFlow{w}) == 0 {
					t.Errorf("no flow for %s: want %+v", w.name, w)
				}
			}
			t.Fatalf("ferry observe shows:\n%s", flowsText(fs))
		}
		time.Sleep(50 * time.Millisecond)
	}
	if len(fs) != len(want) {
		t.Fatalf("ferry observe shows %d flows since the test started, want %d:\n%s", len(fs), len(want), flowsText(fs))
	}
	t.Logf("flows:\n%s", flowsText(fs))

	t.Run("merged in time order from both nodes", func(t *testing.T) {
		seen := map[string]bool{}
		for i, f := range fs {
			seen[f.GetNode()] = true
			if i > 0 && f.GetTime().AsTime().Before(fs[i-1].GetTime().AsTime()) {
				t.Errorf("flow %d is older than flow %d:\n%s", i, i-1, flowsText(fs[i-1:i+1]))
			}
		}
		if !seen["node1"] || !seen["node2"] {
			t.Errorf("flows from %v, want node1 and node2", seen)
		}
	})

	t.Run("filters", func(t *testing.T) {
		for _, tc := range []struct {
			args []string
			want func(f *ferryv1.Flow) bool
		}{
			{[]string{"--from-pod", "a"}, func(f *ferryv1.Flow) bool { return f.GetSource().GetPod() == "a" }},
			{[]string{"--from-pod", "default/a", "--to-pod", "b"}, func(f *ferryv1.Flow) bool {
				return f.GetSource().GetPod() == "a" && f.GetDestination().GetPod() == "b"
			}},
			{[]string{"--to-pod", "c"}, func(f *ferryv1.Flow) bool { return f.GetDestination().GetPod() == "c" }},
			{[]string{"--namespace", "default"}, func(*ferryv1.Flow) bool { return true }},
			{[]string{"--namespace", "other"}, func(*ferryv1.Flow) bool { return false }},
			{[]string{"--from-identity", id("a")}, func(f *ferryv1.Flow) bool { return f.GetSource().GetIdentity() == id("a") }},
			{[]string{"--to-identity", "default/b"}, func(f *ferryv1.Flow) bool { return f.GetDestination().GetIdentity() == id("b") }},
			{[]string{"--verdict", "error"}, func(f *ferryv1.Flow) bool { return f.GetVerdict() == ferryv1.Verdict_VERDICT_ERROR }},
			{[]string{"--verdict", "forwarded,dropped"}, func(f *ferryv1.Flow) bool { return f.GetVerdict() == ferryv1.Verdict_VERDICT_FORWARDED }},
			{[]string{"--protocol", "tcp"}, func(f *ferryv1.Flow) bool { return f.GetProtocol() == "tcp" }},
			{[]string{"--protocol", "http"}, func(f *ferryv1.Flow) bool { return f.GetProtocol() == "http" }},
			{[]string{"--http-status", "200"}, func(f *ferryv1.Flow) bool { return f.GetHttp().GetStatus() == 200 }},
			{[]string{"--port", strconv.Itoa(closedPort)}, func(f *ferryv1.Flow) bool { return f.GetDestination().GetPort() == closedPort }},
			{[]string{"--node", "node2"}, func(f *ferryv1.Flow) bool { return f.GetNode() == "node2" }},
		} {
			got := slices.DeleteFunc(e.observe(t, append(tc.args, "--since", since)...), foreign)
			var wantN int
			for _, f := range fs {
				if tc.want(f) {
					wantN++
				}
			}
			ok := len(got) == wantN
			for _, f := range got {
				ok = ok && tc.want(f)
			}
			if !ok {
				t.Errorf("ferry observe %v: %d flows, want %d:\n%s", tc.args, len(got), wantN, flowsText(got))
			}
		}
		// --last is the window's tail, whatever else ended in it: another test's
		// connection may end inside this test's window, so the tail is compared with
		// every flow of the window, read again until no flow ended in between.
		same := func(a, b *ferryv1.Flow) bool { return a.GetId() == b.GetId() && a.GetNode() == b.GetNode() }
		var got, all []*ferryv1.Flow
		for range 5 {
			got = e.observe(t, "--since", since, "--last", "2")
			all = e.observe(t, "--since", since)
			if len(all) >= 2 && len(got) == 2 && same(got[0], all[len(all)-2]) && same(got[1], all[len(all)-1]) {
				break
			}
			got = nil
		}
		if got == nil {
			t.Errorf("--last 2 is not the last two flows of the window:\n%s", flowsText(all))
		}
		if got := e.observe(t, "--since", "1h", "--to-pod", "b", "--from-pod", "a"); countMatches(got, want[2:3]) != 1 {
			t.Errorf("--since 1h lost a→b:\n%s", flowsText(got))
		}
		out, err := exec.Command(filepath.Join(e.bin, "ferry"), "observe", "--lab", prefix, "--verdict", "denied").CombinedOutput()
		if err == nil || !strings.Contains(string(out), "want forwarded, dropped or error") {
			t.Errorf("--verdict denied: %v %s", err, out)
		}
	})

	t.Run("metrics agree with flows", func(t *testing.T) {
		// The metrics count every connection of the window, by workload, with no
		// port: another test's (a pooled L7 connection through a Service ending
		// late) cannot be told from this one's there.
		if other := slices.DeleteFunc(e.observe(t, "--since", since), func(f *ferryv1.Flow) bool { return !foreign(f) }); len(other) > 0 {
			t.Logf("other tests' connections ended in this window, so the metrics cannot be compared with this test's flows:\n%s", flowsText(other))
			return
		}
		// A same-node connection is one flow but counted under both reporters in the
		// metrics (one proxy stands for both sides, as two sidecars would count it).
		var conns, reqBytes, respBytes float64
		for _, f := range fs {
			sides := 1.0
			if f.GetSecurity() == "same-node" {
				sides = 2
			}
			conns += sides
			reqBytes += sides * float64(f.GetBytesSent())
			respBytes += sides * float64(f.GetBytesReceived())
		}
		var mConns, mOpened, mReq, mResp float64
		for _, n := range nodes {
			text := e.scrape(t, n)
			promcheck.Check(t, text)
			after := metricSums(text)
			mConns += after["istio_tcp_connections_closed_total"] - before[n]["istio_tcp_connections_closed_total"]
			mOpened += after["istio_tcp_connections_opened_total"] - before[n]["istio_tcp_connections_opened_total"]
			mReq += after["istio_tcp_received_bytes_total"] - before[n]["istio_tcp_received_bytes_total"]
			mResp += after["istio_tcp_sent_bytes_total"] - before[n]["istio_tcp_sent_bytes_total"]
			if _, ok := after["ferry_datapath_events_total"]; !ok || after["ferry_bpf_map_max_entries"] == 0 {
				t.Errorf("%s: no kernel counters or map sizes in the scrape", n)
			}
			// node1's programs redirected a's connections during the test. (node2's
			// may have counted nothing: its traffic here arrives on the tunnel port.)
			if n == "node1" && after["ferry_datapath_events_total"] <= before[n]["ferry_datapath_events_total"] {
				t.Errorf("%s: the kernel counters did not move (%v before the traffic, %v after)", n,
					before[n]["ferry_datapath_events_total"], after["ferry_datapath_events_total"])
			}
		}
		t.Logf("flows: %v connections, %v bytes request, %v bytes response; metrics: %v closed, %v opened, %v received, %v sent",
			conns, reqBytes, respBytes, mConns, mOpened, mReq, mResp)
		within := func(name string, m, f float64) {
			if f == 0 && m == 0 {
				return
			}
			if d := (m - f) / f; d > 0.01 || d < -0.01 {
				t.Errorf("%s: metrics %v, flows %v: more than 1%% apart", name, m, f)
			}
		}
		within("connections closed", mConns, conns)
		within("connections opened", mOpened, conns)
		within("request bytes", mReq, reqBytes)
		within("response bytes", mResp, respBytes)
	})

	t.Run("follow streams new flows", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, filepath.Join(e.bin, "ferry"), "observe", "--lab", prefix, "-f", "-o", "json", "--to-pod", "c", "--port", strconv.Itoa(echoPort))
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		defer cmd.Wait()
		defer cancel()
		lines := make(chan []byte)
		go func() {
			sc := bufio.NewScanner(stdout)
			for sc.Scan() {
				lines <- append([]byte(nil), sc.Bytes()...)
			}
			close(lines)
		}()
		// The follower starts at some point after Start: send until a flow comes,
		// each round waiting a while for it.
		for round := 1; ; round++ {
			began := time.Now()
			e.mustRun(t, "b", "echo", e.addr("c", echoPort), "3000")
			select {
			case line, ok := <-lines:
				if !ok {
					t.Fatal("ferry observe -f exited")
				}
				got := parseFlows(t, line)
				if len(got) != 1 || got[0].GetSource().GetPod() != "b" || got[0].GetDestination().GetPod() != "c" || got[0].GetTime().AsTime().Before(began) {
					t.Fatalf("followed flow %s, want a new b→c", line)
				}
				t.Logf("round %d: followed %s", round, flowText(got[0]))
				return
			case <-time.After(2 * time.Second):
				if round == 5 {
					t.Fatal("ferry observe -f showed no flow in 5 rounds of b→c traffic")
				}
			}
		}
	})
}

func countMatches(fs []*ferryv1.Flow, want []expectFlow) int {
	n := 0
	for _, w := range want {
		for _, f := range fs {
			if w.match(f) {
				n++
				break
			}
		}
	}
	return n
}

// ferry check passes on the lab, and names the failure when the pin folder is not on
// bpffs or an agent is down.
func TestCheck(t *testing.T) {
	e := setup(t)
	check := func(args ...string) (string, error) {
		out, err := exec.Command(filepath.Join(e.bin, "ferry"), append([]string{"check", "--lab", prefix}, args...)...).CombinedOutput()
		return string(out), err
	}
	out, err := check()
	if err != nil {
		t.Fatalf("ferry check on a healthy lab: %v\n%s", err, out)
	}
	t.Logf("healthy lab:\n%s", out)

	out, err = check("--bpf-pin-dir", t.TempDir())
	if err == nil || !regexpMatch(`bpffs node1 +FAIL +bpffs is not mounted at`, out) {
		t.Errorf("pin folder not on bpffs: exit %v, want a failure naming bpffs:\n%s", err, out)
	}

	if err := e.lab.StopAgent("node2", syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := e.lab.StartAgent("node2"); err != nil {
			t.Error(err)
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		if err := e.lab.WaitAgentReady(ctx, "node2"); err != nil {
			t.Error(err)
		}
	})
	out, err = check()
	if err == nil || !regexpMatch(`agent node2 +FAIL +not reachable`, out) || !regexpMatch(`agent node1 +pass`, out) {
		t.Errorf("agent on node2 down: exit %v, want a failure naming agent node2:\n%s", err, out)
	}
	t.Logf("agent on node2 down:\n%s", out)
}

func regexpMatch(re, s string) bool { return regexp.MustCompile(re).MatchString(s) }

// The web view, in headless Chromium against the lab: the map shows the edges of the
// traffic sent (with mTLS where it was carried over mTLS) and the table fills.
func TestWebView(t *testing.T) {
	e := setup(t)
	browser, err := exec.LookPath("chromium")
	if err != nil {
		t.Fatalf("chromium is needed for the web view test (make deps installs it): %v", err)
	}
	e.mustRun(t, "a", "echo", e.addr("c", echoPort), "2000")
	e.mustRun(t, "a", "echo", e.addr("b", echoPort), "2000")
	e.mustRun(t, "d", "echo", e.addr("b", echoPort), "2000")

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ui := exec.CommandContext(ctx, filepath.Join(e.bin, "ferry"), "ui", "--lab", prefix, "--listen", "127.0.0.1:0")
	stdout, err := ui.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := ui.Start(); err != nil {
		t.Fatal(err)
	}
	defer ui.Wait()
	defer cancel()
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		t.Fatalf("ferry ui: %v", err)
	}
	url := regexp.MustCompile(`http://127\.0\.0\.1:\d+/`).FindString(line)
	if url == "" {
		t.Fatalf("ferry ui printed %q, want its URL", line)
	}

	dir := t.TempDir()
	chromium := func(args ...string) []byte {
		t.Helper()
		base := []string{"--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
			"--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
			"--user-data-dir=" + t.TempDir(), "--window-size=1400,1100", "--virtual-time-budget=4000"}
		cctx, ccancel := context.WithTimeout(ctx, 90*time.Second)
		defer ccancel()
		cmd := exec.CommandContext(cctx, browser, append(append(base, args...), url)...)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("chromium %v: %v\n%s", args, err, stderr.String())
		}
		return out
	}
	dom := string(chromium("--dump-dom"))
	edge := func(src, dst string) string {
		m := regexp.MustCompile(`<g class="edge[^"]*" data-edge="` + regexp.QuoteMeta(src+"-&gt;"+dst) + `"[^>]*>`).FindString(dom)
		return m
	}
	for _, tc := range []struct{ src, dst, mtls, security string }{
		{"default/a", "default/c", "true", "mtls"},
		{"default/a", "default/b", "false", "local"},
		{e.pod("d").IP.String(), "default/b", "false", "plaintext"},
	} {
		g := edge(tc.src, tc.dst)
		if g == "" {
			t.Errorf("the map has no edge %s → %s", tc.src, tc.dst)
			continue
		}
		if !strings.Contains(g, `data-mtls="`+tc.mtls+`"`) || !strings.Contains(g, `data-security="`+tc.security+`"`) {
			t.Errorf("edge %s → %s is %s, want mtls=%s security=%s", tc.src, tc.dst, g, tc.mtls, tc.security)
		}
	}
	rows := strings.Count(dom, `<tr class="flow `)
	if rows < 4 { // a→c at both ends, a→b, d→b
		t.Errorf("the flow table has %d rows, want at least 4", rows)
	}
	shot := filepath.Join(dir, "ferry-ui.png")
	chromium("--screenshot=" + shot)
	if st, err := os.Stat(shot); err != nil || st.Size() == 0 {
		t.Fatalf("no screenshot: %v", err)
	}
	t.Logf("web view: %d flow rows; screenshot %s", rows, shot)
}
