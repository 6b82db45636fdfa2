// Package operator is Ferry's control plane: it watches Kubernetes (or, in local
// mode, a folder of manifests), acts as the mesh CA and streams each node agent its
// state over gRPC.
package operator

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ferrymesh/ferry/operator/ca"
	"github.com/ferrymesh/ferry/operator/local"
	"github.com/ferrymesh/ferry/operator/mesh"
	"github.com/ferrymesh/ferry/operator/server"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
)

// Names of the objects the operator keeps in its namespace.
const (
	LeaseName      = "ferry-operator"
	BundleConfig   = "ferry-ca-bundle"
	BundleKey      = "ca.crt"
	ServiceName    = "ferry-operator"
	DefaultAgentSA = "ferry-agent"
)

// Config configures an Operator. Addresses are host:port or unix:///path; an empty
// address disables that listener.
type Config struct {
	Kubeconfig string // "" means in-cluster
	// Local is a folder of manifests to serve instead of a cluster.
	Local string
	// StateDir keeps local mode's CA and node tokens.
	StateDir     string
	Namespace    string
	GRPCAddr     string
	HealthAddr   string
	MetricsAddr  string
	TrustDomain  string
	CASecret     string
	UserCASecret string
	CertTTL      time.Duration
	// AgentServiceAccount is the service account (in Namespace) whose tokens
	// agents present; "" accepts any pod-bound token.
	AgentServiceAccount string
	// ServingNames are extra DNS names of the gRPC serving certificate.
	ServingNames []string

	LeaderElect   bool
	LeaseDuration time.Duration
	RenewDeadline time.Duration
	RetryPeriod   time.Duration
	// Identity names this replica in the Lease; default hostname plus a random suffix.
	Identity string
	// PollInterval is how often local mode looks for changed manifests.
	PollInterval time.Duration

	// RelayAddr serves the cluster-wide flow relay (Observer API); "" turns it off.
	RelayAddr string
	// RelayAgents are Observer addresses of agents the relay always reads
	// ("unix:///path" or host:port), e.g. the lab's agents in local mode.
	RelayAgents []string
	// RelayAgentPort, when set, makes the relay read every running agent pod at
	// its IP and this port (the agents' --observer-addr).
	RelayAgentPort int
}

// Operator is one operator replica.
type Operator struct {
	cfg Config
	log *slog.Logger
	reg *prometheus.Registry

	client  kubernetes.Interface
	factory informers.SharedInformerFactory
	view    *mesh.View
	loader  *local.Loader
	tokens  *server.NodeTokens

	grpcLis, healthLis, metricsLis net.Listener
	grpc                           atomic.Pointer[grpc.Server]
	https                          []*http.Server

	leader  atomic.Bool
	ready   atomic.Bool
	ca      atomic.Pointer[ca.CA]
	serving atomic.Pointer[tls.Certificate]
	srv     atomic.Pointer[server.Server]

	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// New validates cfg and builds the clients; nothing is started.
func New(cfg Config, log *slog.Logger) (*Operator, error) {
	if cfg.Namespace == "" {
		cfg.Namespace = "ferry-system"
	}
	if cfg.TrustDomain == "" {
		cfg.TrustDomain = "cluster.local"
	}
	if cfg.CASecret == "" {
		cfg.CASecret = "ferry-ca"
	}
	if cfg.CertTTL == 0 {
		cfg.CertTTL = ca.DefaultTTL
	}
	if cfg.CertTTL < 0 {
		return nil, errors.New("operator config: negative certificate ttl")
	}
	if cfg.LeaseDuration == 0 {
		cfg.LeaseDuration = 15 * time.Second
	}
	if cfg.RenewDeadline == 0 {
		cfg.RenewDeadline = 10 * time.Second
	}
	if cfg.RetryPeriod == 0 {
		cfg.RetryPeriod = 2 * time.Second
	}
	if cfg.PollInterval == 0 {
		cfg.PollInterval = 500 * time.Millisecond
	}
	if cfg.Identity == "" {
		host, _ := os.Hostname()
		b := make([]byte, 4)
		_, _ = rand.Read(b)
		cfg.Identity = host + "_" + hex.EncodeToString(b)
	}
	if cfg.GRPCAddr == "" {
		return nil, errors.New("operator config: grpc address is required")
	}
	o := &Operator{cfg: cfg, log: log, reg: prometheus.NewRegistry()}
	if cfg.Local != "" {
		if cfg.StateDir == "" {
			return nil, errors.New("operator config: local mode needs a state folder")
		}
		if cfg.LeaderElect {
			return nil, errors.New("operator config: leader election needs a cluster, not local mode")
		}
		o.client = fake.NewClientset()
		var err error
		if o.tokens, err = server.NewNodeTokens(filepath.Join(cfg.StateDir, "tokens")); err != nil {
			return nil, err
		}
		o.loader, err = local.NewLoader(cfg.Local, o.client, func(nodes []string) {
			if err := o.tokens.Ensure(nodes); err != nil {
				log.Error("node tokens", "error", err)
			}
		}, log)
		if err != nil {
			return nil, err
		}
	} else {
		rc, err := restConfig(cfg.Kubeconfig)
		if err != nil {
			return nil, err
		}
		if o.client, err = kubernetes.NewForConfig(rc); err != nil {
			return nil, fmt.Errorf("kubernetes client: %w", err)
		}
	}
	o.factory = informers.NewSharedInformerFactory(o.client, 0)
	var err error
	if o.view, err = mesh.NewView(o.factory, cfg.TrustDomain, log); err != nil {
		return nil, err
	}
	o.registerMetrics()
	return o, nil
}

func restConfig(kubeconfig string) (*rest.Config, error) {
	if kubeconfig == "" {
		rc, err := rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("in-cluster config (use --kubeconfig or --local outside a cluster): %w", err)
		}
		return rc, nil
	}
	rc, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("kubeconfig: %w", err)
	}
	return rc, nil
}

func (o *Operator) registerMetrics() {
	o.reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "ferry_operator_leader", Help: "1 when this replica holds the lease."}, func() float64 { return b2f(o.leader.Load()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "ferry_operator_ready", Help: "1 when this replica serves agents."}, func() float64 { return b2f(o.ready.Load()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "ferry_operator_workloads", Help: "Enrolled workloads in the mesh view."}, func() float64 {
			s, _ := o.view.Current()
			if s == nil {
				return 0
			}
			return float64(len(s.Workloads))
		}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "ferry_operator_services", Help: "Services selecting enrolled workloads."}, func() float64 {
			s, _ := o.view.Current()
			if s == nil {
				return 0
			}
			return float64(len(s.Services))
		}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "ferry_operator_state_version", Help: "Version of the current mesh snapshot."}, func() float64 {
			s, _ := o.view.Current()
			if s == nil {
				return 0
			}
			return float64(s.Version)
		}),
	)
	if o.loader != nil {
		o.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "ferry_operator_manifest_errors", Help: "Local mode: manifest documents not loaded."}, func() float64 {
			return float64(len(o.loader.Errors()))
		}))
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// Listen opens a TCP (host:port) or unix (unix:///path) listener with MPTCP off.
// A stale unix socket file is replaced.
func Listen(addr string) (net.Listener, error) {
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	if path, ok := strings.CutPrefix(addr, "unix://"); ok {
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("listen %s: %w", addr, err)
		}
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			return nil, fmt.Errorf("listen %s: %w", addr, err)
		}
		l, err := lc.Listen(context.Background(), "unix", path)
		if err != nil {
			return nil, fmt.Errorf("listen %s: %w", addr, err)
		}
		return l, nil
	}
	l, err := lc.Listen(context.Background(), "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", addr, err)
	}
	return l, nil
}

// Start opens the listeners (failing at once on a bad address), starts the
// informers, and in the background loads the CA and serves agents.
func (o *Operator) Start(ctx context.Context) error {
	var err error
	if o.grpcLis, err = Listen(o.cfg.GRPCAddr); err != nil {
		return err
	}
	if o.cfg.HealthAddr != "" {
		if o.healthLis, err = Listen(o.cfg.HealthAddr); err != nil {
			o.grpcLis.Close()
			return err
		}
	}
	if o.cfg.MetricsAddr != "" {
		if o.metricsLis, err = Listen(o.cfg.MetricsAddr); err != nil {
			o.grpcLis.Close()
			if o.healthLis != nil {
				o.healthLis.Close()
			}
			return err
		}
	}
	ctx, o.cancel = context.WithCancel(context.Background())
	o.serveHTTP()

	if o.loader != nil {
		if err := o.loader.Load(ctx); err != nil {
			o.log.Error("manifests", "error", err)
		}
	}
	o.factory.Start(ctx.Done())
	o.goRun(func() { o.view.Run(ctx) })
	if o.loader != nil {
		o.goRun(func() {
			// After the informers have listed: the in-memory clientset cannot
			// replay changes made between an informer's list and its watch.
			o.factory.WaitForCacheSync(ctx.Done())
			o.loader.Start(ctx, o.cfg.PollInterval)
		})
	}
	if err := o.startRelay(ctx); err != nil {
		o.log.Error("flow relay not started", "error", err)
	}
	if o.cfg.LeaderElect {
		o.goRun(func() { o.elect(ctx) })
	} else {
		o.leader.Store(true)
	}
	o.goRun(func() {
		if err := o.serve(ctx); err != nil && ctx.Err() == nil {
			o.log.Error("operator cannot serve agents", "error", err)
		}
	})
	return nil
}

func (o *Operator) goRun(f func()) {
	o.wg.Add(1)
	go func() {
		defer o.wg.Done()
		f()
	}()
}

// serve loads the CA, then serves gRPC until the listener closes.
func (o *Operator) serve(ctx context.Context) error {
	var authority *ca.CA
	var err error
	var auth server.Authenticator
	if o.loader != nil {
		authority, err = ca.FromDir(o.cfg.StateDir, o.cfg.TrustDomain)
		auth = o.tokens
	} else {
		// The API server may not answer yet, or RBAC may be fixed later: retry
		// rather than stay up unready for good.
		for wait := time.Second; ; wait = min(wait*2, 30*time.Second) {
			authority, err = ca.FromSecret(ctx, o.client, ca.SecretSource{
				Namespace: o.cfg.Namespace, Name: o.cfg.CASecret, UserName: o.cfg.UserCASecret, TrustDomain: o.cfg.TrustDomain,
			}, o.leader.Load, time.Second)
			if err == nil || ctx.Err() != nil {
				break
			}
			o.log.Error("mesh CA not loaded; retrying", "error", err, "retry_in", wait)
			select {
			case <-ctx.Done():
			case <-time.After(wait):
			}
		}
		auth = server.NewTokenReviewer(o.client, o.cfg.Namespace, o.cfg.AgentServiceAccount)
	}
	if err != nil {
		return err
	}
	o.ca.Store(authority)
	o.log.Info("mesh CA loaded", "trust_domain", authority.TrustDomain())
	if err := o.renewServing(); err != nil {
		return err
	}
	srv, err := server.New(server.Config{Auth: auth, View: o.view, CA: authority, CertTTL: o.cfg.CertTTL, Metrics: o.reg, Log: o.log})
	if err != nil {
		return err
	}
	o.srv.Store(srv)
	tlsCfg := &tls.Config{
		MinVersion: tls.VersionTLS13,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			if c := o.serving.Load(); c != nil && time.Now().Before(c.Leaf.NotBefore.Add(c.Leaf.NotAfter.Sub(c.Leaf.NotBefore)/2)) {
				return c, nil
			}
			if err := o.renewServing(); err != nil {
				return nil, err
			}
			return o.serving.Load(), nil
		},
	}
	g := grpc.NewServer(
		grpc.Creds(credentials.NewTLS(tlsCfg)),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 5 * time.Second, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 30 * time.Second, Timeout: 10 * time.Second}),
	)
	srv.Register(g)
	o.grpc.Store(g)
	if o.leader.Load() {
		o.publishBundle(ctx)
	}
	o.goRun(func() {
		o.factory.WaitForCacheSync(ctx.Done())
		for ctx.Err() == nil {
			if s, _ := o.view.Current(); s != nil {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		if ctx.Err() == nil {
			o.ready.Store(true)
			o.log.Info("operator ready", "grpc", o.cfg.GRPCAddr, "leader", o.leader.Load())
		}
	})
	return g.Serve(o.grpcLis)
}

func (o *Operator) renewServing() error {
	names := []string{"localhost", ServiceName, ServiceName + "." + o.cfg.Namespace, ServiceName + "." + o.cfg.Namespace + ".svc", ServiceName + "." + o.cfg.Namespace + ".svc.cluster.local"}
	names = append(names, o.cfg.ServingNames...)
	c, err := o.ca.Load().ServingCertificate(names, []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback}, 30*24*time.Hour)
	if err != nil {
		return err
	}
	o.serving.Store(&c)
	return nil
}

// publishBundle keeps the trust bundle ConfigMap agents mount as --operator-ca
// (leader only; local mode writes <state-dir>/ca.crt instead).
func (o *Operator) publishBundle(ctx context.Context) {
	authority := o.ca.Load()
	if o.loader != nil || authority == nil {
		return
	}
	cms := o.client.CoreV1().ConfigMaps(o.cfg.Namespace)
	want := string(authority.RootPEM())
	cm, err := cms.Get(ctx, BundleConfig, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		_, err = cms.Create(ctx, &corev1.ConfigMap{
			ObjectMeta: metav1.ObjectMeta{Name: BundleConfig, Namespace: o.cfg.Namespace, Labels: map[string]string{"app.kubernetes.io/part-of": "ferry"}},
			Data:       map[string]string{BundleKey: want},
		}, metav1.CreateOptions{})
	case err == nil && cm.Data[BundleKey] != want:
		cm = cm.DeepCopy()
		if cm.Data == nil {
			cm.Data = map[string]string{}
		}
		cm.Data[BundleKey] = want
		_, err = cms.Update(ctx, cm, metav1.UpdateOptions{})
	}
	if err != nil {
		o.log.Error("publish trust bundle", "configmap", BundleConfig, "error", err)
	}
}

// elect campaigns for the Lease until ctx ends. Every replica serves agents from
// its informers; only the leader creates the CA Secret and writes the bundle.
func (o *Operator) elect(ctx context.Context) {
	lock := &resourcelock.LeaseLock{
		LeaseMeta:  metav1.ObjectMeta{Name: LeaseName, Namespace: o.cfg.Namespace},
		Client:     o.client.CoordinationV1(),
		LockConfig: resourcelock.ResourceLockConfig{Identity: o.cfg.Identity},
	}
	for ctx.Err() == nil {
		le, err := leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
			Lock:            lock,
			LeaseDuration:   o.cfg.LeaseDuration,
			RenewDeadline:   o.cfg.RenewDeadline,
			RetryPeriod:     o.cfg.RetryPeriod,
			ReleaseOnCancel: true,
			Name:            LeaseName,
			Callbacks: leaderelection.LeaderCallbacks{
				OnStartedLeading: func(ctx context.Context) {
					o.leader.Store(true)
					o.log.Info("became leader", "lease", o.cfg.Namespace+"/"+LeaseName, "identity", o.cfg.Identity)
					o.publishBundle(ctx)
				},
				OnStoppedLeading: func() {
					o.leader.Store(false)
					o.log.Info("lost leadership", "identity", o.cfg.Identity)
				},
				OnNewLeader: func(id string) {
					if id != o.cfg.Identity {
						o.log.Info("following leader", "leader", id)
					}
				},
			},
		})
		if err != nil {
			o.log.Error("leader election", "error", err)
			return
		}
		le.Run(ctx)
	}
}

// serveHTTP serves /healthz, /readyz and /metrics.
func (o *Operator) serveHTTP() {
	health := http.NewServeMux()
	health.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	health.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !o.ready.Load() {
			http.Error(w, "not ready: CA or informers not loaded yet", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	metrics := http.NewServeMux()
	metrics.Handle("/metrics", promhttp.HandlerFor(o.reg, promhttp.HandlerOpts{}))
	for _, p := range []struct {
		lis net.Listener
		h   http.Handler
	}{{o.healthLis, health}, {o.metricsLis, metrics}} {
		if p.lis == nil {
			continue
		}
		hs := &http.Server{Handler: p.h, ReadHeaderTimeout: 10 * time.Second}
		o.https = append(o.https, hs)
		lis := p.lis
		o.goRun(func() { _ = hs.Serve(lis) })
	}
}

// Leader reports whether this replica holds the lease (always, without election).
func (o *Operator) Leader() bool { return o.leader.Load() }

// Ready reports whether the replica serves agents.
func (o *Operator) Ready() bool { return o.ready.Load() }

// View is the operator's mesh view.
func (o *Operator) View() *mesh.View { return o.view }

// ManifestErrors lists local mode's manifest documents that are not loaded.
func (o *Operator) ManifestErrors() []*local.ManifestError {
	if o.loader == nil {
		return nil
	}
	return o.loader.Errors()
}

// Stop stops serving and waits for every goroutine; a leader releases its lease.
func (o *Operator) Stop() {
	if o.cancel == nil {
		return
	}
	o.cancel()
	// Streams never end on their own: close them; agents keep their state and
	// reconnect to another replica or to the next start.
	if g := o.grpc.Load(); g != nil {
		g.Stop()
	}
	o.grpcLis.Close()
	for _, hs := range o.https {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_ = hs.Shutdown(sctx)
		cancel()
	}
	o.wg.Wait()
	o.factory.Shutdown()
}
