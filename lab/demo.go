package lab

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/ferrymesh/ferry/api/admin"
	"github.com/ferrymesh/ferry/api/ferryv1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Ports the demo's servers listen on in every pod: ferry's TCP echo, its HTTP
// server and its gRPC (health) server; and in the pods of api-canary, a second HTTP
// server standing for the app's canary build.
const (
	DemoPort       = 8080
	DemoHTTPPort   = 8081
	DemoGRPCPort   = 8082
	DemoCanaryPort = 8083
)

// DemoRoute is one kind of traffic the demo sends.
type DemoRoute struct {
	From, To string
	What     string
}

// DemoRoutes are the demo's paths through the default lab: across nodes, on one node,
// into the mesh from a pod outside it, out of the mesh, and twice to a Service (To
// names a pod or one of DemoServices), balanced over its endpoints.
var DemoRoutes = []DemoRoute{
	{"a", "c", "across nodes: mTLS tunnel"},
	{"a", "b", "same node: through the agent, no wire"},
	{"d", "c", "from outside the mesh: inbound capture"},
	{"a", "d", "to outside the mesh: plaintext passthrough"},
	{"a", "web", "to a Service: the proxy picks an endpoint"},
	{"a", "web", "to a Service again: the next endpoint"},
}

// DemoRequests are the demo's requests to its HTTP and gRPC Services (To names one
// of DemoServices): several on one connection, each balanced on its own.
var DemoRequests = []DemoRoute{
	{"a", "api", "HTTP/1.1 (curl), 6 requests on one connection: an endpoint per request"},
	{"a", "rpc", "gRPC, 6 calls on one channel: an endpoint per call"},
}

// demoRequests is how many requests each of DemoRequests sends.
const demoRequests = 6

// DemoServices are the Services the demo adds to the default lab, at cluster IPs
// no route knows: web (TCP echo), api (HTTP) and rpc (gRPC), each over b (node1)
// and c (node2), and api-canary (HTTP) over c's canary server, where the demo's
// HTTPRoute on api sends some of api's requests; their protocols declared by
// appProtocol.
var DemoServices = []ServiceConfig{
	{Name: "web", ClusterIP: netip.MustParseAddr("10.96.0.50"), Port: 80, TargetPort: DemoPort, AppProtocol: "tcp", Pods: []string{"b", "c"}},
	{Name: "api", ClusterIP: netip.MustParseAddr("10.96.0.51"), Port: 80, TargetPort: DemoHTTPPort, AppProtocol: "http", Pods: []string{"b", "c"}},
	{Name: "rpc", ClusterIP: netip.MustParseAddr("10.96.0.52"), Port: 80, TargetPort: DemoGRPCPort, AppProtocol: "grpc", Pods: []string{"b", "c"}},
	{Name: demoCanary, ClusterIP: netip.MustParseAddr("10.96.0.55"), Port: 80, TargetPort: DemoCanaryPort, AppProtocol: "http", Pods: []string{"c"}},
}

// The demo's traffic management: an HTTPRoute on api (demoRouteFile in the
// operator's folder) that sends requests marked x-canary: true to api-canary and
// splits the rest 90/10 between api and api-canary; demoCanaryRequests requests
// with the header and as many without.
const (
	demoCanary         = "api-canary"
	demoRouteFile      = "demo-api-canary.yaml"
	demoCanaryRequests = 20
	demoRoute          = `apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api-canary, namespace: default, generation: %d}
spec:
  parentRefs: [{group: "", kind: Service, name: api, port: 80}]
  rules:
  - matches: [{headers: [{type: Exact, name: x-canary, value: "true"}]}]
    backendRefs: [{name: api-canary, port: 80}]
  - backendRefs:
    - {name: api, port: 80, weight: 90}
    - {name: api-canary, port: 80, weight: 10}
`
)

// Demo starts an echo server in every pod, sends 1 MiB along each DemoRoute with
// ferry's echo client (the binary at ferryBin, run inside the source pod), and
// writes a table of what the agents carried and how. The servers keep running with
// the lab, so a user can go on sending traffic.
func (l *Lab) Demo(ctx context.Context, ferryBin string, log *slog.Logger, out io.Writer) error {
	for _, p := range l.Pods() {
		if err := l.startDemoServer(ctx, ferryBin, p); err != nil {
			return err
		}
	}
	for _, r := range DemoRoutes {
		var dst netip.AddrPort
		if to, ok := l.Pod(r.To); ok {
			dst = netip.AddrPortFrom(to.IP, DemoPort)
		} else if sv, ok := l.service(r.To); ok {
			dst = netip.AddrPortFrom(sv.ClusterIP, sv.Port)
		} else {
			return fmt.Errorf("demo: the lab has no pod or Service %q (the demo needs the default lab with DemoServices)", r.To)
		}
		log.Info(fmt.Sprintf("send 1 MiB %s → %s %s (%s)", r.From, r.To, dst, r.What))
		if err := l.demoClient(ctx, log, r, ferryBin, "lab", "echo-client", "--to", dst.String(), "--bytes", "1MiB"); err != nil {
			return err
		}
	}
	for _, r := range DemoRequests {
		sv, ok := l.service(r.To)
		if !ok {
			return fmt.Errorf("demo: the lab has no Service %q (the demo needs the default lab with DemoServices)", r.To)
		}
		dst := netip.AddrPortFrom(sv.ClusterIP, sv.Port)
		log.Info(fmt.Sprintf("%s → %s %s (%s)", r.From, r.To, dst, r.What))
		var err error
		if sv.AppProtocol == "grpc" {
			err = l.demoClient(ctx, log, r, ferryBin, "lab", "echo-client", "--to", dst.String(), "--grpc-calls", fmt.Sprint(demoRequests))
		} else {
			// curl prints each answer, {"pod": ..., "remote_addr": ...}, on a line.
			args := []string{"-sS", "--fail", "-w", "\\n"}
			for range demoRequests {
				args = append(args, "http://"+dst.String()+"/")
			}
			err = l.demoClient(ctx, log, r, "curl", args...)
		}
		if err != nil {
			return err
		}
	}
	if err := l.demoTrafficManagement(ctx, log); err != nil {
		return err
	}
	return l.WriteCarried(ctx, out)
}

// demoTrafficManagement applies the demo's HTTPRoute on api through the local-mode
// operator, logs its status as `ferry agent routes` shows it, then sends requests
// with and without the canary header and logs where the mesh sent each, as the
// source agent recorded it: api's endpoints and api-canary's are the same pod, c,
// on different ports, so the answers alone cannot tell them apart; the request
// flows, which name the endpoint, can.
func (l *Lab) demoTrafficManagement(ctx context.Context, log *slog.Logger) error {
	api, ok1 := l.service("api")
	canary, ok2 := l.service(demoCanary)
	if !ok1 || !ok2 {
		return fmt.Errorf("demo: the lab has no Services api and %s (the demo needs the default lab with DemoServices)", demoCanary)
	}
	if !l.runsOperator() {
		log.Info("traffic management skipped: routes need the local-mode operator (build ferry-operator beside ferry)")
		return nil
	}
	nodes := l.Nodes()
	if len(nodes) == 0 {
		return errors.New("demo: the lab has no nodes")
	}
	ref := ConfigRef{Kind: "HTTPRoute", Name: "default/" + demoCanary}
	gens, err := l.configGenerations(ctx, nodes[0])
	if err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	log.Info(fmt.Sprintf("apply HTTPRoute %s on api: x-canary: true → %s, the rest 90/10 api / %s", ref.Name, demoCanary, demoCanary))
	actx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	applied, err := l.ApplyManifest(actx, demoRouteFile, fmt.Sprintf(demoRoute, gens[ref]+1))
	if err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	cs, err := l.ConfigStatus(ctx, nodes[0])
	if err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	i := slices.IndexFunc(cs, func(c *ferryv1.ConfigStatus) bool { return c.GetKind() == ref.Kind && c.GetName() == ref.Name })
	if i < 0 {
		return fmt.Errorf("demo: the agent on %s has no status for %s %s", nodes[0], ref.Kind, ref.Name)
	}
	log.Info("  " + configStatusLine(cs[i], applied))
	for _, marked := range []bool{true, false} {
		args := []string{"-sS", "--fail"}
		what := "no header"
		if marked {
			args, what = append(args, "-H", "x-canary: true"), "x-canary: true"
		}
		dst := netip.AddrPortFrom(api.ClusterIP, api.Port)
		for range demoCanaryRequests {
			args = append(args, "http://"+dst.String()+"/")
		}
		start := time.Now()
		if res, err := l.Command(ctx, "a", "curl", args...).CombinedOutput(); err != nil {
			return fmt.Errorf("demo a → api (%s): %w\n%s", what, err, res)
		}
		sentTo, err := l.requestsSentTo(ctx, "a", "default/api", start, demoCanaryRequests,
			map[uint32]string{uint32(api.TargetPort): "api", uint32(canary.TargetPort): demoCanary})
		if err != nil {
			return err
		}
		log.Info(fmt.Sprintf("a → api %s, %d requests (%s): sent to %s", dst, demoCanaryRequests, what, sentTo))
	}
	return nil
}

// runsOperator says whether the lab runs a local-mode operator, which routes need.
func (l *Lab) runsOperator() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.desc.Op != nil
}

// configStatusLine is a route's status on one line, as `ferry agent routes` lists
// it: "HTTPRoute default/api-canary (file demo-api-canary.yaml, generation 1) →
// default/api: Accepted True, ResolvedRefs True; applied on node1 after 80ms, ...".
func configStatusLine(c *ferryv1.ConfigStatus, applied Applied) string {
	var conds []string
	for _, cond := range c.GetConditions() {
		status := "False"
		if cond.GetStatus() {
			status = "True"
		}
		conds = append(conds, cond.GetType()+" "+status)
	}
	var in []string
	for _, node := range slices.Sorted(maps.Keys(applied)) {
		in = append(in, fmt.Sprintf("%s after %s", node, applied[node].Round(time.Millisecond)))
	}
	return fmt.Sprintf("%s %s (file %s, generation %d) → %s: %s; applied on %s", c.GetKind(), c.GetName(), orDash(c.GetFile()), c.GetGeneration(),
		orDash(strings.Join(c.GetTargets(), ", ")), strings.Join(conds, ", "), strings.Join(in, ", "))
}

// requestsSentTo tallies the n requests pod from sent to Service svc
// (namespace/name) since start, by the Service behind the endpoint's port
// (services) and the endpoint's pod, from the request flows of the source's agent:
// "api 17 (b 9, c 8), api-canary 3 (c 3)".
func (l *Lab) requestsSentTo(ctx context.Context, from, svc string, start time.Time, n int, services map[uint32]string) (string, error) {
	src, ok := l.Pod(from)
	if !ok {
		return "", fmt.Errorf("demo: the lab has no pod %q", from)
	}
	conn, err := grpc.NewClient("unix://"+l.ObserverSocket(src.Node), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return "", fmt.Errorf("observer of %s: %w", src.Node, err)
	}
	defer conn.Close()
	obs := ferryv1.NewObserverClient(conn)
	req := &ferryv1.GetFlowsRequest{
		Since:  timestamppb.New(start),
		Filter: &ferryv1.FlowFilter{FromPod: []string{from}, Protocol: []string{"http"}, Node: []string{src.Node}},
	}
	// The agent records a request when its response has ended, which may be a moment
	// after the client read it.
	var sent []*ferryv1.Flow
	for deadline := time.Now().Add(2 * time.Second); ; {
		sent = sent[:0]
		stream, err := obs.GetFlows(ctx, req)
		if err != nil {
			return "", fmt.Errorf("flows of %s: %w", src.Node, err)
		}
		for {
			res, err := stream.Recv()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				return "", fmt.Errorf("flows of %s: %w", src.Node, err)
			}
			if f := res.GetFlow(); f.GetDirection() == string(admin.Outbound) && f.GetService() == svc {
				sent = append(sent, f)
			}
		}
		if len(sent) >= n || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	perService, perPod := map[string]int{}, map[string]map[string]int{}
	for _, f := range sent {
		dst := f.GetDestination()
		name := services[dst.GetPort()]
		if name == "" {
			name = "port " + strconv.Itoa(int(dst.GetPort()))
		}
		pod := orDash(dst.GetPod())
		perService[name]++
		if perPod[name] == nil {
			perPod[name] = map[string]int{}
		}
		perPod[name][pod]++
	}
	if len(perService) == 0 {
		return "", fmt.Errorf("demo: %s's agent recorded none of the %d requests to %s", src.Node, n, svc)
	}
	var parts []string
	for _, name := range slices.Sorted(maps.Keys(perService)) {
		var pods []string
		for _, pod := range slices.Sorted(maps.Keys(perPod[name])) {
			pods = append(pods, fmt.Sprintf("%s %d", pod, perPod[name][pod]))
		}
		parts = append(parts, fmt.Sprintf("%s %d (%s)", name, perService[name], strings.Join(pods, ", ")))
	}
	return strings.Join(parts, ", "), nil
}

// demoClient runs a client of route r in its source pod and logs its last line.
func (l *Lab) demoClient(ctx context.Context, log *slog.Logger, r DemoRoute, name string, args ...string) error {
	res, err := l.Command(ctx, r.From, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("demo %s → %s: %w\n%s", r.From, r.To, err, res)
	}
	if name == "curl" {
		log.Info("  answered by: " + strings.Join(answeredBy(string(res)), ", "))
		return nil
	}
	log.Info("  " + strings.TrimSpace(lastLine(string(res))))
	return nil
}

// answeredBy reads the pod of each JSON answer of the demo's HTTP server.
func answeredBy(out string) []string {
	var pods []string
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		var a struct{ Pod string }
		if json.Unmarshal([]byte(line), &a) == nil && a.Pod != "" {
			pods = append(pods, a.Pod)
		}
	}
	return pods
}

// service is the lab's Service called name.
func (l *Lab) service(name string) (ServiceConfig, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	i := slices.IndexFunc(l.desc.Config.Services, func(s ServiceConfig) bool { return s.Name == name })
	if i < 0 {
		return ServiceConfig{}, false
	}
	return l.desc.Config.Services[i], true
}

// WriteCarried writes a table of the connections the lab's agents carried to the
// demo port: where from and to, how (mTLS, same node, plaintext), which identities.
func (l *Lab) WriteCarried(ctx context.Context, out io.Writer) error {
	byIP := map[netip.Addr]string{}
	for _, p := range l.Pods() {
		byIP[p.IP] = p.Name
	}
	name := func(a netip.AddrPort) string {
		if n, ok := byIP[a.Addr()]; ok {
			return n
		}
		return a.Addr().String()
	}
	type row struct {
		node string
		c    admin.Conn
	}
	var rows []row
	for _, node := range l.Nodes() {
		cs, err := admin.NewClient(l.AgentSocket(node)).Connections(ctx)
		if err != nil {
			return fmt.Errorf("agent on %s: %w", node, err)
		}
		for _, c := range append(cs.Live, cs.Ended...) {
			if p := c.Dst.Port(); p == DemoPort || p == DemoHTTPPort || p == DemoGRPCPort || p == DemoCanaryPort {
				rows = append(rows, row{node, c})
			}
		}
	}
	sort.Slice(rows, func(i, j int) bool { return rows[i].c.Start.Before(rows[j].c.Start) })
	fmt.Fprintln(out, "\nWhat the agents carried:")
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	services := map[netip.AddrPort]string{}
	for _, sv := range l.desc.Config.Services {
		services[netip.AddrPortFrom(sv.ClusterIP, sv.Port)] = sv.Name
	}
	fmt.Fprintln(tw, "AGENT\tDIRECTION\tFROM\tTO\tVIA SERVICE\tHOW\tSOURCE IDENTITY\tDESTINATION IDENTITY\tBYTES SENT/RECEIVED")
	for _, r := range rows {
		c := r.c
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d/%d\n", r.node, c.Direction, name(c.Src), name(c.Dst), orDash(services[c.Service]),
			c.Security, orDash(c.SrcIdentity), orDash(c.DstIdentity), c.BytesSent, c.BytesRecv)
	}
	return tw.Flush()
}

// startDemoServer runs ferry's echo servers (TCP, HTTP, gRPC, and the canary's HTTP
// in api-canary's pods) in pod p, each in a
// session of its own so it outlives the demo command (Down ends it with the lab), and
// waits until they accept.
func (l *Lab) startDemoServer(ctx context.Context, ferryBin string, p PodInfo) error {
	logf, err := os.Create(filepath.Join(l.desc.Config.StateDir, "echo-"+p.Name+".log"))
	if err != nil {
		return err
	}
	defer logf.Close()
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	type server struct {
		port int
		mode []string
	}
	servers := []server{{DemoPort, nil}, {DemoHTTPPort, []string{"--http"}}, {DemoGRPCPort, []string{"--grpc"}}}
	if canary, ok := l.service(demoCanary); ok && slices.Contains(canary.Pods, p.Name) {
		servers = append(servers, server{DemoCanaryPort, []string{"--http"}})
	}
	for _, srv := range servers {
		args := append([]string{"lab", "echo-server", "--listen", fmt.Sprintf(":%d", srv.port)}, srv.mode...)
		cmd := l.Command(context.Background(), p.Name, ferryBin, args...)
		cmd.Stdout, cmd.Stderr = logf, logf
		if cmd.SysProcAttr != nil {
			cmd.SysProcAttr.Setsid = true
		}
		if _, err := l.StartInPod(ctx, p.Name, srv.port, cmd); err != nil {
			return fmt.Errorf("echo server: %w", err)
		}
	}
	return nil
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
