package e2e

// Per-request load balancing on a lab of its own (prefix "lb", pods in 10.107.0.0/16,
// state files): Services over three endpoints on two nodes (b on node1, c and e on
// node2), clients in a (node1). Its Services carry the load balancer as the operator
// compiles a TrafficPolicy into the state (Service.load_balancer).

import (
	"context"
	"fmt"
	"net/netip"
	"strconv"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/lab"
)

const (
	lbPrefix = "lb"
	lbPodNet = 107
	// scalePort is a second fortio in each endpoint pod, for the Service whose
	// endpoints the scaling test changes: stopping e's does not touch the others.
	scalePort = 8095
)

var (
	lbPods    = []string{"b", "c", "e"}
	rrHTTPVIP = netip.MustParseAddr("10.96.1.10")
	rrGRPCVIP = netip.MustParseAddr("10.96.1.11")
	scaleVIP  = netip.MustParseAddr("10.96.1.12")
	lbLab     = onceLab{what: "load-balancing lab", bringUp: lbBringUp}
)

func lbSetup(t *testing.T) *env { return lbLab.get(t) }

func lbBringUp() (*env, error) {
	cfg := lab.Config{
		Prefix: lbPrefix,
		PodNet: lbPodNet,
		Nodes: []lab.NodeConfig{
			{Name: "node1", Pods: []lab.PodConfig{{Name: "a", Enrolled: true}, {Name: "b", Enrolled: true}}},
			{Name: "node2", Pods: []lab.PodConfig{{Name: "c", Enrolled: true}, {Name: "e", Enrolled: true}}},
		},
		Services: []lab.ServiceConfig{
			{Name: "rr-http", ClusterIP: rrHTTPVIP, Port: servicePort, TargetPort: fortioPort, AppProtocol: "http", LoadBalancer: "RoundRobin", Pods: lbPods},
			{Name: "rr-grpc", ClusterIP: rrGRPCVIP, Port: servicePort, TargetPort: grpcPort, AppProtocol: "grpc", LoadBalancer: "RoundRobin", Pods: lbPods},
			{Name: "scale", ClusterIP: scaleVIP, Port: servicePort, TargetPort: scalePort, AppProtocol: "http", Pods: lbPods},
		},
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	e, err := newEnv(ctx, cfg, "ferry", "ferry-agent")
	if err != nil {
		return nil, err
	}
	if err := e.startL7Servers(ctx, lbPods...); err != nil {
		return e.fail(err)
	}
	for _, pod := range lbPods {
		if err := e.startFortio(ctx, pod, scalePort, 0); err != nil {
			return e.fail(err)
		}
	}
	for _, sv := range cfg.Services {
		if err := e.lab.SetServicePods(ctx, sv.Name, sv.Pods); err != nil { // waits until both agents have them
			return e.fail(err)
		}
	}
	return e, nil
}

// evenly fails unless each endpoint got n/len(per) within ±10%.
func evenly(t *testing.T, what string, n int, per map[string]int) {
	t.Helper()
	want := float64(n) / float64(len(per))
	total := 0
	for pod, got := range per {
		total += got
		if float64(got) < 0.9*want || float64(got) > 1.1*want {
			t.Errorf("%s: %s got %d of %d, want %.0f ±10%% (all: %v)", what, pod, got, n, want, per)
		}
	}
	if total != n {
		t.Errorf("%s: the endpoints saw %d requests, want %d (%v)", what, total, n, per)
	}
	t.Logf("%s: %d, per endpoint %v", what, n, per)
}

// 3,000 requests over one keep-alive HTTP/1.1 connection (fortio -c 1), with
// RoundRobin: each of the three endpoints serves a third, within 10%.
func TestL7RoundRobinHTTP(t *testing.T) {
	e := lbSetup(t)
	fortio, err := e.goBinary(context.Background(), "fortio", "fortio.org/fortio")
	if err != nil {
		t.Fatal(err)
	}
	tg := tag(t)
	const n = 3000
	r := e.fortioLoad(t, "a", fortio, "-qps", "0", "-c", "1", "-n", strconv.Itoa(n), fmt.Sprintf("http://%s/echo?%s", vip(rrHTTPVIP), tg))
	if r.RetCodes["200"] != n || len(r.Sockets) != 1 || r.Sockets[0] != 1 {
		t.Errorf("fortio: status codes %v over sockets %v; want %d 200s over one connection", r.RetCodes, r.Sockets, n)
	}
	per := map[string]int{}
	for _, pod := range lbPods {
		per[pod], _ = e.served(t, pod, fortioPort, tg, "")
	}
	evenly(t, "HTTP/1.1 requests", n, per)
}

// 3,000 unary calls over one gRPC channel, with RoundRobin: each endpoint answers a
// third, within 10%.
func TestL7RoundRobinGRPC(t *testing.T) {
	e := lbSetup(t)
	before := map[string]int64{}
	for _, pod := range lbPods {
		before[pod] = e.grpcStats(t, pod).Unary
	}
	const n = 3000
	e.mustRun(t, "a", "grpc", vip(rrGRPCVIP), fmt.Sprintf("unary:%d", n))
	per := map[string]int{}
	deadline := time.Now().Add(2 * time.Second)
	for {
		total := 0
		for _, pod := range lbPods {
			per[pod] = int(e.grpcStats(t, pod).Unary - before[pod])
			total += per[pod]
		}
		if total >= n || time.Now().After(deadline) {
			break
		}
		time.Sleep(25 * time.Millisecond) // the servers write their counts every 20 ms
	}
	evenly(t, "unary calls", n, per)
}

// The endpoints go 3 → 2 → 3 during a 1,000 req/s run: e leaves the Service (as a
// scaled-down pod leaves its endpoints), then its server stops; later it starts
// again and e rejoins. No request fails.
func TestL7ScaleDuringLoad(t *testing.T) {
	e := lbSetup(t)
	fortio, err := e.goBinary(context.Background(), "fortio", "fortio.org/fortio")
	if err != nil {
		t.Fatal(err)
	}
	tg := tag(t)
	var r fortioRun
	var loadErr error
	done := make(chan struct{})
	go func() {
		defer close(done)
		r, loadErr = e.fortioLoadErr(t, "a", fortio, "-qps", "1000", "-t", "10s", "-c", "8", fmt.Sprintf("http://%s/echo?%s", vip(scaleVIP), tg))
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	time.Sleep(2 * time.Second)
	if err := e.lab.SetServicePods(ctx, "scale", []string{"b", "c"}); err != nil {
		t.Error(err)
	}
	time.Sleep(500 * time.Millisecond) // in-flight requests finish, as in a pod's grace period
	e.apps["e/"+fmt.Sprintf("fortio-%d", scalePort)].Stop()
	time.Sleep(2 * time.Second)
	if err := e.startFortio(ctx, "e", scalePort, 0); err != nil {
		t.Error(err)
	}
	if err := e.lab.SetServicePods(ctx, "scale", lbPods); err != nil {
		t.Error(err)
	}
	<-done
	if loadErr != nil {
		t.Fatal(loadErr)
	}
	var total int64
	for _, c := range r.RetCodes {
		total += c
	}
	if r.RetCodes["200"] != total || total == 0 || r.ErrorsDurationHistogram.Count != 0 {
		t.Errorf("fortio: %v, %d errors; want every request answered 200", r.RetCodes, r.ErrorsDurationHistogram.Count)
	}
	t.Logf("%d requests at %.0f req/s, all 200", total, r.ActualQPS)
	// e served before it left and again after it rejoined.
	if got, _ := e.served(t, "e", scalePort, tg, ""); got == 0 {
		t.Error("e served nothing after it rejoined the Service")
	}
}
