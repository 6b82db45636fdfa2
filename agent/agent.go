// Package agent is Ferry's node agent: it loads the data path into the kernel,
// enrolls the node's mesh pods, and runs the node proxy that carries their traffic.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ferrymesh/ferry/agent/adminserver"
	"github.com/ferrymesh/ferry/agent/controlplane"
	"github.com/ferrymesh/ferry/agent/datapath"
	"github.com/ferrymesh/ferry/agent/identity"
	"github.com/ferrymesh/ferry/agent/netns"
	"github.com/ferrymesh/ferry/agent/observe"
	"github.com/ferrymesh/ferry/agent/proxy"
	"github.com/ferrymesh/ferry/api/ferryv1"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
)

// Config configures an Agent.
type Config struct {
	Node string
	// StatePath is a NodeState file (protobuf JSON) with certificates inside; set it
	// or Operator.
	StatePath string
	// Operator streams the state and signs certificates (host:port or unix:///path).
	Operator string
	// TokenFile is the bearer token for the operator; OperatorCA verifies it.
	TokenFile  string
	OperatorCA string
	// StateCache (operator mode) keeps the last state and the certificates with
	// their keys (mode 0600), so a restarted agent serves before the operator
	// answers; "" disables it.
	StateCache string
	// HealthAddr serves /healthz and /readyz (state applied at least once); "" disables.
	HealthAddr  string
	AdminSocket string // unix socket of the admin API; "" disables it
	Datapath    datapath.Config
	Observe     observe.Config // flows and metrics
	// Capture is how enrolled pods' traffic reaches the proxy: datapath.CaptureEBPF
	// (default) or datapath.CaptureIPTables (nat REDIRECT in each pod, for comparison).
	Capture string
}

// Agent is one node's agent.
type Agent struct {
	cfg   Config
	log   *slog.Logger
	dp    *datapath.Datapath
	ipt   *datapath.IPTablesCapture // nil unless capture is iptables
	ids   *identity.Store
	proxy *proxy.Proxy
	admin *adminserver.Server

	// Operator mode: the state stream, the certificate manager, and a nudge for
	// reconcile when a certificate arrives.
	conn   *grpc.ClientConn
	stream *controlplane.Stream
	certs  *controlplane.Certs
	kick   chan struct{}
	// cacheDirty says the state cache should be written again.
	cacheDirty atomic.Bool
	health     *http.Server
	obs        *observe.Observer

	mu       sync.Mutex
	state    *ferryv1.NodeState
	applied  time.Time
	want     map[string]proxy.Workload // this node's pods in the state, by UID
	enrolled map[string]enrolledPod    // by pod UID
	failing  map[string]string         // pods that could not be enrolled: last error

	cancel context.CancelFunc
	wg     sync.WaitGroup
}

type enrolledPod struct {
	w      proxy.Workload
	ns     *netns.Handle
	cookie uint64
}

// New validates cfg and allocates the agent's parts; nothing touches the kernel yet.
func New(cfg Config, log *slog.Logger) (*Agent, error) {
	if cfg.Node == "" {
		return nil, errors.New("agent config: node name is required")
	}
	if (cfg.StatePath == "") == (cfg.Operator == "") {
		return nil, errors.New("agent config: give either a state file or an operator address")
	}
	if cfg.Datapath.Mark == 0 {
		cfg.Datapath.Mark = datapath.DefaultMark
	}
	dp, err := datapath.New(cfg.Datapath, log)
	if err != nil {
		return nil, err
	}
	a := &Agent{cfg: cfg, log: log, dp: dp, ids: identity.NewStore(), enrolled: map[string]enrolledPod{}, failing: map[string]string{}, kick: make(chan struct{}, 1)}
	if cfg.Operator != "" {
		a.conn, err = controlplane.Dial(controlplane.DialConfig{Addr: cfg.Operator, CAFile: cfg.OperatorCA, TokenFile: cfg.TokenFile})
		if err != nil {
			return nil, err
		}
		a.stream = controlplane.NewStream(a.conn, cfg.Node, a.applyStream, log)
		a.certs = controlplane.NewCerts(a.conn, a.ids, func() {
			a.cacheDirty.Store(true)
			a.nudge()
		}, log)
	}
	a.obs = observe.New(cfg.Observe.Beside(cfg.AdminSocket), cfg.Node, observe.Sources{
		LiveConns: func() int {
			if a.proxy == nil {
				return 0
			}
			live, _ := a.proxy.Connections()
			return len(live)
		},
		PinDir: cfg.Datapath.PinDir,
	}, log)
	switch cfg.Capture {
	case "", datapath.CaptureEBPF:
	case datapath.CaptureIPTables:
		a.ipt = &datapath.IPTablesCapture{
			Mark: cfg.Datapath.Mark, OutboundPort: proxy.OutboundPort, InboundPort: proxy.InboundPort,
			SkipPorts: []uint16{proxy.OutboundPort, proxy.InboundPort, proxy.TunnelPort},
		}
	default:
		return nil, fmt.Errorf("agent config: capture %q: want %s or %s", cfg.Capture, datapath.CaptureEBPF, datapath.CaptureIPTables)
	}
	a.proxy, err = proxy.New(proxy.Config{
		Node: cfg.Node,
		Mark: cfg.Datapath.Mark,
		// The fast path keys on eBPF enrollment, which iptables-captured pods lack:
		// their sockets never enter the sockhash, so splice stays safe for them.
		FastPath:   cfg.Datapath.FastPath && a.ipt == nil,
		IPTables:   a.ipt != nil,
		Datapath:   dp,
		Identities: a.ids,
		Log:        log,
		Observer:   a.obs,
	})
	if err != nil {
		return nil, err
	}
	if cfg.AdminSocket != "" {
		a.admin, err = adminserver.New(adminserver.Config{Socket: cfg.AdminSocket, Metrics: a.obs.Handler()}, adminSource{a}, log)
		if err != nil {
			return nil, err
		}
	}
	return a, nil
}

// Start loads the data path (adopting what a previous run pinned), applies the
// state file, and serves until Stop.
func (a *Agent) Start(ctx context.Context) error {
	if a.cfg.Operator != "" {
		return a.startOperator()
	}
	st, err := ReadStateFile(a.cfg.StatePath)
	if err != nil {
		return err
	}
	if err := a.dp.Start(ctx); err != nil {
		return fmt.Errorf("datapath: %w", err)
	}
	if err := a.Apply(st); err != nil {
		a.dp.Close()
		return err
	}
	if err := a.removeStale(); err != nil {
		a.log.Warn("stale enrollments", "error", err)
	}
	ctx, a.cancel = context.WithCancel(context.Background())
	watch := func(ctx context.Context) { a.watchFile(ctx, a.cfg.StatePath, 500*time.Millisecond) }
	a.goRun(ctx, watch, a.reconcileLoop)
	if err := a.startServers(); err != nil {
		a.Stop()
		return err
	}
	a.log.Info("agent ready", "version", st.GetVersion(), "pods", len(a.enrolled))
	return nil
}

// startOperator starts the agent in operator mode: the data path keeps what a
// previous run pinned, and pods are enrolled as the state and their certificates
// arrive.
func (a *Agent) startOperator() error {
	if err := a.dp.Start(context.Background()); err != nil {
		return fmt.Errorf("datapath: %w", err)
	}
	a.loadCache()
	var ctx context.Context
	ctx, a.cancel = context.WithCancel(context.Background())
	a.goRun(ctx, a.stream.Run, a.certs.Run, a.reconcileLoop)
	if err := a.startServers(); err != nil {
		a.Stop()
		return err
	}
	a.log.Info("agent started; waiting for the operator's state", "operator", a.cfg.Operator)
	return nil
}

// startServers starts the admin API, observability and the health endpoints.
func (a *Agent) startServers() error {
	if a.admin != nil {
		if err := a.admin.Start(context.Background()); err != nil {
			return err
		}
	}
	if err := a.obs.Start(context.Background()); err != nil {
		return err
	}
	if a.cfg.HealthAddr == "" {
		return nil
	}
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	l, err := lc.Listen(context.Background(), "tcp", a.cfg.HealthAddr)
	if err != nil {
		return fmt.Errorf("health listener: %w", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		a.mu.Lock()
		applied := a.state != nil
		a.mu.Unlock()
		if !applied {
			http.Error(w, "no state applied yet", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	a.health = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		_ = a.health.Serve(l)
	}()
	return nil
}

// goRun runs each loop on a goroutine the agent owns until ctx ends; Stop waits.
func (a *Agent) goRun(ctx context.Context, loops ...func(context.Context)) {
	for _, f := range loops {
		a.wg.Add(1)
		go func() {
			defer a.wg.Done()
			f(ctx)
		}()
	}
}

// nudge asks reconcileLoop to run now (a certificate arrived).
func (a *Agent) nudge() {
	select {
	case a.kick <- struct{}{}:
	default:
	}
}

// reconcileLoop retries pods that could not be enrolled yet, at once when nudged.
func (a *Agent) reconcileLoop(ctx context.Context) {
	t := time.NewTicker(500 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-a.kick:
		}
		a.reconcile()
		if a.cacheDirty.Swap(false) {
			if err := a.writeCache(); err != nil {
				a.log.Warn("state cache", "path", a.cfg.StateCache, "error", err)
			}
		}
	}
}

// loadCache applies the state and certificates a previous run kept, so that pods
// are served at once even when the operator is not reachable; the operator's first
// state replaces it.
func (a *Agent) loadCache() {
	if a.cfg.StateCache == "" {
		return
	}
	b, err := os.ReadFile(a.cfg.StateCache)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			a.log.Warn("state cache", "path", a.cfg.StateCache, "error", err)
		}
		return
	}
	st := &ferryv1.NodeState{}
	if err := proto.Unmarshal(b, st); err != nil || st.GetNode() != a.cfg.Node {
		a.log.Warn("state cache unusable; waiting for the operator", "path", a.cfg.StateCache, "error", err, "cached_node", st.GetNode())
		return
	}
	n := a.certs.Preload(st.GetCertificates())
	st.Certificates = nil
	if err := a.applyStream(st, true); err != nil {
		a.log.Warn("state cache not applied; waiting for the operator", "error", err)
		return
	}
	a.log.Info("serving the cached state until the operator answers", "version", st.GetVersion(), "certificates", n)
}

// writeCache saves the applied state and the held certificates (keys included,
// hence 0600) for the next start.
func (a *Agent) writeCache() error {
	if a.cfg.StateCache == "" {
		return nil
	}
	a.mu.Lock()
	if a.state == nil {
		a.mu.Unlock()
		return nil
	}
	st := proto.Clone(a.state).(*ferryv1.NodeState)
	a.mu.Unlock()
	st.Certificates = a.certs.Export()
	b, err := proto.Marshal(st)
	if err != nil {
		return err
	}
	tmp := a.cfg.StateCache + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, a.cfg.StateCache)
}

// Stop closes the pods' listeners, waits for proxied connections to end and
// releases the data path. The kernel state stays pinned: capture keeps working for
// the next agent, which adopts it.
func (a *Agent) Stop() error {
	if a.cancel != nil {
		a.cancel()
	}
	if a.health != nil {
		a.health.Close()
	}
	a.wg.Wait()
	if a.conn != nil {
		a.conn.Close()
	}
	stopCtx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if a.admin != nil {
		a.admin.Stop(stopCtx)
	}
	a.obs.Stop(stopCtx)
	a.proxy.Stop()
	a.mu.Lock()
	for _, p := range a.enrolled {
		if a.ipt != nil { // iptables capture ends with the agent; eBPF capture stays pinned
			if err := a.ipt.Remove(p.ns); err != nil {
				a.log.Warn("remove iptables capture", "pod", p.w.Name, "error", err)
			}
		}
		p.ns.Close()
	}
	a.enrolled = map[string]enrolledPod{}
	a.mu.Unlock()
	return a.dp.Close()
}

// Apply makes the node match st: identities, the mesh directory, and which local
// pods are enrolled. A state for another node, an older version or with invalid
// entries is refused whole, leaving the current state in place.
func (a *Agent) Apply(st *ferryv1.NodeState) error {
	return a.apply(st, false)
}

// applyStream applies a state from the operator; the first state of a new stream
// replaces the current one whatever its version.
func (a *Agent) applyStream(st *ferryv1.NodeState, fresh bool) error {
	a.mu.Lock()
	first := a.state == nil
	a.mu.Unlock()
	if err := a.apply(st, fresh); err != nil {
		return err
	}
	a.cacheDirty.Store(true)
	if first {
		// Only now is it known which pinned enrollments are still wanted.
		if err := a.removeStale(); err != nil {
			a.log.Warn("stale enrollments", "error", err)
		}
	}
	return nil
}

func (a *Agent) apply(st *ferryv1.NodeState, anyVersion bool) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if st.GetNode() != a.cfg.Node {
		return fmt.Errorf("state is for node %q, this agent is node %q", st.GetNode(), a.cfg.Node)
	}
	if a.state != nil && !anyVersion && st.GetVersion() < a.state.GetVersion() {
		return fmt.Errorf("state version %d is older than the applied %d", st.GetVersion(), a.state.GetVersion())
	}
	ws, err := workloads(st)
	if err != nil {
		return fmt.Errorf("state version %d: %w", st.GetVersion(), err)
	}
	want := map[string]proxy.Workload{}
	var ids []string
	for _, w := range ws {
		if w.Node == a.cfg.Node {
			want[w.UID] = w
			ids = append(ids, w.Identity)
		}
	}
	if a.certs != nil {
		// Operator mode: the state carries no keys; the manager gets certificates
		// for the identities of this node's pods and fills the store.
		if err := a.certs.Want(st.GetTrustBundlePem(), ids); err != nil {
			return fmt.Errorf("state version %d identities: %w", st.GetVersion(), err)
		}
	} else {
		certs := map[string]identity.CertPEM{}
		for _, c := range st.GetCertificates() {
			certs[c.GetIdentity()] = identity.CertPEM{Chain: c.GetCertChainPem(), Key: c.GetPrivateKeyPem()}
		}
		if err := a.ids.Update(st.GetTrustBundlePem(), certs); err != nil {
			return fmt.Errorf("state version %d identities: %w", st.GetVersion(), err)
		}
	}
	a.proxy.SetMesh(ws)
	a.obs.SetState(st) // flows and metrics name the destination's service
	a.want = want
	a.state, a.applied = st, time.Now()
	a.reconcileLocked()
	return nil
}

// reconcile enrolls the wanted pods that are not enrolled yet; a pod whose network
// namespace is not there yet (the CNI has not run) is tried again on the next tick.
func (a *Agent) reconcile() {
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.enrolled) != len(a.want) {
		a.reconcileLocked()
	}
}

// reconcileLocked makes the enrolled pods match a.want. Pods whose entry did not
// change are not touched, so their connections carry on.
func (a *Agent) reconcileLocked() {
	for uid, p := range a.enrolled {
		if w, ok := a.want[uid]; !ok || !sameWorkload(w, p.w) {
			a.unenroll(p)
			delete(a.enrolled, uid)
		}
	}
	for uid, w := range a.want {
		if _, ok := a.enrolled[uid]; ok {
			continue
		}
		p, err := a.enroll(w)
		if err != nil {
			if a.failing[uid] != err.Error() { // say it once, not every tick
				a.log.Warn("pod not enrolled yet; will retry", "pod", w.Name, "error", err)
			}
			a.failing[uid] = err.Error()
			continue
		}
		delete(a.failing, uid)
		a.enrolled[uid] = p
	}
}

func (a *Agent) enroll(w proxy.Workload) (enrolledPod, error) {
	if _, err := a.ids.Certificate(w.Identity); err != nil {
		return enrolledPod{}, fmt.Errorf("pod %s: %w", w.Name, err)
	}
	ns, err := netns.FindByIP(w.IPs[0])
	if err != nil {
		return enrolledPod{}, fmt.Errorf("pod %s: %w", w.Name, err)
	}
	cookie, err := a.capture(ns, w.Name)
	if err != nil {
		ns.Close()
		return enrolledPod{}, fmt.Errorf("pod %s: enroll: %w", w.Name, err)
	}
	if err := a.proxy.AddPod(w, ns, cookie); err != nil {
		a.release(ns, cookie)
		ns.Close()
		return enrolledPod{}, err
	}
	a.log.Info("pod enrolled", "pod", w.Name, "netns_cookie", cookie, "identity", w.Identity)
	return enrolledPod{w: w, ns: ns, cookie: cookie}, nil
}

// capture starts capturing the pod in ns and returns its netns cookie.
func (a *Agent) capture(ns *netns.Handle, pod string) (uint64, error) {
	if a.ipt == nil {
		return a.dp.Enroll(ns, pod)
	}
	cookie, err := ns.Cookie()
	if err != nil {
		return 0, err
	}
	return cookie, a.ipt.Install(ns)
}

// release undoes capture.
func (a *Agent) release(ns *netns.Handle, cookie uint64) error {
	if a.ipt == nil {
		return a.dp.Unenroll(cookie)
	}
	return a.ipt.Remove(ns)
}

func (a *Agent) unenroll(p enrolledPod) {
	if err := a.release(p.ns, p.cookie); err != nil {
		a.log.Warn("unenroll", "pod", p.w.Name, "error", err)
	}
	a.proxy.RemovePod(p.w.UID)
	p.ns.Close()
	a.log.Info("pod unenrolled", "pod", p.w.Name)
}

// removeStale drops enrollments a previous run pinned for pods that are gone.
func (a *Agent) removeStale() error {
	pinned, err := a.dp.Enrolled()
	if err != nil {
		return err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	keep := map[uint64]bool{}
	for _, p := range a.enrolled {
		if a.ipt == nil { // under iptables capture no pod keeps an eBPF enrollment
			keep[p.cookie] = true
		}
	}
	var errs []error
	for cookie, pod := range pinned {
		if !keep[cookie] {
			a.log.Info("removing stale enrollment", "pod", pod, "netns_cookie", cookie)
			errs = append(errs, a.dp.Unenroll(cookie))
		}
	}
	return errors.Join(errs...)
}

func sameWorkload(a, b proxy.Workload) bool {
	if a.Identity != b.Identity || a.Name != b.Name || len(a.IPs) != len(b.IPs) {
		return false
	}
	for i := range a.IPs {
		if a.IPs[i] != b.IPs[i] {
			return false
		}
	}
	return true
}
