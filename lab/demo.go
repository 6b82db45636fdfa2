package lab

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/ferrymesh/ferry/api/admin"
)

// Ports the demo's servers listen on in every pod: ferry's TCP echo, its HTTP
// server and its gRPC (health) server.
const (
	DemoPort     = 8080
	DemoHTTPPort = 8081
	DemoGRPCPort = 8082
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
// no route knows, each over b (node1) and c (node2): web (TCP echo), api (HTTP) and
// rpc (gRPC), their protocols declared by appProtocol.
var DemoServices = []ServiceConfig{
	{Name: "web", ClusterIP: netip.MustParseAddr("10.96.0.50"), Port: 80, TargetPort: DemoPort, AppProtocol: "tcp", Pods: []string{"b", "c"}},
	{Name: "api", ClusterIP: netip.MustParseAddr("10.96.0.51"), Port: 80, TargetPort: DemoHTTPPort, AppProtocol: "http", Pods: []string{"b", "c"}},
	{Name: "rpc", ClusterIP: netip.MustParseAddr("10.96.0.52"), Port: 80, TargetPort: DemoGRPCPort, AppProtocol: "grpc", Pods: []string{"b", "c"}},
}

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
	return l.WriteCarried(ctx, out)
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
			if p := c.Dst.Port(); p == DemoPort || p == DemoHTTPPort || p == DemoGRPCPort {
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

// startDemoServer runs ferry's echo servers (TCP, HTTP, gRPC) in pod p, each in a
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
	for _, srv := range []struct {
		port int
		mode []string
	}{{DemoPort, nil}, {DemoHTTPPort, []string{"--http"}}, {DemoGRPCPort, []string{"--grpc"}}} {
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
