package agent

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ferrymesh/ferry/agent/controlplane"
	"github.com/ferrymesh/ferry/agent/datapath"
	"github.com/ferrymesh/ferry/agent/flows"
	"github.com/ferrymesh/ferry/agent/metrics"
	"github.com/ferrymesh/ferry/agent/proxy"
	"github.com/ferrymesh/ferry/api/ferryv1"
	"github.com/ferrymesh/ferry/bpf"
	"github.com/ferrymesh/ferry/internal/healthserver"
	"github.com/ferrymesh/ferry/internal/listener"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Status is what GET /status on the admin API returns.
type Status struct {
	Node          string        `json:"node"`
	StateVersion  uint64        `json:"state_version"`
	StateAge      string        `json:"state_age"`
	Goroutines    int           `json:"goroutines"`
	OpenFDs       int           `json:"open_fds"`
	LiveConns     int           `json:"live_connections"`
	TunnelConns   int           `json:"tunnel_connections"`
	TunnelStreams int           `json:"tunnel_streams"`
	FastPath      bool          `json:"fast_path"`
	Pods          []StatusPod   `json:"pods"`
	Uptime        time.Duration `json:"uptime_ns"`
	// Certificates held from the operator (operator mode only).
	Certificates []controlplane.CertInfo `json:"certificates,omitempty"`
}

// StatusPod is one enrolled pod in Status.
type StatusPod struct {
	Name        string `json:"name"`
	IP          string `json:"ip"`
	Identity    string `json:"identity"`
	NetnsCookie uint64 `json:"netns_cookie"`
}

// Connections is what GET /connections on the admin API returns.
type Connections struct {
	Live  []proxy.Conn `json:"live"`
	Ended []proxy.Conn `json:"ended"`
}

// adminServer serves the agent's admin API on a unix socket, which pods cannot
// reach: only processes on the node with access to the socket file can.
type adminServer struct {
	path    string
	a       *Agent
	log     *slog.Logger
	srv     *http.Server
	started time.Time
	done    chan struct{}
}

func newAdminServer(path string, a *Agent, log *slog.Logger) *adminServer {
	s := &adminServer{path: path, a: a, log: log}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /status", s.status)
	mux.HandleFunc("GET /connections", s.connections)
	mux.HandleFunc("GET /workloads", s.workloads)
	mux.HandleFunc("GET /certs", s.certs)
	mux.HandleFunc("GET /config", s.config)
	mux.HandleFunc("GET /state", s.stateJSON)
	mux.HandleFunc("GET /debug/pprof/", pprof.Index)
	if a.obs != nil {
		mux.Handle("GET /metrics", a.obs.metrics.Handler())
	}
	s.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second, IdleTimeout: 30 * time.Second}
	return s
}

func (s *adminServer) Start() error {
	if err := os.MkdirAll(filepath.Dir(s.path), 0o750); err != nil {
		return fmt.Errorf("admin socket dir: %w", err)
	}
	os.Remove(s.path) // a socket file left by a killed agent
	ln, err := net.Listen("unix", s.path)
	if err != nil {
		return fmt.Errorf("admin socket: %w", err)
	}
	if err := os.Chmod(s.path, 0o600); err != nil {
		ln.Close()
		return fmt.Errorf("admin socket: %w", err)
	}
	s.started = time.Now()
	s.done = make(chan struct{})
	go func() {
		defer close(s.done)
		if err := s.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("admin API stopped", "error", err)
		}
	}()
	return nil
}

func (s *adminServer) Stop() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	s.srv.Shutdown(ctx)
	if s.done != nil {
		<-s.done
	}
	os.Remove(s.path)
}

func (s *adminServer) status(w http.ResponseWriter, _ *http.Request) {
	a := s.a
	live, _ := a.proxy.Connections()
	ts := a.proxy.TunnelStats()
	st := Status{
		Node:          a.cfg.Node,
		Goroutines:    runtime.NumGoroutine(),
		OpenFDs:       countFDs(),
		LiveConns:     len(live),
		TunnelConns:   ts.Conns,
		TunnelStreams: ts.Streams,
		FastPath:      a.cfg.Datapath.FastPath,
		Uptime:        time.Since(s.started),
	}
	a.mu.Lock()
	st.StateVersion = a.state.GetVersion()
	st.StateAge = time.Since(a.applied).Round(time.Millisecond).String()
	for _, p := range a.enrolled {
		st.Pods = append(st.Pods, StatusPod{Name: p.w.Name, IP: p.w.IPs[0].String(), Identity: p.w.Identity, NetnsCookie: p.cookie})
	}
	a.mu.Unlock()
	sort.Slice(st.Pods, func(i, j int) bool { return st.Pods[i].Name < st.Pods[j].Name })
	if a.certs != nil {
		st.Certificates = a.certs.Held()
	}
	writeJSON(w, st)
}

func (s *adminServer) connections(w http.ResponseWriter, _ *http.Request) {
	live, ended := s.a.proxy.Connections()
	writeJSON(w, Connections{Live: live, Ended: ended})
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

func countFDs() int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return -1
	}
	return len(ents)
}

// AdminClient talks to an agent's admin API over its unix socket.
type AdminClient struct{ hc *http.Client }

// NewAdminClient returns a client for the admin API at socket.
func NewAdminClient(socket string) *AdminClient {
	return &AdminClient{hc: &http.Client{
		Timeout: 5 * time.Second,
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", socket)
			},
			// A unix socket is cheap to dial, and an idle kept-alive connection would
			// hold a goroutine and a file in the agent per client ever made.
			DisableKeepAlives: true,
		},
	}}
}

// Status fetches the agent's status.
func (c *AdminClient) Status(ctx context.Context) (Status, error) {
	var st Status
	return st, c.get(ctx, "/status", &st)
}

// Connections fetches the agent's live and recently ended connections.
func (c *AdminClient) Connections(ctx context.Context) (Connections, error) {
	var cs Connections
	return cs, c.get(ctx, "/connections", &cs)
}

func (c *AdminClient) get(ctx context.Context, path string, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://agent"+path, nil)
	if err != nil {
		return err
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return fmt.Errorf("agent admin API: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("agent admin API %s: %s", path, resp.Status)
	}
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		return fmt.Errorf("agent admin API %s: %w", path, err)
	}
	return nil
}

// ObserveConfig configures the agent's flows and metrics and where it serves them.
type ObserveConfig struct {
	// FlowCapacity is how many flows the ring keeps (default flows.DefaultCapacity).
	FlowCapacity int
	// ObserverSocket is the unix socket of the Observer gRPC API. Empty: observer.sock
	// beside the admin socket; "none": no socket.
	ObserverSocket string
	// ObserverAddr is a TCP address for the Observer API, for a relay on another host
	// ("" for none). Flows name pods and identities: bind it to the node's address
	// and keep it off the pods' network.
	ObserverAddr string
	// MetricsAddr is a TCP address serving /metrics for Prometheus ("" for none). The
	// admin socket serves /metrics too.
	MetricsAddr string
}

// observability records every proxied connection as a flow and in the metrics, and
// serves both. It is the proxy's ConnObserver.
type observability struct {
	cfg     ObserveConfig
	node    string
	log     *slog.Logger
	ring    *flows.Ring
	metrics *metrics.Metrics

	grpc    *grpc.Server
	httpSrv *healthserver.Server
	sockets []string
	wg      sync.WaitGroup

	// services names the service behind a destination address, for flows and the
	// destination_service label; replaced whole on every state (SetState).
	services atomic.Pointer[map[netip.AddrPort]service]
}

// service is a destination's service in flows ("namespace/name") and in the metrics
// (Istio's "name.namespace.svc.cluster.local").
type service struct{ flow, metric string }

// SetState indexes the state's services by the addresses that reach them: each
// cluster IP and port, and each endpoint pod's IP and numeric target port. When two
// services select the same pod port, the first by namespace and name wins.
func (o *observability) SetState(st *ferryv1.NodeState) {
	o.services.Store(serviceIndex(st))
}

func serviceIndex(st *ferryv1.NodeState) *map[netip.AddrPort]service {
	ips := map[string][]netip.Addr{}
	for _, w := range st.GetWorkloads() {
		for _, s := range w.GetIps() {
			if ip, err := netip.ParseAddr(s); err == nil {
				ips[w.GetUid()] = append(ips[w.GetUid()], ip.Unmap())
			}
		}
	}
	svcs := append([]*ferryv1.Service(nil), st.GetServices()...)
	sort.Slice(svcs, func(i, j int) bool {
		return svcs[i].GetNamespace()+"/"+svcs[i].GetName() < svcs[j].GetNamespace()+"/"+svcs[j].GetName()
	})
	idx := map[netip.AddrPort]service{}
	add := func(ip netip.Addr, port uint32, s service) {
		k := netip.AddrPortFrom(ip, uint16(port))
		if _, taken := idx[k]; !taken && port != 0 && port <= 65535 {
			idx[k] = s
		}
	}
	for _, sv := range svcs {
		s := service{flow: sv.GetNamespace() + "/" + sv.GetName(), metric: sv.GetName() + "." + sv.GetNamespace() + ".svc.cluster.local"}
		for _, p := range sv.GetPorts() {
			for _, c := range sv.GetClusterIps() {
				if ip, err := netip.ParseAddr(c); err == nil {
					add(ip.Unmap(), p.GetPort(), s)
				}
			}
			target := p.GetPort()
			if tp := p.GetTargetPort(); tp != "" {
				n, err := strconv.ParseUint(tp, 10, 16)
				if err != nil {
					continue // a named container port: the state does not say which number
				}
				target = uint32(n)
			}
			for _, uid := range sv.GetEndpoints() {
				for _, ip := range ips[uid] {
					add(ip, target, s)
				}
			}
		}
	}
	return &idx
}

// service returns the service behind dst, if the state names one.
func (o *observability) service(dst netip.AddrPort) service {
	if idx := o.services.Load(); idx != nil {
		return (*idx)[netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())]
	}
	return service{}
}

func newObservability(cfg Config, a *Agent, log *slog.Logger) *observability {
	oc := cfg.Observe
	if oc.ObserverSocket == "" && cfg.AdminSocket != "" {
		oc.ObserverSocket = filepath.Join(filepath.Dir(cfg.AdminSocket), "observer.sock")
	}
	if oc.ObserverSocket == "none" {
		oc.ObserverSocket = ""
	}
	o := &observability{cfg: oc, node: cfg.Node, log: log, ring: flows.NewRing(oc.FlowCapacity)}
	o.metrics = metrics.New(cfg.Node, metrics.Sources{
		Flows: func() (int, int, uint64, uint64) {
			st := o.ring.Status()
			return st.Flows, st.Capacity, st.Seen, st.Lost
		},
		LiveConns: func() int {
			if a.proxy == nil {
				return 0
			}
			live, _ := a.proxy.Connections()
			return len(live)
		},
		Kernel: kernelReader{pinDir: cfg.Datapath.PinDir},
	})
	return o
}

// Start serves the Observer API and the metrics on the configured addresses.
func (o *observability) Start() error {
	o.grpc = grpc.NewServer()
	flows.NewServer(o.ring, o.node).Register(o.grpc)
	var lns []net.Listener
	fail := func(err error) error {
		for _, ln := range lns {
			ln.Close()
		}
		return err
	}
	lc := listener.Config()
	if p := o.cfg.ObserverSocket; p != "" {
		if err := os.MkdirAll(filepath.Dir(p), 0o750); err != nil {
			return fmt.Errorf("observer socket dir: %w", err)
		}
		os.Remove(p) // a socket file left by a killed agent
		ln, err := lc.Listen(context.Background(), "unix", p)
		if err != nil {
			return fail(fmt.Errorf("observer socket: %w", err))
		}
		if err := os.Chmod(p, 0o600); err != nil {
			return fail(fmt.Errorf("observer socket: %w", err))
		}
		lns = append(lns, ln)
		o.sockets = append(o.sockets, p)
	}
	if a := o.cfg.ObserverAddr; a != "" {
		ln, err := lc.Listen(context.Background(), "tcp", a)
		if err != nil {
			return fail(fmt.Errorf("observer listener: %w", err))
		}
		lns = append(lns, ln)
	}
	if a := o.cfg.MetricsAddr; a != "" {
		o.httpSrv = healthserver.New(a, healthserver.Routes{Metrics: o.metrics.Handler()}, o.log)
		if err := o.httpSrv.Start(context.Background()); err != nil {
			return fail(fmt.Errorf("metrics listener: %w", err))
		}
		o.log.Info("metrics listening", "address", o.httpSrv.Addr().String())
	}
	for _, ln := range lns {
		o.wg.Add(1)
		go func() {
			defer o.wg.Done()
			if err := o.grpc.Serve(ln); err != nil {
				o.log.Error("observer API stopped", "error", err)
			}
		}()
		o.log.Info("observer API listening", "address", ln.Addr().String())
	}
	return nil
}

// Stop closes the servers; followers' streams end.
func (o *observability) Stop() {
	if o.grpc != nil {
		o.grpc.Stop()
	}
	if o.httpSrv != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		o.httpSrv.Stop(ctx)
		cancel()
	}
	o.wg.Wait()
	for _, p := range o.sockets {
		os.Remove(p)
	}
}

// ConnOpened counts a connection the proxy accepted.
func (o *observability) ConnOpened(c proxy.Conn) {
	o.metrics.ConnOpened(connLabels(c, o.service(c.Dst)))
}

// ConnClosed records an ended connection as a flow and in the metrics.
func (o *observability) ConnClosed(c proxy.Conn) {
	svc := o.service(c.Dst)
	o.metrics.ConnClosed(connLabels(c, svc), c.BytesSent, c.BytesRecv)
	f := o.flow(c)
	f.Service = svc.flow
	o.ring.Add(f)
}

// flow turns an ended connection into a flow record.
func (o *observability) flow(c proxy.Conn) *ferryv1.Flow {
	f := &ferryv1.Flow{
		Time:          timestamppb.New(c.End),
		Node:          o.node,
		Direction:     string(c.Direction),
		Source:        endpoint(c.SrcPod, c.SrcIdentity, c.SrcNode, c.Src),
		Destination:   endpoint(c.DstPod, c.DstIdentity, c.DstNode, c.Dst),
		Verdict:       ferryv1.Verdict_VERDICT_FORWARDED,
		Reason:        c.Error,
		Security:      string(c.Security),
		Protocol:      "tcp",
		BytesSent:     uint64(max(c.BytesSent, 0)),
		BytesReceived: uint64(max(c.BytesRecv, 0)),
		Duration:      durationpb.New(c.End.Sub(c.Start)),
	}
	if c.Error != "" && c.BytesSent == 0 && c.BytesRecv == 0 {
		f.Verdict = ferryv1.Verdict_VERDICT_ERROR
		// The tunnel's server answers 403 when the mesh refuses the stream.
		if strings.Contains(c.Error, "403") || strings.Contains(c.Error, "Forbidden") {
			f.Verdict = ferryv1.Verdict_VERDICT_DROPPED
		}
	}
	return f
}

func endpoint(pod, identity, node string, ap netip.AddrPort) *ferryv1.Endpoint {
	e := &ferryv1.Endpoint{Identity: identity, Ip: ap.Addr().Unmap().String(), Port: uint32(ap.Port()), Node: node}
	if ns, name, ok := strings.Cut(pod, "/"); ok {
		e.Namespace, e.Pod = ns, name
	} else {
		e.Pod = pod
	}
	return e
}

// connLabels are the Istio labels of a connection: workloads by pod name (there are no
// Deployments to name them by), no addresses or ports.
func connLabels(c proxy.Conn, svc service) metrics.Labels {
	l := metrics.Labels{
		DestinationService:       svc.metric,
		Reporter:                 metrics.ReporterSource,
		SourcePrincipal:          c.SrcIdentity,
		DestinationPrincipal:     c.DstIdentity,
		ConnectionSecurityPolicy: metrics.None,
	}
	if c.Direction == proxy.Inbound {
		l.Reporter = metrics.ReporterDestination
	}
	if c.Security == proxy.MTLS || c.Security == proxy.SameNode {
		// Same node: both identities are proven by the listeners the agent owns, so
		// the connection is as authenticated as a mutual-TLS one.
		l.ConnectionSecurityPolicy = metrics.MutualTLS
	}
	if ns, name, ok := strings.Cut(c.SrcPod, "/"); ok {
		l.SourceWorkloadNamespace, l.SourceWorkload = ns, name
	}
	if ns, name, ok := strings.Cut(c.DstPod, "/"); ok {
		l.DestinationWorkloadNamespace, l.DestinationWorkload = ns, name
	}
	return l
}

// kernelReader reads the data path's pinned maps for the metrics.
type kernelReader struct{ pinDir string }

func (k kernelReader) MapFill() ([]metrics.MapFill, error) {
	d, err := datapath.DumpMaps(k.pinDir)
	if err != nil {
		return nil, err
	}
	out := make([]metrics.MapFill, 0, len(d.Maps))
	for _, m := range d.Maps {
		out = append(out, metrics.MapFill{Name: m.Name, Entries: m.Entries, MaxEntries: m.MaxEntries})
	}
	return out, nil
}

func (k kernelReader) Counters() (map[string]uint64, error) { return bpf.ReadCounters(k.pinDir) }

// Workload is one mesh workload in GET /workloads: every workload of the state, with
// whether this node runs it and whether it is enrolled here.
type Workload struct {
	Name      string   `json:"name"`
	Namespace string   `json:"namespace"`
	Node      string   `json:"node"`
	IPs       []string `json:"ips"`
	Identity  string   `json:"identity"`
	// Local: scheduled on this agent's node. Enrolled: captured by this agent now.
	Local       bool   `json:"local"`
	Enrolled    bool   `json:"enrolled"`
	NetnsCookie uint64 `json:"netns_cookie,omitempty"`
	// Error says why a local workload is not enrolled yet.
	Error string `json:"error,omitempty"`
}

// Workloads is what GET /workloads returns.
type Workloads struct {
	StateVersion uint64     `json:"state_version"`
	StateAge     string     `json:"state_age"`
	Workloads    []Workload `json:"workloads"`
}

// CertInfo describes one certificate in GET /certs.
type CertInfo struct {
	// Identity is the SPIFFE ID (workload certificates) or the subject (CAs).
	Identity  string    `json:"identity"`
	Serial    string    `json:"serial"`
	Issuer    string    `json:"issuer"`
	NotBefore time.Time `json:"not_before"`
	NotAfter  time.Time `json:"not_after"`
	// Error is set when the agent holds no usable certificate for the identity.
	Error string `json:"error,omitempty"`
}

// Certs is what GET /certs returns: the local workloads' certificates and the CAs
// the agent trusts.
type Certs struct {
	StateVersion uint64     `json:"state_version"`
	StateAge     string     `json:"state_age"`
	Workloads    []CertInfo `json:"workloads"`
	TrustBundle  []CertInfo `json:"trust_bundle"`
}

// AgentConfig is what GET /config returns: how the agent runs.
type AgentConfig struct {
	Node           string   `json:"node"`
	StatePath      string   `json:"state_path"`
	StateVersion   uint64   `json:"state_version"`
	StateAge       string   `json:"state_age"`
	TrustDomain    string   `json:"trust_domain"`
	AdminSocket    string   `json:"admin_socket"`
	ObserverSocket string   `json:"observer_socket,omitempty"`
	ObserverAddr   string   `json:"observer_addr,omitempty"`
	MetricsAddr    string   `json:"metrics_addr,omitempty"`
	FlowCapacity   int      `json:"flow_capacity"`
	PinDir         string   `json:"bpf_pin_dir"`
	Cgroup         string   `json:"cgroup"`
	Mark           uint32   `json:"mark"`
	FastPath       bool     `json:"fast_path"`
	MaxPods        int      `json:"max_pods"`
	ExcludedPorts  []uint32 `json:"excluded_ports"`
}

// stateAgeLocked is the version and age of the applied state; a.mu is held.
func (a *Agent) stateAgeLocked() (uint64, string) {
	if a.state == nil {
		return 0, "never"
	}
	return a.state.GetVersion(), time.Since(a.applied).Round(time.Millisecond).String()
}

func (s *adminServer) workloads(w http.ResponseWriter, _ *http.Request) {
	a := s.a
	a.mu.Lock()
	out := Workloads{}
	out.StateVersion, out.StateAge = a.stateAgeLocked()
	enrolled := map[string]uint64{}
	for uid, p := range a.enrolled {
		enrolled[uid] = p.cookie
	}
	for _, wl := range a.state.GetWorkloads() {
		cookie, ok := enrolled[wl.GetUid()]
		out.Workloads = append(out.Workloads, Workload{
			Name: wl.GetName(), Namespace: wl.GetNamespace(), Node: wl.GetNode(), IPs: wl.GetIps(), Identity: wl.GetIdentity(),
			Local: wl.GetNode() == a.cfg.Node, Enrolled: ok, NetnsCookie: cookie, Error: a.failing[wl.GetUid()],
		})
	}
	a.mu.Unlock()
	sort.Slice(out.Workloads, func(i, j int) bool {
		x, y := out.Workloads[i], out.Workloads[j]
		return x.Namespace+"/"+x.Name < y.Namespace+"/"+y.Name
	})
	writeJSON(w, out)
}

func (s *adminServer) certs(w http.ResponseWriter, _ *http.Request) {
	a := s.a
	a.mu.Lock()
	out := Certs{}
	out.StateVersion, out.StateAge = a.stateAgeLocked()
	ids := map[string]bool{}
	for _, wl := range a.state.GetWorkloads() {
		if wl.GetNode() == a.cfg.Node {
			ids[wl.GetIdentity()] = true
		}
	}
	bundle := a.state.GetTrustBundlePem()
	a.mu.Unlock()
	for id := range ids {
		ci := CertInfo{Identity: id}
		c, err := a.ids.Certificate(id)
		switch {
		case err != nil:
			ci.Error = err.Error()
		case c.Leaf == nil:
			ci.Error = "certificate not parsed"
		default:
			ci.Serial, ci.Issuer = c.Leaf.SerialNumber.Text(16), c.Leaf.Issuer.String()
			ci.NotBefore, ci.NotAfter = c.Leaf.NotBefore, c.Leaf.NotAfter
		}
		out.Workloads = append(out.Workloads, ci)
	}
	sort.Slice(out.Workloads, func(i, j int) bool { return out.Workloads[i].Identity < out.Workloads[j].Identity })
	for len(bundle) > 0 {
		var blk *pem.Block
		blk, bundle = pem.Decode(bundle)
		if blk == nil {
			break
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			out.TrustBundle = append(out.TrustBundle, CertInfo{Error: err.Error()})
			continue
		}
		out.TrustBundle = append(out.TrustBundle, CertInfo{Identity: c.Subject.String(), Serial: c.SerialNumber.Text(16),
			Issuer: c.Issuer.String(), NotBefore: c.NotBefore, NotAfter: c.NotAfter})
	}
	writeJSON(w, out)
}

func (s *adminServer) config(w http.ResponseWriter, _ *http.Request) {
	a := s.a
	a.mu.Lock()
	out := AgentConfig{
		Node: a.cfg.Node, StatePath: a.cfg.StatePath, TrustDomain: a.state.GetTrustDomain(), AdminSocket: a.cfg.AdminSocket,
		PinDir: a.cfg.Datapath.PinDir, Cgroup: a.cfg.Datapath.CgroupPath, Mark: a.cfg.Datapath.Mark,
		FastPath: a.cfg.Datapath.FastPath, MaxPods: a.cfg.Datapath.MaxPods, ExcludedPorts: a.state.GetMesh().GetExcludedPorts(),
	}
	out.StateVersion, out.StateAge = a.stateAgeLocked()
	a.mu.Unlock()
	if o := a.obs; o != nil {
		out.ObserverSocket, out.ObserverAddr, out.MetricsAddr = o.cfg.ObserverSocket, o.cfg.ObserverAddr, o.cfg.MetricsAddr
		out.FlowCapacity = o.ring.Status().Capacity
	}
	writeJSON(w, out)
}

// state serves the applied NodeState as protobuf JSON, without private keys.
func (s *adminServer) stateJSON(w http.ResponseWriter, _ *http.Request) {
	a := s.a
	a.mu.Lock()
	st := &ferryv1.NodeState{}
	if a.state != nil {
		st = proto.Clone(a.state).(*ferryv1.NodeState)
	}
	a.mu.Unlock()
	for _, c := range st.GetCertificates() {
		c.PrivateKeyPem = nil
	}
	b, err := protojson.MarshalOptions{Multiline: true}.Marshal(st)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Write(b)
}

// Workloads fetches the mesh workloads the agent knows and which it enrolled.
func (c *AdminClient) Workloads(ctx context.Context) (Workloads, error) {
	var v Workloads
	return v, c.get(ctx, "/workloads", &v)
}

// Certs fetches the local workloads' certificates and the trust bundle.
func (c *AdminClient) Certs(ctx context.Context) (Certs, error) {
	var v Certs
	return v, c.get(ctx, "/certs", &v)
}

// Config fetches how the agent runs.
func (c *AdminClient) Config(ctx context.Context) (AgentConfig, error) {
	var v AgentConfig
	return v, c.get(ctx, "/config", &v)
}

// State fetches the applied NodeState (protobuf JSON, no private keys).
func (c *AdminClient) State(ctx context.Context) ([]byte, error) {
	var raw json.RawMessage
	err := c.get(ctx, "/state", &raw)
	return raw, err
}
