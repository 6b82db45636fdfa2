// Package agent is Ferry's node agent: it loads the data path into the kernel,
// enrolls the node's mesh pods, and runs the node proxy that carries their traffic.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ferrymesh/ferry/agent/adminserver"
	"github.com/ferrymesh/ferry/agent/controlplane"
	"github.com/ferrymesh/ferry/agent/datapath"
	"github.com/ferrymesh/ferry/agent/handoff"
	"github.com/ferrymesh/ferry/agent/identity"
	"github.com/ferrymesh/ferry/agent/netns"
	"github.com/ferrymesh/ferry/agent/observe"
	"github.com/ferrymesh/ferry/agent/proxy"
	"github.com/ferrymesh/ferry/agent/tracing"
	"github.com/ferrymesh/ferry/api/ferryv1"
	"github.com/ferrymesh/ferry/api/mesh"
	"github.com/ferrymesh/ferry/bpf"
	"github.com/ferrymesh/ferry/internal/atomicfile"
	"github.com/ferrymesh/ferry/internal/healthserver"
	"github.com/ferrymesh/ferry/internal/listener"
	"github.com/spf13/pflag"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
)

// Config configures an Agent. DefaultConfig has the defaults ferry-agent runs with
// and Flags registers them; a zero field means "off" where it names a server or file.
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
	// LockFile is the agent's lock in its state folder (pid inside): while one agent
	// holds it, another for the node exits before touching anything. "" means
	// agent.lock beside AdminSocket, or beside StateCache without one; the pin folder
	// is locked too whatever this says (Capture.Lock).
	LockFile string
	// NoHandoff: neither hand the listeners over to a new agent nor take them
	// from a running one (which this agent then leaves as it was, and exits).
	NoHandoff bool
	// HandoffWait is how long an agent told to stop waits for a new agent to take
	// its listeners over before it closes them, for a supervisor that signals the
	// old agent before it starts the new one; 0 (the default) stops at once.
	HandoffWait time.Duration
	// DrainGrace bounds how long an agent that handed its listeners over keeps
	// carrying the connections it has, before it exits.
	DrainGrace time.Duration
	// Datapath configures the eBPF data path, loaded in both capture modes; its mark
	// and mesh ports are also the proxy's.
	Datapath datapath.Config
	Observe  observe.Config // flows and metrics
	Tracing  tracing.Config // the proxies' spans, exported over OTLP
	// Capture is how enrolled pods' traffic reaches the proxy: datapath.CaptureEBPF
	// ("" too) or datapath.CaptureIPTables (nat REDIRECT in each pod, for comparison).
	Capture string
	// Budgets bound what each pod may hold of the node proxy.
	Budgets proxy.Budgets
}

// DefaultConfig is the configuration ferry-agent starts from: the node name from
// $NODE_NAME, the paths of the DaemonSet in deploy/, eBPF capture.
func DefaultConfig() Config {
	return Config{
		Node:        os.Getenv("NODE_NAME"),
		TokenFile:   "/var/run/secrets/ferry/token",
		OperatorCA:  "/etc/ferry/ca/ca.crt",
		StateCache:  "/run/ferry/state.cache",
		HealthAddr:  ":15021",
		AdminSocket: "/run/ferry/agent.sock",
		Datapath:    datapath.DefaultConfig(),
		Observe:     observe.DefaultConfig(),
		Tracing:     tracing.DefaultConfig(),
		Capture:     datapath.CaptureEBPF,
		Budgets:     proxy.DefaultBudgets(),
		DrainGrace:  5 * time.Minute,
	}
}

// Flags registers the agent's flags on fs, the data path's among them, with c's
// values as their defaults.
func (c *Config) Flags(fs *pflag.FlagSet) {
	fs.StringVar(&c.Node, "node", c.Node, "name of this node (default $NODE_NAME)")
	fs.StringVar(&c.StatePath, "state", c.StatePath, "node state file (protobuf JSON NodeState), instead of --operator")
	fs.StringVar(&c.Operator, "operator", c.Operator, "operator address for the state stream and certificates (host:port or unix:///path)")
	fs.StringVar(&c.TokenFile, "token-file", c.TokenFile, "bearer token for the operator (projected service-account token, audience ferry-operator)")
	fs.StringVar(&c.OperatorCA, "operator-ca", c.OperatorCA, "PEM bundle that verifies the operator's serving certificate (ConfigMap ferry-ca-bundle)")
	fs.StringVar(&c.StateCache, "state-cache", c.StateCache, "with --operator: file keeping the last state and certificates (0600) so a restarted agent serves before the operator answers (\"\" disables)")
	fs.StringVar(&c.HealthAddr, "health-addr", c.HealthAddr, "address of /healthz and /readyz (ready once a state is applied; \"\" disables)")
	fs.StringVar(&c.AdminSocket, "admin-socket", c.AdminSocket, "unix socket for the admin API (\"\" disables it)")
	fs.StringVar(&c.LockFile, "lock-file", c.LockFile, "lock held while the agent runs, so a second agent for the node exits before touching anything (default: agent.lock beside --admin-socket, else beside --state-cache)")
	fs.BoolVar(&c.NoHandoff, "no-handoff", c.NoHandoff, "neither hand the listeners over to a new agent nor take them from a running one (which this agent then leaves as it was, and exits)")
	fs.DurationVar(&c.HandoffWait, "handoff-wait", c.HandoffWait, "when told to stop, how long to wait for a new agent to take the listeners over before closing them, for a supervisor that signals before it starts the new agent (0: stop at once)")
	fs.DurationVar(&c.DrainGrace, "drain-grace", c.DrainGrace, "after handing the listeners to a new agent, how long to keep carrying the established connections before exiting")
	c.Datapath.Flags(fs)
	fs.StringVar(&c.Capture, "capture", c.Capture, "how pod traffic is captured: ebpf, or iptables (nat REDIRECT, to compare)")
	c.Observe.Flags(fs)
	c.Tracing.Flags(fs)
	c.Budgets.Flags(fs)
}

// Capture is how enrolled pods' traffic reaches the proxy: the eBPF data path
// (datapath.Datapath) or iptables rules (datapath.IPTables), chosen once in New.
type Capture interface {
	Start(ctx context.Context) error
	Stop(ctx context.Context) error
	// Lock takes the node's lock on the pins (among an agent's first steps, before
	// Start) and Unlock releases it (among its last, after Stop): while one agent
	// holds it, another fails before it touches anything.
	Lock() error
	Unlock() error
	// Enroll starts capturing the pod whose namespace is ns and returns the
	// namespace's cookie, and whether the pod was captured already (adopted from a
	// previous run): a later failure must not release what this agent did not add.
	Enroll(ns *netns.Handle, pod string) (cookie uint64, adopted bool, err error)
	// Release stops capturing a pod that left or changed.
	Release(ns *netns.Handle, cookie uint64) error
	// Leave is called for each enrolled pod when the agent stops; a capture that
	// outlives the agent (pinned eBPF) keeps the pod captured.
	Leave(ns *netns.Handle, cookie uint64) error
	// Prune releases what a previous run enrolled for namespaces not in keep.
	Prune(keep map[uint64]bool) error
	// SetStrictPorts replaces the mTLS modes enforced in the kernel for this
	// node's pods; an error means they could not all be enforced (the state is
	// refused, the modes in force stay).
	SetStrictPorts(ps []bpf.StrictPort) error
	// The proxy's own view of the capture.
	proxy.Capture
}

// podServer is the proxy as enrollment uses it.
type podServer interface {
	SetMesh(ws []proxy.Workload)
	SetServices(svcs []proxy.Service)
	SetAuthorization(ps []proxy.AuthzPolicy)
	SetPathOptions(o proxy.PathOptions)
	AddPod(w proxy.Workload, ns proxy.Netns, cookie uint64) error
	RemovePod(uid string)
}

// lockPath is where the agent's state-folder lock lives: LockFile, else agent.lock in
// the folder of the admin socket or of the state cache; "" when the agent has no
// state folder (the pin folder's lock still keeps a second agent out).
func (c Config) lockPath() string {
	switch {
	case c.LockFile != "":
		return c.LockFile
	case c.AdminSocket != "":
		return filepath.Join(filepath.Dir(c.AdminSocket), "agent.lock")
	case c.Operator != "" && c.StateCache != "":
		return filepath.Join(filepath.Dir(c.StateCache), "agent.lock")
	}
	return ""
}

// component is one part of the agent with a lifetime: Start starts its goroutines
// and I/O, Stop ends them and waits.
type component interface {
	Start(ctx context.Context) error
	Stop(ctx context.Context) error
}

// part is a component with a name, for errors and logs.
type part struct {
	name string
	c    component
}

// Agent is one node's agent.
type Agent struct {
	cfg     Config
	log     *slog.Logger
	capture Capture
	// findNetns finds a pod's network namespace by IP (netns.FindByIP).
	findNetns func(netip.Addr) (*netns.Handle, error)
	ids       *identity.Store
	proxy     *proxy.Proxy
	pods      podServer // the proxy, as enrollment uses it
	admin     *adminserver.Server

	// Operator mode: the state stream, the certificate manager, and a nudge for
	// reconcile when a certificate arrives.
	conn   *grpc.ClientConn
	stream *controlplane.Stream
	certs  *controlplane.Certs
	kick   chan struct{}
	// cacheDirty says the state cache should be written again.
	cacheDirty atomic.Bool
	obs        *observe.Observer
	tracer     *tracing.Tracer

	// parts are started in order and stopped in reverse; started are those that
	// Start has started and Stop has yet to stop.
	parts   []part
	started []part

	// The listener handoff: lock is the lock part, takeover takes over from a
	// running agent and hands over to the next one through handoffSrv (nil
	// without a state folder or with NoHandoff); handedOver is set once a new
	// agent has taken this one's listeners.
	lock       *nodeLock
	takeover   *takeover
	handoffSrv *handoff.Server
	handedOver atomic.Bool

	// fileState is the state file as read before the capture starts, so that one
	// the agent cannot use fails the start before anything changes; applied after.
	fileState *ferryv1.NodeState

	mu       sync.Mutex
	state    *ferryv1.NodeState
	applied  time.Time
	want     map[string]proxy.Workload // this node's pods in the state, by UID
	enrolled map[string]enrolledPod    // by pod UID
	failing  map[string]string         // pods that could not be enrolled: last error
	dropped  []*DroppedEntry           // entries of the applied state left out (state.go)
	// held are the netns cookies of wanted pods not served yet (no certificate, a
	// listener that would not open), by UID: their capture stays, so their traffic
	// is refused rather than sent in plaintext, and stale pruning keeps it.
	held map[string]uint64
	// aborting is set while a failed Start stops what it started: the pods this run
	// enrolled are released again, leaving the kernel as it was found.
	aborting bool
}

type enrolledPod struct {
	w      proxy.Workload
	ns     *netns.Handle
	cookie uint64
	// adopted: the pod was captured when this agent came (a previous run's pins).
	adopted bool
}

// New validates cfg and allocates the agent's parts; nothing touches the kernel yet.
// The capture mode is chosen here, once.
func New(cfg Config, log *slog.Logger) (*Agent, error) {
	dp, err := datapath.New(cfg.Datapath, log)
	if err != nil {
		return nil, err
	}
	cfg.Datapath = dp.Config() // the defaults it filled in, for the proxy and the admin API
	var capture Capture
	switch cfg.Capture {
	case "", datapath.CaptureEBPF:
		capture = dp
	case datapath.CaptureIPTables:
		capture = datapath.NewIPTables(dp)
	default:
		return nil, fmt.Errorf("agent config: capture %q: want %s or %s", cfg.Capture, datapath.CaptureEBPF, datapath.CaptureIPTables)
	}
	return newAgent(cfg, log, capture, netns.FindByIP)
}

// newAgent builds the agent around a capture and a way to find pods' namespaces,
// which tests replace with fakes.
func newAgent(cfg Config, log *slog.Logger, capture Capture, findNetns func(netip.Addr) (*netns.Handle, error)) (*Agent, error) {
	if cfg.Node == "" {
		return nil, errors.New("agent config: node name is required")
	}
	if (cfg.StatePath == "") == (cfg.Operator == "") {
		return nil, errors.New("agent config: give either a state file or an operator address")
	}
	a := &Agent{cfg: cfg, log: log, capture: capture, findNetns: findNetns, ids: identity.NewStore(),
		enrolled: map[string]enrolledPod{}, failing: map[string]string{}, held: map[string]uint64{}, kick: make(chan struct{}, 1)}
	a.takeover = &takeover{a: a, inherited: listener.NewInherited(), handed: make(chan struct{})}
	var err error
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
		Certificates: func() map[string]time.Time {
			if a.certs == nil {
				return nil
			}
			held := map[string]time.Time{}
			for _, c := range a.certs.Held() {
				held[c.Identity] = c.NotAfter
			}
			return held
		},
	}, log)
	if a.tracer, err = tracing.New(cfg.Tracing, cfg.Node, log); err != nil {
		return nil, err
	}
	a.proxy, err = proxy.New(proxy.Config{
		Node:       cfg.Node,
		Mark:       cfg.Datapath.Mark,
		Ports:      cfg.Datapath.Ports,
		Capture:    capture,
		Identities: a.ids,
		Log:        log,
		Observer:   a.obs,
		Tracer:     a.tracer,
		Budgets:    cfg.Budgets,
	})
	if err != nil {
		return nil, err
	}
	a.pods = a.proxy
	if cfg.AdminSocket != "" {
		a.admin, err = adminserver.New(adminserver.Config{Socket: cfg.AdminSocket, Metrics: a.obs.Handler()}, adminSource{a}, log)
		if err != nil {
			return nil, err
		}
	}

	// The order is what each part needs, and fail-closed: first the locks, so that
	// a second agent for the node stops before it changes anything; then the steps
	// that can fail for reasons of their own (a TCP address in use, a bad state
	// file) before the capture adopts the pins and enrolls pods, so that a failed
	// start leaves the kernel as it found it. The enrolled pods' namespaces outlive
	// the proxy that dials in them; the state arrives once the proxy can take pods.
	// The admin API comes last: its /status answering says the agent has started
	// (the lab and the tests wait for it), and a unix socket it opens after
	// removing a stale one cannot be in use.
	// The lock is also where a handoff starts: a new agent that finds it held asks
	// the holder for its locks and listeners (handoff.go), and every step below
	// then takes the inherited listener of its address instead of binding one.
	if p := cfg.lockPath(); p != "" {
		a.lock = &nodeLock{path: p, log: log, t: a.takeover}
		a.parts = append(a.parts, part{"lock", a.lock})
		if !cfg.NoHandoff {
			a.handoffSrv, err = handoff.NewServer(handoff.ServerConfig{
				Path: cfg.handoffPath(), Node: cfg.Node, Offer: a.takeover.offer, Handed: a.takeover.handedOff, Log: log,
			})
			if err != nil {
				return nil, err
			}
		}
	}
	// The pins' lock too, in case two agents' state folders differ.
	a.parts = append(a.parts, part{"pin lock", hooks{
		start: func(context.Context) error { return capture.Lock() },
		stop:  func(context.Context) error { return capture.Unlock() },
	}})
	// Tracing outlives the proxy, so the spans of the requests it drains are sent.
	a.parts = append(a.parts, part{"tracing", a.tracer})
	if cfg.HealthAddr != "" {
		a.parts = append(a.parts, part{"health", healthserver.New(cfg.HealthAddr, healthserver.Routes{Ready: a.ready}, log)})
	}
	a.parts = append(a.parts, part{"observability", a.obs})
	if cfg.Operator == "" {
		a.parts = append(a.parts, part{"state file", hooks{start: a.readFile}})
	}
	a.parts = append(a.parts,
		part{"capture", capture},
		part{"strict drops", observe.NewStrictDrops(cfg.Datapath.PinDir, a.obs, log)},
		part{"enrollments", hooks{stop: a.leavePods}},
		part{"proxy", a.proxy},
	)
	if cfg.Operator != "" {
		a.parts = append(a.parts,
			part{"state cache", hooks{start: a.loadCache}},
			part{"state stream", &loop{run: a.stream.Run}},
			part{"certificates", &loop{run: a.certs.Run}},
		)
	} else {
		a.parts = append(a.parts,
			part{"state", hooks{start: a.applyFile}},
			part{"state file watch", &loop{run: func(ctx context.Context) { a.watchFile(ctx, cfg.StatePath, 500*time.Millisecond) }}},
		)
	}
	a.parts = append(a.parts, part{"reconcile", &loop{run: a.reconcileLoop}})
	if a.handoffSrv != nil {
		// Once everything serves: tell the agent this one took over from, then
		// offer the same to the next. Before the admin API, whose answering says
		// the agent has started, and after a handoff, that it has taken over.
		a.parts = append(a.parts, part{"handoff", a.takeover})
	}
	if a.admin != nil {
		a.parts = append(a.parts, part{"admin API", a.admin})
	}
	return a, nil
}

// Start starts the agent's parts in order: the locks, the health and observer
// listeners, the capture (adopting what a previous run pinned), the proxy, the state
// (file or operator) and the admin API. If one fails, the ones started are stopped
// again and the pods this run enrolled are released; what it adopted stays as it
// was. The parts' goroutines live until ctx ends or Stop.
func (a *Agent) Start(ctx context.Context) error {
	if len(a.started) != 0 {
		return errors.New("agent already started")
	}
	// Every listener a part opens is first looked for among those a running agent
	// handed over (none unless the lock part took over from one).
	ctx = listener.WithInherited(ctx, a.takeover.inherited)
	for _, p := range a.parts {
		if err := p.c.Start(ctx); err != nil {
			err = fmt.Errorf("start %s: %w", p.name, err)
			if errors.Is(err, datapath.ErrLocked) {
				// The lock file or the pin folder's: either comes before this agent
				// has touched the running one's pins, pods, sockets or files.
				err = fmt.Errorf("%w; this agent exits leaving the running one as it was", err)
			}
			a.mu.Lock()
			a.aborting = true
			a.mu.Unlock()
			err = errors.Join(err, a.Stop(ctx))
			a.mu.Lock()
			a.aborting = false
			a.mu.Unlock()
			// Listeners taken over but not served: the running agent, not told we
			// serve, still holds and accepts on them, and carries on.
			a.takeover.abort()
			return err
		}
		a.started = append(a.started, p)
	}
	a.mu.Lock()
	n := len(a.enrolled)
	a.mu.Unlock()
	if a.cfg.Operator != "" {
		a.log.Info("agent started; waiting for the operator's state", "operator", a.cfg.Operator, "pods", n)
	} else {
		a.log.Info("agent ready", "version", a.stateVersion(), "pods", n)
	}
	return nil
}

// Stop stops the started parts in reverse order: the admin API, the state, the proxy
// (which waits for proxied connections to end), the pods' namespaces, the capture,
// the health and observer listeners and last the locks. eBPF capture stays pinned,
// so it keeps working for the next agent, which adopts it once the locks are free.
func (a *Agent) Stop(ctx context.Context) error {
	var errs []error
	for i := len(a.started) - 1; i >= 0; i-- {
		p := a.started[i]
		if err := p.c.Stop(ctx); err != nil {
			errs = append(errs, fmt.Errorf("stop %s: %w", p.name, err))
		}
	}
	a.started = nil
	if a.conn != nil {
		a.conn.Close()
		a.conn = nil
	}
	return errors.Join(errs...)
}

// readFile reads the state file and checks it can be applied, before the capture
// starts: a missing, malformed or other node's state fails the start having changed
// nothing.
func (a *Agent) readFile(context.Context) error {
	st, err := ReadStateFile(a.cfg.StatePath)
	if err != nil {
		return err
	}
	if st.GetNode() != a.cfg.Node {
		return fmt.Errorf("state is for node %q, this agent is node %q", st.GetNode(), a.cfg.Node)
	}
	// Bad workload and Service entries are left out when the state applies.
	if _, err := authorization(st); err != nil {
		return fmt.Errorf("state version %d: %w", st.GetVersion(), err)
	}
	a.fileState = st
	return nil
}

// applyFile applies the state file read by readFile and drops what a previous run
// enrolled for pods no longer in it.
func (a *Agent) applyFile(context.Context) error {
	st := a.fileState
	a.fileState = nil
	if err := a.Apply(st); err != nil {
		return err
	}
	if err := a.removeStale(); err != nil {
		a.log.Warn("stale enrollments", "error", err)
	}
	return nil
}

// leavePods lets go of every enrolled pod as the agent stops: the capture decides
// what stays (Capture.Leave), and the namespace handles are closed. After a failed
// start, the pods this run enrolled itself are released instead: an agent that
// did not start leaves the kernel as it found it, adopted pods still captured.
func (a *Agent) leavePods(context.Context) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, p := range a.enrolled {
		if a.handedOver.Load() {
			// The new agent serves the pod now: its capture is the new one's.
		} else if a.aborting && !p.adopted {
			a.log.Info("start failed: releasing a pod this run enrolled", "pod", p.w.Name)
			if err := a.capture.Release(p.ns, p.cookie); err != nil {
				a.log.Warn("release capture", "pod", p.w.Name, "error", err)
			}
		} else if err := a.capture.Leave(p.ns, p.cookie); err != nil {
			a.log.Warn("leave capture", "pod", p.w.Name, "error", err)
		}
		p.ns.Close()
	}
	a.enrolled = map[string]enrolledPod{}
	a.held = map[string]uint64{}
	return nil
}

func (a *Agent) stateVersion() uint64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.state.GetVersion()
}

// ready says whether a state has been applied (/readyz).
func (a *Agent) ready() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.state == nil {
		return errors.New("no state applied yet")
	}
	return nil
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
func (a *Agent) loadCache(context.Context) error {
	if a.cfg.StateCache == "" {
		return nil
	}
	b, err := os.ReadFile(a.cfg.StateCache)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			a.log.Warn("state cache", "path", a.cfg.StateCache, "error", err)
		}
		return nil
	}
	st := &ferryv1.NodeState{}
	if err := proto.Unmarshal(b, st); err != nil || st.GetNode() != a.cfg.Node {
		a.log.Warn("state cache unusable; waiting for the operator", "path", a.cfg.StateCache, "error", err, "cached_node", st.GetNode())
		return nil
	}
	n := a.certs.Preload(st.GetCertificates())
	st.Certificates = nil
	if err := a.applyStream(st, true); err != nil {
		a.log.Warn("state cache not applied; waiting for the operator", "error", err)
		return nil
	}
	a.log.Info("serving the cached state until the operator answers", "version", st.GetVersion(), "certificates", n)
	return nil
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
	return atomicfile.Write(a.cfg.StateCache, b, 0o600)
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
	// A bad workload or Service is left out and the rest applies (DroppedEntry).
	ws, werr := workloads(st)
	svcs, serr := services(st)
	dropped := droppedEntries(errors.Join(werr, serr))
	authz, err := authorization(st)
	if err != nil {
		return fmt.Errorf("state version %d: %w", st.GetVersion(), err)
	}
	strict, err := strictPorts(st, a.cfg.Node)
	if err != nil {
		return fmt.Errorf("state version %d: %w", st.GetVersion(), err)
	}
	escaped, err := mesh.ParseEscapedSlashes(st.GetMesh().GetEscapedSlashes())
	if err != nil {
		return fmt.Errorf("state version %d: mesh: %w", st.GetVersion(), err)
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
	// STRICT goes into the kernel before reconcile gives new pods listeners, so
	// plaintext is refused from a pod's first connection.
	if err := a.capture.SetStrictPorts(strict); err != nil {
		return fmt.Errorf("state version %d: mtls modes: %w", st.GetVersion(), err)
	}
	a.pods.SetMesh(ws)
	a.pods.SetServices(svcs)
	a.pods.SetPathOptions(proxy.PathOptions{EscapedSlashes: escaped, CaseInsensitive: st.GetMesh().GetCaseInsensitivePaths()})
	a.pods.SetAuthorization(authz) // before reconcile gives new pods listeners
	a.obs.SetState(st)             // flows and metrics name the destination's service
	a.want = want
	a.state, a.applied = st, time.Now()
	a.noteDropped(st.GetVersion(), dropped)
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
	for uid := range a.held {
		if _, ok := a.want[uid]; !ok {
			delete(a.held, uid)
		}
	}
	for uid, w := range a.want {
		if _, ok := a.enrolled[uid]; ok {
			continue
		}
		p, cookie, err := a.enroll(w)
		if err != nil {
			if a.failing[uid] != err.Error() { // say it once, not every tick
				a.log.Warn("pod not enrolled yet; will retry", "pod", w.Name, "error", err)
			}
			a.failing[uid] = err.Error()
			if cookie != 0 {
				a.held[uid] = cookie
			} else {
				delete(a.held, uid)
			}
			continue
		}
		delete(a.failing, uid)
		delete(a.held, uid)
		a.enrolled[uid] = p
	}
}

// enroll captures and serves the pod. On failure it returns the cookie of the pod's
// namespace when there is one: a capture the pod had before (a previous run's) is
// left in place, so the pod fails closed until it is served, and never drops to
// plaintext; only a capture this call added is undone.
func (a *Agent) enroll(w proxy.Workload) (enrolledPod, uint64, error) {
	ns, err := a.findNetns(w.IPs[0])
	if err != nil {
		return enrolledPod{}, 0, fmt.Errorf("pod %s: %w", w.Name, err)
	}
	nsCookie, err := ns.Cookie()
	if err != nil {
		ns.Close()
		return enrolledPod{}, 0, fmt.Errorf("pod %s: %w", w.Name, err)
	}
	if _, err := a.ids.Certificate(w.Identity); err != nil {
		ns.Close()
		return enrolledPod{}, nsCookie, fmt.Errorf("pod %s: %w", w.Name, err)
	}
	cookie, adopted, err := a.capture.Enroll(ns, w.Name)
	if err != nil {
		ns.Close()
		return enrolledPod{}, nsCookie, fmt.Errorf("pod %s: enroll: %w", w.Name, err)
	}
	if err := a.pods.AddPod(w, ns, cookie); err != nil {
		if !adopted {
			a.capture.Release(ns, cookie)
		}
		ns.Close()
		return enrolledPod{}, cookie, err
	}
	a.log.Info("pod enrolled", "pod", w.Name, "netns_cookie", cookie, "identity", w.Identity, "adopted", adopted)
	return enrolledPod{w: w, ns: ns, cookie: cookie, adopted: adopted}, 0, nil
}

func (a *Agent) unenroll(p enrolledPod) {
	if err := a.capture.Release(p.ns, p.cookie); err != nil {
		a.log.Warn("unenroll", "pod", p.w.Name, "error", err)
	}
	a.pods.RemovePod(p.w.UID)
	p.ns.Close()
	a.log.Info("pod unenrolled", "pod", p.w.Name)
}

// removeStale drops enrollments a previous run left for pods that are gone; those of
// wanted pods this agent could not serve yet are kept (see held).
func (a *Agent) removeStale() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	keep := map[uint64]bool{}
	for _, p := range a.enrolled {
		keep[p.cookie] = true
	}
	for _, c := range a.held {
		keep[c] = true
	}
	return a.capture.Prune(keep)
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
