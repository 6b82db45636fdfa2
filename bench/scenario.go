// Scenarios (what carries the traffic) and workloads (what traffic), and the lab
// they run in.

package bench

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/ferrymesh/ferry/lab"
)

// agentMode is how the agents run for a scenario; switching restarts them.
type agentMode string

const (
	modeAny      agentMode = ""         // the scenario does not go through an agent
	modeEBPF     agentMode = "ebpf"     // eBPF capture, sockmap fast path on (--fast-path=true)
	modeNoFast   agentMode = "nofast"   // eBPF capture, --fast-path=false
	modeIPTables agentMode = "iptables" // --capture=iptables
)

// agentArgs are the agent flags of a mode.
func (m agentMode) agentArgs() []string {
	switch m {
	case modeEBPF:
		return []string{"--fast-path=true"}
	case modeNoFast:
		return []string{"--fast-path=false"}
	case modeIPTables:
		return []string{"--capture=iptables"}
	}
	return nil
}

// proxyKind says whose processes a scenario's cost is charged to.
type proxyKind int

const (
	proxyNone proxyKind = iota
	proxyFerry
	proxyHAProxy
)

// protocol is what a workload speaks; it picks the server's port and the address a
// scenario's client dials.
type protocol int

const (
	protoHTTP1 protocol = iota // fortio's HTTP/1.1 echo
	protoTCP                   // the bulk sink
	protoH2                    // fortio's echo over h2c (prior knowledge)
	protoGRPC                  // fortio's gRPC ping service
	protoRR                    // the small request-response server (rr-server)
)

// protocols is every protocol, for the tables that hold one address each.
var protocols = [...]protocol{protoHTTP1, protoTCP, protoH2, protoGRPC, protoRR}

// Ports of the servers in every server pod, and of the HAProxy pair.
const (
	httpPort       = 8080 // fortio server: HTTP/1.1 and h2c on one port
	grpcPort       = 8079 // fortio server: gRPC ping
	sinkPort       = 5201
	tlsSinkPort    = 5203  // the bulk sink over Go crypto/tls (the gotls scenarios)
	rrPort         = 5202  // ferry bench rr-server
	hapTLSHTTPPort = 15443 // server-side HAProxy, mode tcp: mTLS in, plaintext to httpPort
	hapTLSBulkPort = 15444 // server-side HAProxy, mode tcp: mTLS in, plaintext to sinkPort
	hapTLSH2Port   = 15445 // server-side HAProxy, mode http: h2 over mTLS in, h2c to httpPort
	hapTLSGRPCPort = 15446 // server-side HAProxy, mode http: h2 over mTLS in, h2c to grpcPort
	hapTLSRRPort   = 15447 // server-side HAProxy, mode tcp: mTLS in, plaintext to rrPort
)

// serverPort is the port of the server pod's app for p.
func (p protocol) serverPort() int {
	switch p {
	case protoTCP:
		return sinkPort
	case protoGRPC:
		return grpcPort
	case protoRR:
		return rrPort
	}
	return httpPort
}

// l7 says whether a proxy that understands p can carry it per request.
func (p protocol) l7() bool { return p == protoH2 || p == protoGRPC }

// Scenario is one way of carrying traffic from a client pod to a server.
type Scenario struct {
	Key  string // short name used in files and as a row key
	Name string // what the table says
	// CrossNode says whether client and server are on different nodes; ratios to no
	// mesh compare with the no-mesh scenario of the same placement.
	CrossNode bool
	mode      agentMode
	proxy     proxyKind
	client    string // pod the load generator runs in
	server    string // pod the servers run in
	// via holds, per protocol, the address the client dials instead of the server
	// pod's: the client-side HAProxy on loopback, or a Service's cluster IP.
	via map[protocol]string
	// l7Only scenarios run only the HTTP/2 and gRPC workloads: the others would
	// measure the same path as another scenario.
	l7Only bool
	// goTLS scenarios run only bulk, with tcp-send and tcp-sink speaking crypto/tls
	// to each other.
	goTLS bool
}

// target is the address the scenario's client dials for p, given the server pod's IP.
func (s Scenario) target(p protocol, serverIP string) string {
	if a, ok := s.via[p]; ok {
		return a
	}
	if s.goTLS && p == protoTCP {
		return fmt.Sprintf("%s:%d", serverIP, tlsSinkPort)
	}
	return fmt.Sprintf("%s:%d", serverIP, p.serverPort())
}

// benchService is a Service of the benchmark lab. Ferry's clients reach the HTTP/2
// and gRPC servers through these, so that the port's appProtocol tells the mesh
// what the port speaks, as it would in a cluster. One Service per server pod keeps
// the placement (across nodes or on one node) what the scenario says. An opaque
// Service declares the same server's port tcp, so the mesh carries it as bytes:
// Ferry's L4 figure for the same workload, in the same run.
type benchService struct {
	proto  protocol
	server string
	opaque bool
	svc    lab.ServiceConfig
}

func benchServices() []benchService {
	svc := func(name, ip string, port uint16, p protocol, appProtocol, pod string) benchService {
		return benchService{proto: p, server: pod, opaque: appProtocol == "tcp", svc: lab.ServiceConfig{
			Name: name, ClusterIP: netip.MustParseAddr(ip), Port: port, TargetPort: uint16(p.serverPort()),
			AppProtocol: appProtocol, Pods: []string{pod},
		}}
	}
	return []benchService{
		svc("h2-srv2", "10.96.104.1", 80, protoH2, "kubernetes.io/h2c", "srv2"),
		svc("grpc-srv2", "10.96.104.2", 50051, protoGRPC, "grpc", "srv2"),
		svc("h2-srv1", "10.96.104.3", 80, protoH2, "kubernetes.io/h2c", "srv1"),
		svc("grpc-srv1", "10.96.104.4", 50051, protoGRPC, "grpc", "srv1"),
		svc("h2-tcp-srv2", "10.96.104.5", 80, protoH2, "tcp", "srv2"),
		svc("grpc-tcp-srv2", "10.96.104.6", 50051, protoGRPC, "tcp", "srv2"),
		svc("h2-tcp-srv1", "10.96.104.7", 80, protoH2, "tcp", "srv1"),
		svc("grpc-tcp-srv1", "10.96.104.8", 50051, protoGRPC, "tcp", "srv1"),
	}
}

// viaServices is the cluster IP and port of each of server's Services, by
// protocol: the opaque ones (declared tcp) or those that declare the protocol.
func viaServices(server string, opaque bool) map[protocol]string {
	via := map[protocol]string{}
	for _, s := range benchServices() {
		if s.server == server && s.opaque == opaque {
			via[s.proto] = netip.AddrPortFrom(s.svc.ClusterIP, s.svc.Port).String()
		}
	}
	return via
}

// Pods of the benchmark lab. Enrolled: cli, srv1 (node1) and srv2 (node2). Outside
// the mesh, for the no-mesh and HAProxy scenarios: nmc, nms1 (node1) and nms2 (node2).
func labConfig(agentBin string) lab.Config {
	c := lab.Config{
		Prefix: "bn",
		PodNet: LabPodNet,
		Nodes: []lab.NodeConfig{
			{Name: "node1", Pods: []lab.PodConfig{
				{Name: "cli", Enrolled: true}, {Name: "srv1", Enrolled: true},
				{Name: "nmc"}, {Name: "nms1"},
			}},
			{Name: "node2", Pods: []lab.PodConfig{
				{Name: "srv2", Enrolled: true}, {Name: "nms2"},
			}},
		},
		AgentBinary: agentBin,
	}
	for _, s := range benchServices() {
		c.Services = append(c.Services, s.svc)
	}
	return c
}

// hapServers are the pods a server-side HAProxy runs in.
var hapServers = [...]string{"nms2", "nms1"}

// hapLocalPort is the port the client-side HAProxy listens on (127.0.0.1 in nmc)
// for p toward hapServers[i]: 15001.. for HTTP/1.1 and bulk, 15011.. for HTTP/2 and
// gRPC, 15021.. for the small request-response exchanges.
func hapLocalPort(p protocol, i int) int {
	base := map[protocol]int{protoHTTP1: 15001, protoTCP: 15002, protoH2: 15011, protoGRPC: 15012, protoRR: 15021}[p]
	return base + 2*i
}

// viaHAProxy is the client-side HAProxy's address toward server, by protocol.
func viaHAProxy(server string) map[protocol]string {
	i := slices.Index(hapServers[:], server)
	via := map[protocol]string{}
	for _, p := range protocols {
		via[p] = fmt.Sprintf("127.0.0.1:%d", hapLocalPort(p, i))
	}
	return via
}

// scenarios is every scenario, in the order of the table. Keys of the no-mesh and
// HAProxy rows are what ratios refer to.
func scenarios() []Scenario {
	ferry := func(key, name string, cross bool, m agentMode) Scenario {
		server := "srv1"
		if cross {
			server = "srv2"
		}
		return Scenario{Key: key, Name: name, CrossNode: cross, mode: m, proxy: proxyFerry, client: "cli", server: server, via: viaServices(server, false)}
	}
	opaque := func(s Scenario) Scenario {
		s.Key = strings.Replace(s.Key, "-", "-tcp-", 1)
		s.Name = strings.Replace(s.Name, ", ", ", ports declared tcp, ", 1)
		s.via, s.l7Only = viaServices(s.server, true), true
		return s
	}
	nofastX := ferry("nofast-x", "Ferry no fast path, across nodes", true, modeNoFast)
	nofastS := ferry("nofast-s", "Ferry no fast path, same node", false, modeNoFast)
	return []Scenario{
		{Key: "nomesh-x", Name: "no mesh, across nodes", CrossNode: true, client: "nmc", server: "nms2"},
		{Key: "nomesh-s", Name: "no mesh, same node", client: "nmc", server: "nms1"},
		{Key: "haproxy-x", Name: "HAProxy pair mTLS, across nodes", CrossNode: true, proxy: proxyHAProxy, client: "nmc", server: "nms2", via: viaHAProxy("nms2")},
		{Key: "haproxy-s", Name: "HAProxy pair mTLS, same node", proxy: proxyHAProxy, client: "nmc", server: "nms1", via: viaHAProxy("nms1")},
		{Key: "gotls-x", Name: "Go crypto/tls pod to pod, no mesh, across nodes", CrossNode: true, client: "nmc", server: "nms2", goTLS: true},
		{Key: "gotls-s", Name: "Go crypto/tls pod to pod, no mesh, same node", client: "nmc", server: "nms1", goTLS: true},
		ferry("ferry-x", "Ferry mTLS tunnel, across nodes", true, modeEBPF),
		ferry("ferry-s", "Ferry, same node", false, modeEBPF),
		nofastX,
		nofastS,
		opaque(nofastX),
		opaque(nofastS),
		ferry("ipt-x", "Ferry iptables capture, across nodes", true, modeIPTables),
		ferry("ipt-s", "Ferry iptables capture, same node", false, modeIPTables),
	}
}

// noMeshKey and peerKey are the scenarios a row's ratios compare with.
func (s Scenario) noMeshKey() string {
	if s.CrossNode {
		return "nomesh-x"
	}
	return "nomesh-s"
}

func (s Scenario) peerKey() string {
	if s.CrossNode {
		return "haproxy-x"
	}
	return "haproxy-s"
}

// workloadKind says which client a workload runs.
type workloadKind int

const (
	kindHTTP    workloadKind = iota // fortio load, HTTP/1.1 keep-alive
	kindNewConn                     // fortio load -keepalive=false: one connection per request
	kindBulk                        // tcp-send to the sink
	kindH2                          // h2load, HTTP/2 prior knowledge (h2c), streams multiplexed
	kindGRPC                        // fortio load -grpc -ping: unary calls
	kindRR                          // rr-client: small exchanges, one at a time per connection
)

// proto is what the workload's client speaks.
func (k workloadKind) proto() protocol {
	switch k {
	case kindBulk:
		return protoTCP
	case kindH2:
		return protoH2
	case kindGRPC:
		return protoGRPC
	case kindRR:
		return protoRR
	}
	return protoHTTP1
}

// Workload is one kind of traffic.
type Workload struct {
	Key  string
	Name string
	kind workloadKind
	QPS  int // offered requests per second; 0 is as many as possible
	// Conns is the client's connections; Streams the requests in flight on each
	// (HTTP/2 and gRPC; 0 is one).
	Conns, Streams int
	Payload        int // request and response body bytes (HTTP/2: the response's)
	// Published marks the format published mesh figures use.
	Published bool
	// only, when set, are the keys of the scenarios the workload runs in; nil is all.
	only []string
}

// runsIn says whether the workload is measured in scenario sc.
func (w Workload) runsIn(sc Scenario) bool {
	if sc.l7Only && !w.kind.proto().l7() {
		return false
	}
	if sc.goTLS && w.kind != kindBulk {
		return false
	}
	return w.only == nil || slices.Contains(w.only, sc.Key)
}

// Plan is the set of scenarios, workloads, repetitions and durations of a run.
type Plan struct {
	Quick    bool
	Reps     int
	Duration time.Duration // of each workload run
	Warmup   time.Duration // of the light traffic before a scenario's first workload
	// H2Warmup is h2load's own warm-up (--warm-up-time) before each HTTP/2 run, at the
	// run's concurrency: the HAProxy pair opens a backend connection per concurrent
	// stream, and 400 opening at once stall about a second, which is set-up, not the
	// steady state a running mesh is in.
	H2Warmup  time.Duration
	Scenarios []Scenario
	Workloads []Workload
	// Selected says the plan was cut down with Select: its history rows are "custom".
	Selected bool
}

// Select keeps only the workloads and scenarios with the given keys (all when a
// list is empty).
func (p *Plan) Select(workloads, scenarios []string) error {
	var err error
	if p.Workloads, err = pick(p.Workloads, workloads, "workload", func(w Workload) string { return w.Key }); err != nil {
		return err
	}
	if p.Scenarios, err = pick(p.Scenarios, scenarios, "scenario", func(s Scenario) string { return s.Key }); err != nil {
		return err
	}
	p.Selected = p.Selected || len(workloads) > 0 || len(scenarios) > 0
	if p.Runs() == 0 {
		return errors.New("the selected workloads run in none of the selected scenarios")
	}
	return nil
}

// pick is the items of xs with the keys want, in that order; xs when want is empty.
func pick[T any](xs []T, want []string, what string, key func(T) string) ([]T, error) {
	if len(want) == 0 {
		return xs, nil
	}
	var out []T
	for _, k := range want {
		i := slices.IndexFunc(xs, func(x T) bool { return key(x) == k })
		if i < 0 {
			var all []string
			for _, x := range xs {
				all = append(all, key(x))
			}
			return nil, fmt.Errorf("no %s %q in this plan (%s)", what, k, strings.Join(all, ", "))
		}
		out = append(out, xs[i])
	}
	return out, nil
}

func httpWorkload(qps, payload int) Workload {
	w := Workload{kind: kindHTTP, QPS: qps, Conns: 16, Payload: payload}
	size := fmt.Sprintf("%dk", payload>>10)
	if qps == 0 {
		w.Key, w.Name = "http-"+size+"-max", fmt.Sprintf("HTTP/1.1 keep-alive, %s KiB, 16 conns, max req/s", size[:len(size)-1])
	} else {
		w.Key, w.Name = fmt.Sprintf("http-%s-%d", size, qps), fmt.Sprintf("HTTP/1.1 keep-alive, %s KiB, 16 conns, %d req/s", size[:len(size)-1], qps)
	}
	w.Published = qps == 1000 && payload == 1024
	return w
}

// HTTP/2 and gRPC load: h2load with 4 connections of 100 concurrent streams each
// (what the L7 acceptance test runs), fortio's gRPC ping with 4 connections of 4
// concurrent calls each. Both fit a 2-CPU machine with the client on one CPU.
const (
	h2Conns, h2Streams     = 4, 100
	grpcConns, grpcStreams = 4, 4
)

// l7Workload is h2load fetching a 1 KiB body (kindH2) or unary gRPC pings with
// 1 KiB each way (kindGRPC), at qps (0: as fast as they go).
func l7Workload(kind workloadKind, qps int) Workload {
	w := Workload{kind: kind, QPS: qps, Conns: h2Conns, Streams: h2Streams, Payload: 1024}
	key, what, unit := "h2", "HTTP/2 h2c (h2load), 1 KiB response", "req/s"
	if kind == kindGRPC {
		w.Conns, w.Streams = grpcConns, grpcStreams
		key, what, unit = "grpc", "gRPC unary (fortio ping), 1 KiB each way", "calls/s"
	}
	rate := "max " + unit
	w.Key = key + "-1k-max"
	if qps > 0 {
		rate, w.Key = fmt.Sprintf("%d %s", qps, unit), fmt.Sprintf("%s-1k-%d", key, qps)
	}
	w.Name = fmt.Sprintf("%s, %d conns × %d streams, %s", what, w.Conns, w.Streams, rate)
	return w
}

// quickL7Scenarios are the scenarios the quick run measures HTTP/2 and gRPC in: the
// baselines and Ferry as it ships (--fast-path=false), through Services that declare
// the protocol and through ones declared tcp, to stay within its time.
var quickL7Scenarios = []string{"nomesh-x", "nomesh-s", "haproxy-x", "haproxy-s", "nofast-x", "nofast-s", "nofast-tcp-x", "nofast-tcp-s"}

// Runs is how many workload runs the plan makes in all.
func (p Plan) Runs() int {
	n := 0
	for _, sc := range p.Scenarios {
		for _, w := range p.Workloads {
			if w.runsIn(sc) {
				n += p.Reps
			}
		}
	}
	return n
}

// NewPlan is the run `ferry bench` makes; quick is the short one.
func NewPlan(quick bool) Plan {
	p := Plan{Quick: quick, Scenarios: scenarios(), H2Warmup: time.Second}
	var rates []int
	var l7 []Workload
	if quick {
		p.Reps, p.Duration, p.Warmup = 3, time.Second, 300*time.Millisecond
		rates = []int{1000, 3000}
		l7 = []Workload{l7Workload(kindH2, 0), l7Workload(kindGRPC, 1000), l7Workload(kindGRPC, 0)}
		for i := range l7 {
			l7[i].only = quickL7Scenarios
		}
	} else {
		p.Reps, p.Duration, p.Warmup = 4, 3*time.Second, time.Second
		rates = []int{500, 1000, 2000, 4000}
		l7 = []Workload{l7Workload(kindH2, 1000), l7Workload(kindH2, 0), l7Workload(kindGRPC, 1000), l7Workload(kindGRPC, 3000), l7Workload(kindGRPC, 0)}
	}
	for _, r := range rates {
		p.Workloads = append(p.Workloads, httpWorkload(r, 1024))
	}
	p.Workloads = append(p.Workloads, httpWorkload(0, 1024))
	if !quick {
		p.Workloads = append(p.Workloads, httpWorkload(1000, 10240))
	}
	p.Workloads = append(p.Workloads, httpWorkload(0, 10240),
		Workload{Key: "newconn", Name: "new connection per request, 1 KiB, 8 conns, max", kind: kindNewConn, Conns: 8, Payload: 1024},
		Workload{Key: "bulk", Name: "bulk TCP, 1 connection, one way", kind: kindBulk, Conns: 1},
		rrSmall(),
	)
	p.Workloads = append(p.Workloads, l7...)
	return p
}

// rrScenarios are the scenarios the small request-response workload runs in: the
// baselines and Ferry with and without the fast path, both placements.
var rrScenarios = []string{"nomesh-x", "nomesh-s", "haproxy-x", "haproxy-s", "ferry-x", "ferry-s", "nofast-x", "nofast-s"}

// rrSmall is 64 connections each doing one 16-byte request and 64-byte reply at a
// time, as fast as they go.
func rrSmall() Workload {
	return Workload{Key: "rr-small", Name: fmt.Sprintf("small request-response, %d B request, %d B reply, 64 conns, no pipelining, max", RRRequestSize, RRReplySize),
		kind: kindRR, Conns: 64, Payload: RRRequestSize, only: rrScenarios}
}
