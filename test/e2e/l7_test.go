package e2e

// L7 through Service cluster IPs, with clients and servers someone else wrote: curl
// (HTTP/1.1), h2load (HTTP/2), grpc-go (the interop TestService), coder/websocket,
// fortio (HTTP, h2c and TCP echo server; TCP load client) and nghttpd (h2c). Each
// client runs in pod a (node1); each Service has endpoints on both nodes (b on node1,
// c on node2) unless it says otherwise, so requests go through one proxy or two.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/api/admin"
	"github.com/ferrymesh/ferry/lab"
)

// Ports the L7 servers listen on in their pods.
const (
	fortioPort    = 8090 // fortio server: HTTP/1.1 and h2c echo, ?status=, ?size=, /debug
	fortioTCPPort = 8078 // fortio's TCP echo
	grpcPort      = 10000
	wsPort        = 8091
	bulkPort      = 8092 // nghttpd serving a sparse 1 GiB file
	bulkSize      = 1 << 30
)

// l7ServerPods run the L7 servers in the shared lab.
var l7ServerPods = []string{"b", "c"}

// The shared lab's L7 Services: declared by appProtocol, by port name, or not at all
// (detected), over b and c; one with no endpoint; two over c alone (two proxies).
var (
	httpVIP      = netip.MustParseAddr("10.96.0.60")
	httpNamedVIP = netip.MustParseAddr("10.96.0.61")
	httpDetVIP   = netip.MustParseAddr("10.96.0.62")
	h2cVIP       = netip.MustParseAddr("10.96.0.63")
	grpcVIP      = netip.MustParseAddr("10.96.0.64")
	grpcNamedVIP = netip.MustParseAddr("10.96.0.65")
	wsVIP        = netip.MustParseAddr("10.96.0.66")
	tcpVIP       = netip.MustParseAddr("10.96.0.67")
	httpEmptyVIP = netip.MustParseAddr("10.96.0.68")
	bulkCVIP     = netip.MustParseAddr("10.96.0.69")
	httpCVIP     = netip.MustParseAddr("10.96.0.70")

	l7Services = []lab.ServiceConfig{
		{Name: "http", ClusterIP: httpVIP, Port: servicePort, TargetPort: fortioPort, AppProtocol: "http", Pods: l7ServerPods},
		{Name: "http-named", ClusterIP: httpNamedVIP, Port: servicePort, TargetPort: fortioPort, PortName: "http-echo", Pods: l7ServerPods},
		{Name: "http-detected", ClusterIP: httpDetVIP, Port: servicePort, TargetPort: fortioPort, Pods: l7ServerPods},
		{Name: "h2c", ClusterIP: h2cVIP, Port: servicePort, TargetPort: fortioPort, AppProtocol: "kubernetes.io/h2c", Pods: l7ServerPods},
		{Name: "grpc", ClusterIP: grpcVIP, Port: servicePort, TargetPort: grpcPort, AppProtocol: "grpc", Pods: l7ServerPods},
		{Name: "grpc-named", ClusterIP: grpcNamedVIP, Port: servicePort, TargetPort: grpcPort, PortName: "grpc-test", Pods: l7ServerPods},
		{Name: "ws", ClusterIP: wsVIP, Port: servicePort, TargetPort: wsPort, AppProtocol: "kubernetes.io/ws", Pods: l7ServerPods},
		{Name: "tcp", ClusterIP: tcpVIP, Port: servicePort, TargetPort: fortioTCPPort, AppProtocol: "tcp", Pods: l7ServerPods},
		{Name: "http-empty", ClusterIP: httpEmptyVIP, Port: servicePort, TargetPort: fortioPort, AppProtocol: "http"},
		{Name: "bulk-c", ClusterIP: bulkCVIP, Port: servicePort, TargetPort: bulkPort, AppProtocol: "kubernetes.io/h2c", Pods: []string{"c"}},
		{Name: "http-c", ClusterIP: httpCVIP, Port: servicePort, TargetPort: fortioPort, AppProtocol: "http", Pods: []string{"c"}},
	}
)

// vip is the Service address clients dial.
func vip(a netip.Addr) string { return netip.AddrPortFrom(a, servicePort).String() }

// startL7Servers starts fortio, the gRPC TestService and the WebSocket echo in pods.
func (e *env) startL7Servers(ctx context.Context, pods ...string) error {
	for _, pod := range pods {
		if err := e.startFortio(ctx, pod, fortioPort, fortioTCPPort); err != nil {
			return err
		}
		if err := e.startApp(ctx, pod, grpcPort, "grpc", e.selfApp(pod, "grpc-server", strconv.Itoa(grpcPort), e.grpcStatsFile(pod))); err != nil {
			return err
		}
		if err := e.startApp(ctx, pod, wsPort, "ws", e.selfApp(pod, "ws-server", strconv.Itoa(wsPort))); err != nil {
			return err
		}
	}
	return nil
}

// startFortio runs a fortio server in pod: HTTP (and h2c) on httpPort, TCP echo on
// tcpPort when it is not 0. It logs every request (JSON lines with the URL) to its
// log, which is how a test counts the requests each endpoint served.
func (e *env) startFortio(ctx context.Context, pod string, httpPort, tcpPort int) error {
	fortio, err := e.goBinary(ctx, "fortio", "fortio.org/fortio")
	if err != nil {
		return err
	}
	tcp := "disabled"
	if tcpPort != 0 {
		tcp = strconv.Itoa(tcpPort)
	}
	cmd := e.lab.Command(context.Background(), pod, fortio, "server", "-http-port", strconv.Itoa(httpPort), "-tcp-port", tcp,
		"-grpc-port", "disabled", "-redirect-port", "disabled", "-udp-port", "disabled", "-loglevel", "verbose")
	return e.startApp(ctx, pod, httpPort, fmt.Sprintf("fortio-%d", httpPort), cmd)
}

// startBulkServer runs nghttpd (h2c) in pod, serving /big: a sparse file of bulkSize.
func (e *env) startBulkServer(ctx context.Context, pod string) error {
	dir := filepath.Join(e.bin, "bulk")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	f, err := os.Create(filepath.Join(dir, "big"))
	if err != nil {
		return err
	}
	err = f.Truncate(bulkSize)
	f.Close()
	if err != nil {
		return err
	}
	cmd := e.lab.Command(context.Background(), pod, "nghttpd", "--no-tls", "-d", dir, strconv.Itoa(bulkPort))
	return e.startApp(ctx, pod, bulkPort, "nghttpd", cmd)
}

// goBinary builds a Go command (a module of go.mod) into the env's folder once.
func (e *env) goBinary(ctx context.Context, name, pkg string) (string, error) {
	path := filepath.Join(e.bin, name)
	if _, err := os.Stat(path); err == nil {
		return path, nil
	}
	if out, err := exec.CommandContext(ctx, "go", "build", "-o", path, pkg).CombinedOutput(); err != nil {
		return "", fmt.Errorf("build %s: %v\n%s", pkg, err, out)
	}
	return path, nil
}

// selfApp prepares this test binary as the server app args names, in pod.
func (e *env) selfApp(pod string, args ...string) *exec.Cmd {
	cmd := e.lab.Command(context.Background(), pod, e.self, "-test.run=^$")
	cmd.Env = append(cmd.Env, appEnv+"="+strings.Join(args, " "))
	return cmd
}

// startApp starts cmd, a server in pod, with its output in appLog(pod, name), and
// waits until it listens on port.
func (e *env) startApp(ctx context.Context, pod string, port int, name string, cmd *exec.Cmd) error {
	if err := os.MkdirAll(filepath.Join(e.bin, "logs"), 0o755); err != nil {
		return err
	}
	logf, err := os.Create(e.appLog(pod, name))
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd.Stdout, cmd.Stderr = logf, logf
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	p, err := e.lab.StartInPod(ctx, pod, port, cmd)
	if err != nil {
		return fmt.Errorf("%s: %w; its log:\n%s", name, err, tailFile(e.appLog(pod, name), 10))
	}
	e.servers = append(e.servers, p)
	if e.apps == nil {
		e.apps = map[string]*lab.PodProcess{}
	}
	e.apps[pod+"/"+name] = p
	return nil
}

func (e *env) appLog(pod, name string) string {
	return filepath.Join(e.bin, "logs", pod+"-"+name+".log")
}

func (e *env) grpcStatsFile(pod string) string { return filepath.Join(e.bin, "grpc-"+pod+".json") }

// grpcStats reads what pod's gRPC server has seen so far.
func (e *env) grpcStats(t *testing.T, pod string) grpcStats {
	t.Helper()
	var st grpcStats
	data, err := os.ReadFile(e.grpcStatsFile(pod))
	if os.IsNotExist(err) {
		return st
	}
	if err == nil {
		err = json.Unmarshal(data, &st)
	}
	if err != nil {
		t.Fatalf("gRPC server stats of %s: %v", pod, err)
	}
	return st
}

// served counts the requests pod's fortio (on port) logged whose URL contains tag,
// and how many of them came in over protocol proto ("" for any).
func (e *env) served(t *testing.T, pod string, port int, tag, proto string) (all, withProto int) {
	t.Helper()
	data, err := os.ReadFile(e.appLog(pod, fmt.Sprintf("fortio-%d", port)))
	if err != nil {
		t.Fatal(err)
	}
	for line := range bytes.Lines(data) {
		var rec struct{ Msg, URL, Proto string }
		if json.Unmarshal(line, &rec) != nil || rec.Msg != "Echo" || !strings.Contains(rec.URL, tag) {
			continue
		}
		all++
		if rec.Proto == proto {
			withProto++
		}
	}
	return all, withProto
}

// client runs a program in pod as an app would, with stdin when it is not nil, and
// returns its output; err is set when it exits non-zero.
func (e *env) client(t *testing.T, pod string, stdin io.Reader, name string, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := e.lab.Command(ctx, pod, name, args...)
	cmd.Stdin = stdin
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err = cmd.Run()
	return out.String(), errb.String(), err
}

// mustClient is client that fails the test when the program fails.
func (e *env) mustClient(t *testing.T, pod string, stdin io.Reader, name string, args ...string) (stdout, stderr string) {
	t.Helper()
	stdout, stderr, err := e.client(t, pod, stdin, name, args...)
	if err != nil {
		t.Fatalf("%s %s in %s: %v\nstdout: %s\nstderr: %s", name, strings.Join(args, " "), pod, err, clip(stdout), clip(stderr))
	}
	return stdout, stderr
}

func clip(s string) string {
	if len(s) > 2000 {
		return s[:1000] + "\n...\n" + s[len(s)-1000:]
	}
	return s
}

// tag is a string unique to one test run, put in request URLs so server logs can be
// counted per test.
func tag(t *testing.T) string {
	return fmt.Sprintf("%s-%d", strings.NewReplacer("/", "-", " ", "-").Replace(t.Name()), time.Now().UnixNano())
}

// curl's write-out line for each transfer: status, connections opened, bytes up
// and down, seconds in all.
const curlWriteOut = `%{http_code} %{num_connects} %{size_upload} %{size_download} %{time_total}\n`

type curlTransfer struct {
	status, connects int
	up, down         int64
	seconds          float64
}

func parseCurl(t *testing.T, out string) []curlTransfer {
	t.Helper()
	var ts []curlTransfer
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		var c curlTransfer
		if _, err := fmt.Sscanf(l, "%d %d %d %d %g", &c.status, &c.connects, &c.up, &c.down, &c.seconds); err != nil {
			t.Fatalf("curl write-out %q: %v", l, err)
		}
		ts = append(ts, c)
	}
	return ts
}

// curl through each HTTP/1.1 Service (declared by appProtocol, by port name, and
// detected): many requests over one keep-alive connection, and with Connection:
// close one connection each; every request answered 200 by the echo servers, which
// got them as HTTP/1.1.
func TestL7CurlKeepAlive(t *testing.T) {
	e := setup(t)
	for _, sv := range []netip.Addr{httpVIP, httpNamedVIP, httpDetVIP} {
		t.Run(sv.String(), func(t *testing.T) {
			for _, keepAlive := range []bool{true, false} {
				since := time.Now()
				tg := tag(t)
				const n = 40
				args := []string{"-sS", "-o", "/dev/null", "-w", curlWriteOut}
				if !keepAlive {
					args = append(args, "-H", "Connection: close")
				}
				for i := range n {
					args = append(args, fmt.Sprintf("http://%s/echo?%s-%d", vip(sv), tg, i))
				}
				out, _ := e.mustClient(t, "a", nil, "curl", args...)
				connects, slowest := 0, 0.0
				for _, c := range parseCurl(t, out) {
					if c.status != 200 {
						t.Errorf("keep-alive %t: status %d", keepAlive, c.status)
					}
					connects += c.connects
					slowest = max(slowest, c.seconds)
				}
				if want := map[bool]int{true: 1, false: n}[keepAlive]; connects != want {
					t.Errorf("keep-alive %t: curl opened %d connections for %d requests, want %d", keepAlive, connects, n, want)
				}
				e.servedAll(t, fmt.Sprintf("keep-alive %t", keepAlive), tg, "HTTP/1.1", n)
				t.Logf("keep-alive %t: slowest request %.1f ms", keepAlive, slowest*1000)
				// Declared or detected, node1's proxy carried each connection at L7.
				for _, c := range e.clientConns(t, "node1", netip.AddrPortFrom(sv, servicePort), since, connects) {
					if c.Protocol != admin.HTTP1 {
						t.Errorf("keep-alive %t: node1 carried a connection to %s as %q, want %q (per request)", keepAlive, c.Service, c.Protocol, admin.HTTP1)
					}
				}
			}
		})
	}
}

// A 100 MiB chunked upload from a pipe is echoed back whole; a body sent after
// Expect: 100-continue gets its 100 Continue and arrives. (Bodies are sent as
// octet-stream: curl's default, a form, would have fortio parse it as one.)
func TestL7CurlBodies(t *testing.T) {
	e := setup(t)
	url := fmt.Sprintf("http://%s/echo?%s", vip(httpVIP), tag(t))
	t.Run("chunked-100MiB", func(t *testing.T) {
		const size = 100 << 20
		out, _ := e.mustClient(t, "a", io.LimitReader(zeros{}, size), "curl", "-sS", "-o", "/dev/null", "-w", curlWriteOut,
			"-H", "Transfer-Encoding: chunked", "-H", "Content-Type: application/octet-stream", "--data-binary", "@-", url)
		c := parseCurl(t, out)[0]
		// curl counts the chunks' framing in what it uploaded.
		if c.status != 200 || c.up < size || c.down != size {
			t.Errorf("status %d, %d bytes up and %d down; want 200, %d up with chunk framing and %d down", c.status, c.up, c.down, size, size)
		}
	})
	t.Run("expect-100-continue", func(t *testing.T) {
		const size = 4 << 20
		out, stderr := e.mustClient(t, "a", io.LimitReader(zeros{}, size), "curl", "-sS", "-v", "-o", "/dev/null", "-w", curlWriteOut,
			"-H", "Expect: 100-continue", "--expect100-timeout", "30", "-H", "Content-Type: application/octet-stream", "--data-binary", "@-", url)
		c := parseCurl(t, out)[0]
		if c.status != 200 || c.up != size || c.down != size {
			t.Errorf("status %d, %d bytes up and %d down; want 200 and %d each way", c.status, c.up, c.down, size)
		}
		if !strings.Contains(stderr, "< HTTP/1.1 100 Continue") {
			t.Errorf("curl got no 100 Continue before sending the body:\n%s", clip(stderr))
		}
	})
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

// h2load with HTTP/2 prior knowledge, 100 concurrent streams on one connection: every
// request succeeds, and the servers got them as HTTP/2.
func TestL7H2load(t *testing.T) {
	e := setup(t)
	tg := tag(t)
	const n = 5000
	out, _ := e.mustClient(t, "a", nil, "h2load", "-n", strconv.Itoa(n), "-c", "1", "-m", "100", fmt.Sprintf("http://%s/echo?%s", vip(h2cVIP), tg))
	if !strings.Contains(out, fmt.Sprintf("requests: %d total, %d started, %d done, %d succeeded, 0 failed, 0 errored, 0 timeout", n, n, n, n)) ||
		!strings.Contains(out, fmt.Sprintf("status codes: %d 2xx", n)) {
		t.Fatalf("h2load:\n%s", out)
	}
	e.servedAll(t, "h2load", tg, "HTTP/2.0", n)
}

// clientConns waits until node's agent has recorded n ended client connections (not
// request records) to the Service address svc since since, and returns them.
func (e *env) clientConns(t *testing.T, node string, svc netip.AddrPort, since time.Time, n int) []connRecord {
	t.Helper()
	var got []connRecord
	deadline := time.Now().Add(carryWait)
	for {
		got = got[:0]
		for _, c := range e.conns(node) {
			if c.Service == svc && c.HTTP == nil && !c.Start.Before(since) && !c.End.IsZero() {
				got = append(got, c)
			}
		}
		if len(got) >= n || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if len(got) != n {
		t.Fatalf("node %s recorded %d ended connections to %s, want %d:\n%s", node, len(got), svc, n, formatConns(got))
	}
	return got
}

// servedAll checks that the shared lab's L7 servers saw n requests tagged tg, all
// over proto, and logs how the proxy spread them. (The default balancer, P2C over
// latency, may rightly send every request to the same-node endpoint; the even spread
// is TestL7RoundRobin*'s.)
func (e *env) servedAll(t *testing.T, what, tg, proto string, n int) {
	t.Helper()
	total, per := 0, map[string]int{}
	for _, pod := range l7ServerPods {
		got, withProto := e.served(t, pod, fortioPort, tg, proto)
		if withProto != got {
			t.Errorf("%s: %s served %d requests, %d of them over %s; want all", what, pod, got, withProto, proto)
		}
		per[pod] = got
		total += got
	}
	if total != n {
		t.Errorf("%s: the servers saw %d requests, want %d", what, total, n)
	}
	t.Logf("%s: %d requests, per endpoint %v", what, n, per)
}

// grpc-go's TestService through a Service declared by appProtocol and by port name:
// unary, client-, server- and bidirectional streaming, deadlines that expire, cancelled
// calls, 16 MiB messages. The servers see the deadline and the cancellation: a
// client's RST_STREAM reaches them.
func TestL7GRPC(t *testing.T) {
	e := setup(t)
	for _, sv := range []netip.Addr{grpcVIP, grpcNamedVIP} {
		t.Run(sv.String(), func(t *testing.T) {
			before := map[string]grpcStats{}
			for _, pod := range l7ServerPods {
				before[pod] = e.grpcStats(t, pod)
			}
			e.mustRun(t, "a", "grpc", vip(sv), "empty_unary", "large_unary", "client_streaming", "server_streaming", "ping_pong",
				"timeout_on_sleeping_server", "cancel_after_begin", "cancel_after_first_response", "large_16m", "unary:100")
			for range 4 {
				e.mustRun(t, "a", "grpc", vip(sv), "deadline_on_server", "cancel_after_first_response")
			}
			var unary, ended int64
			deadline := time.Now().Add(5 * time.Second)
			for {
				unary, ended = 0, 0
				for _, pod := range l7ServerPods {
					st := e.grpcStats(t, pod)
					unary += st.Unary - before[pod].Unary
					ended += st.Cancelled + st.Deadline - before[pod].Cancelled - before[pod].Deadline
				}
				if ended >= 5+4 || time.Now().After(deadline) {
					break
				}
				time.Sleep(50 * time.Millisecond)
			}
			if unary != 102 { // large_unary, large_16m and 100
				t.Errorf("the servers answered %d unary calls, want 102", unary)
			}
			if ended < 5+4 {
				t.Errorf("the servers saw %d calls end by deadline or cancellation, want at least 9 (one per deadline_on_server and cancel_after_first_response)", ended)
			}
		})
	}
}

// A WebSocket echo of 10,000 messages over one upgraded connection.
func TestL7WebSocket(t *testing.T) {
	e := setup(t)
	res := e.mustRun(t, "a", "ws", vip(wsVIP), "10000")
	t.Logf("10,000 messages, %d bytes each way, in %.2f s", res.Bytes, res.Seconds)
}

// fortio's TCP echo and its TCP load client, through a port declared tcp.
func TestL7TCPLoad(t *testing.T) {
	e := setup(t)
	fortio, err := e.goBinary(context.Background(), "fortio", "fortio.org/fortio")
	if err != nil {
		t.Fatal(err)
	}
	const n = 2000
	res := e.fortioLoad(t, "a", fortio, "-qps", "0", "-c", "4", "-n", strconv.Itoa(n), "tcp://"+vip(tcpVIP))
	if res.RetCodes["OK"] != n || len(res.RetCodes) != 1 {
		t.Errorf("fortio: %v, want %d OK", res.RetCodes, n)
	}
}

// fortioRun is the part of fortio load's JSON result the tests read.
type fortioRun struct {
	RetCodes                map[string]int64
	Sockets                 []int64
	ErrorsDurationHistogram struct{ Count int64 }
	DurationHistogram       struct{ Count int64 }
	ActualQPS               float64
}

// fortioLoad runs fortio load in pod and returns its result.
func (e *env) fortioLoad(t *testing.T, pod, fortio string, args ...string) fortioRun {
	t.Helper()
	r, err := e.fortioLoadErr(t, pod, fortio, args...)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// fortioLoadErr is fortioLoad that returns its error, for another goroutine.
func (e *env) fortioLoadErr(t *testing.T, pod, fortio string, args ...string) (fortioRun, error) {
	args = append([]string{"load", "-quiet", "-json", "-"}, args...)
	out, stderr, err := e.client(t, pod, nil, fortio, args...)
	var r fortioRun
	if err != nil {
		return r, fmt.Errorf("fortio %s: %v\n%s\n%s", strings.Join(args, " "), err, clip(out), clip(stderr))
	}
	// The JSON follows any other line fortio prints.
	if i := strings.Index(out, "{"); i >= 0 {
		out = out[i:]
	}
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		return r, fmt.Errorf("fortio output: %v\n%s", err, clip(out))
	}
	return r, nil
}

// Between the nodes the fabric carries only TLS to 15008 while every L7 client runs:
// no HTTP, no HTTP/2, no plaintext marker.
func TestL7FabricOnlyTLS(t *testing.T) {
	e := setup(t)
	pcap := filepath.Join(t.TempDir(), "fabric.pcap")
	stop := e.capture(t, pcap)
	tg := tag(t)
	e.mustClient(t, "a", nil, "curl", "-sS", "-o", "/dev/null", "-d", Marker, fmt.Sprintf("http://%s/echo?%s", vip(httpCVIP), tg))
	e.mustClient(t, "a", nil, "h2load", "-n", "200", "-c", "1", "-m", "100", fmt.Sprintf("http://%s/echo?%s", vip(h2cVIP), tg))
	e.mustRun(t, "a", "grpc", vip(grpcVIP), "large_unary", "ping_pong", "unary:20")
	e.mustRun(t, "a", "ws", vip(wsVIP), "200")
	stop()
	if captured(t, pcap, Marker) {
		t.Error("the plaintext marker crossed the fabric")
	}
	if other := tshark(t, pcap, "-Y", "tcp.len > 0 && tcp.srcport != 15008 && tcp.dstport != 15008", "-T", "fields", "-e", "tcp.srcport", "-e", "tcp.dstport"); len(other) > 0 {
		t.Errorf("%d packets with data on other ports than 15008, e.g. %v", len(other), other[:min(5, len(other))])
	}
	if clear := tshark(t, pcap, "-d", "tcp.port==15008,tls", "-Y", "http || http2 || websocket || grpc"); len(clear) > 0 {
		t.Errorf("HTTP on the fabric: %v", clear[:min(5, len(clear))])
	}
	// TLS 1.3 writes its encrypted records' type as the outer "opaque type" (23); which
	// field tshark names it by has changed between Debian's builds, so either counts.
	if tls := tshark(t, pcap, "-d", "tcp.port==15008,tls", "-Y", "tls.record.content_type == 23 || tls.record.opaque_type == 23"); len(tls) == 0 {
		t.Error("no TLS application data on the fabric: the requests did not cross it")
	}
}

// No ready endpoint: curl is refused or reset (or answered 503 by the proxy) at once.
func TestL7NoEndpoint(t *testing.T) {
	e := setup(t)
	out, stderr, err := e.client(t, "a", nil, "curl", "-sS", "-o", "/dev/null", "-w", curlWriteOut, "--max-time", "10", "http://"+vip(httpEmptyVIP)+"/")
	c := parseCurl(t, out)[0]
	var exit *exec.ExitError
	switch {
	case err == nil && c.status == 503:
	case errors.As(err, &exit) && slices.Contains([]int{7, 52, 56}, exit.ExitCode()): // refused, empty reply, reset
	default:
		t.Fatalf("curl: %v, status %d, %s; want refused, reset or 503", err, c.status, stderr)
	}
	t.Logf("curl: %v %s after %.1f ms", err, strings.TrimSpace(stderr), c.seconds*1000)
	if c.seconds >= 0.1 {
		t.Errorf("curl took %.0f ms to be turned away, want under 100 ms", c.seconds*1000)
	}
}

// A request carrying traceparent arrives at the app, through both proxies, with
// the same trace id.
func TestL7Traceparent(t *testing.T) {
	e := setup(t)
	const traceID = "4bf92f3577b34da6a3ce929d0e0e4736"
	out, _ := e.mustClient(t, "a", nil, "curl", "-sS", "-H", "traceparent: 00-"+traceID+"-00f067aa0ba902b7-01", "http://"+vip(httpCVIP)+"/debug")
	m := regexp.MustCompile(`(?mi)^traceparent: 00-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$`).FindStringSubmatch(out)
	if m == nil || m[1] != traceID {
		t.Errorf("the app saw headers without trace id %s:\n%s", traceID, out)
	}
}

// A 1 GiB response streamed from c through both proxies (h2c) grows neither agent's
// resident memory by 64 MiB: the body is streamed, never held.
func TestL7LargeResponseMemory(t *testing.T) {
	e := setup(t)
	nodes := e.lab.Nodes()
	base := map[string]int64{}
	for _, n := range nodes {
		base[n] = agentRSS(t, e.lab.AgentPID(n))
	}
	peak := map[string]int64{}
	var mu sync.Mutex
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			for _, n := range nodes {
				if rss, err := readRSS(e.lab.AgentPID(n)); err == nil {
					mu.Lock()
					peak[n] = max(peak[n], rss)
					mu.Unlock()
				}
			}
			select {
			case <-done:
				return
			case <-time.After(50 * time.Millisecond):
			}
		}
	}()
	out, _ := e.mustClient(t, "a", nil, "curl", "-sS", "--http2-prior-knowledge", "-o", "/dev/null", "-w", curlWriteOut, "http://"+vip(bulkCVIP)+"/big")
	close(done)
	wg.Wait()
	if c := parseCurl(t, out)[0]; c.status != 200 || c.down != bulkSize {
		t.Fatalf("status %d, %d bytes; want 200 and %d", c.status, c.down, bulkSize)
	} else {
		t.Logf("1 GiB in %.1f s", c.seconds)
	}
	for _, n := range nodes {
		grew := peak[n] - base[n]
		t.Logf("agent on %s: VmRSS %d MiB before, peak %d MiB", n, base[n]>>20, peak[n]>>20)
		if grew >= 64<<20 {
			t.Errorf("agent on %s grew by %d MiB streaming 1 GiB, want under 64 MiB", n, grew>>20)
		}
	}
}

func agentRSS(t *testing.T, pid int) int64 {
	t.Helper()
	rss, err := readRSS(pid)
	if err != nil {
		t.Fatal(err)
	}
	return rss
}

// readRSS is VmRSS of process pid, in bytes.
func readRSS(pid int) (int64, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for l := range strings.Lines(string(data)) {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb << 10, err
		}
	}
	return 0, fmt.Errorf("pid %d: no VmRSS", pid)
}
