// Scenarios (what carries the traffic) and workloads (what traffic), and the lab
// they run in.

package bench

import (
	"fmt"
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
	// via, when set, is the local address the client connects to instead of the
	// server (the client-side HAProxy); the last digit picks HTTP (1) or bulk (2).
	viaHTTP, viaBulk string
}

// Pods of the benchmark lab. Enrolled: cli, srv1 (node1) and srv2 (node2). Outside
// the mesh, for the no-mesh and HAProxy scenarios: nmc, nms1 (node1) and nms2 (node2).
func labConfig(agentBin string) lab.Config {
	return lab.Config{
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
}

// Ports of the servers in every server pod, and of the HAProxy pair.
const (
	httpPort       = 8080
	sinkPort       = 5201
	hapTLSHTTPPort = 15443 // server-side HAProxy: mTLS in, plaintext to httpPort
	hapTLSBulkPort = 15444 // server-side HAProxy: mTLS in, plaintext to sinkPort
)

// scenarios is every scenario, in the order of the table. Keys of the no-mesh and
// HAProxy rows are what ratios refer to.
func scenarios() []Scenario {
	return []Scenario{
		{Key: "nomesh-x", Name: "no mesh, across nodes", CrossNode: true, client: "nmc", server: "nms2"},
		{Key: "nomesh-s", Name: "no mesh, same node", client: "nmc", server: "nms1"},
		{Key: "haproxy-x", Name: "HAProxy pair mTLS, across nodes", CrossNode: true, proxy: proxyHAProxy, client: "nmc", server: "nms2", viaHTTP: "127.0.0.1:15001", viaBulk: "127.0.0.1:15002"},
		{Key: "haproxy-s", Name: "HAProxy pair mTLS, same node", proxy: proxyHAProxy, client: "nmc", server: "nms1", viaHTTP: "127.0.0.1:15003", viaBulk: "127.0.0.1:15004"},
		{Key: "ferry-x", Name: "Ferry mTLS tunnel, across nodes", CrossNode: true, mode: modeEBPF, proxy: proxyFerry, client: "cli", server: "srv2"},
		{Key: "ferry-s", Name: "Ferry, same node", mode: modeEBPF, proxy: proxyFerry, client: "cli", server: "srv1"},
		{Key: "nofast-x", Name: "Ferry no fast path, across nodes", CrossNode: true, mode: modeNoFast, proxy: proxyFerry, client: "cli", server: "srv2"},
		{Key: "nofast-s", Name: "Ferry no fast path, same node", mode: modeNoFast, proxy: proxyFerry, client: "cli", server: "srv1"},
		{Key: "ipt-x", Name: "Ferry iptables capture, across nodes", CrossNode: true, mode: modeIPTables, proxy: proxyFerry, client: "cli", server: "srv2"},
		{Key: "ipt-s", Name: "Ferry iptables capture, same node", mode: modeIPTables, proxy: proxyFerry, client: "cli", server: "srv1"},
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
)

// Workload is one kind of traffic.
type Workload struct {
	Key     string
	Name    string
	kind    workloadKind
	QPS     int // offered requests per second; 0 is as many as possible
	Conns   int
	Payload int // request and response body bytes
	// Published marks the format published mesh figures use.
	Published bool
}

// Plan is the set of scenarios, workloads, repetitions and durations of a run.
type Plan struct {
	Quick     bool
	Reps      int
	Duration  time.Duration // of each workload run
	Warmup    time.Duration // of the light traffic before a scenario's first workload
	Scenarios []Scenario
	Workloads []Workload
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

// NewPlan is the run `ferry bench` makes; quick is the short one.
func NewPlan(quick bool) Plan {
	p := Plan{Quick: quick, Scenarios: scenarios()}
	var rates []int
	if quick {
		p.Reps, p.Duration, p.Warmup = 3, time.Second, 300*time.Millisecond
		rates = []int{1000, 3000}
	} else {
		p.Reps, p.Duration, p.Warmup = 4, 3*time.Second, time.Second
		rates = []int{500, 1000, 2000, 4000}
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
	)
	return p
}
