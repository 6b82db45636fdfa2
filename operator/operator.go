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
	"os"
	"path/filepath"
	"slices"
	"sync/atomic"
	"time"

	"github.com/ferrymesh/ferry/api/ferryv1"
	"github.com/ferrymesh/ferry/internal/healthserver"
	"github.com/ferrymesh/ferry/internal/listener"
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
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
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

// Operator is one operator replica.
type Operator struct {
	cfg Config
	log *slog.Logger
	reg *prometheus.Registry

	client  kubernetes.Interface
	factory informers.SharedInformerFactory
	// policies is Ferry's custom resources: the API server's in a cluster, an
	// in-memory store in local mode; read through policyInformers.
	policies        dynamic.Interface
	policyInformers dynamicinformer.DynamicSharedInformerFactory
	view            *mesh.View
	loader          *local.Loader
	tokens          *server.NodeTokens

	grpcLis net.Listener
	grpc    atomic.Pointer[grpc.Server]

	// The goroutines of the informers, the relay, the election and the agent
	// server; started holds what Start started, for Stop.
	informers, relay, election, agents *group
	started                            []component

	leader  atomic.Bool
	ready   atomic.Bool
	ca      atomic.Pointer[ca.CA]
	serving atomic.Pointer[tls.Certificate]
	srv     atomic.Pointer[server.Server]
	// mesh is the MeshConfig of every node's state.
	mesh *ferryv1.MeshConfig
}

// New validates cfg and builds the clients; nothing is started.
func New(cfg Config, log *slog.Logger) (*Operator, error) {
	cfg = cfg.withDefaults()
	if cfg.CertTTL < 0 {
		return nil, errors.New("operator config: negative certificate ttl")
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
	meshCfg, err := cfg.meshConfig()
	if err != nil {
		return nil, err
	}
	o := &Operator{cfg: cfg, log: log, reg: prometheus.NewRegistry(), mesh: meshCfg}
	if cfg.Local != "" {
		if cfg.StateDir == "" {
			return nil, errors.New("operator config: local mode needs a state folder")
		}
		if cfg.LeaderElect {
			return nil, errors.New("operator config: leader election needs a cluster, not local mode")
		}
		o.client = fake.NewClientset()
		o.policies = local.NewPolicyClient()
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
		if err := o.loader.SetServiceCIDR(cfg.ServiceCIDR); err != nil {
			return nil, fmt.Errorf("operator config: %w", err)
		}
		o.loader.SetPolicyClient(o.policies)
	} else {
		rc, err := restConfig(cfg.Kubeconfig)
		if err != nil {
			return nil, err
		}
		// Every agent's stream is authenticated by a TokenReview: client-go's
		// default 5 requests/s (burst 10) made 100 agents connecting at once
		// (operator start, failover) wait 18 s for their first state.
		rc.QPS, rc.Burst = 100, 200
		if o.client, err = kubernetes.NewForConfig(rc); err != nil {
			return nil, fmt.Errorf("kubernetes client: %w", err)
		}
		if o.policies, err = dynamic.NewForConfig(rc); err != nil {
			return nil, fmt.Errorf("kubernetes dynamic client: %w", err)
		}
	}
	o.factory = informers.NewSharedInformerFactory(o.client, 0)
	o.policyInformers = dynamicinformer.NewDynamicSharedInformerFactory(o.policies, 0)
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
	o.reg.MustRegister(conflictCollector{o.view})
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

// Start starts the operator's components in order: the gRPC listener (so a bad
// address fails at once), the health and metrics servers, the informers, the flow
// relay, leader election, and in the background the agent server, which loads the
// CA and serves agents. They run until ctx ends or Stop.
func (o *Operator) Start(ctx context.Context) error {
	if !o.cfg.LeaderElect {
		o.leader.Store(true)
	}
	started, err := startAll(ctx, o.components())
	if err != nil {
		return err
	}
	o.started = started
	return nil
}

// components lists the operator's parts in start order.
func (o *Operator) components() []component {
	cs := []component{{name: "grpc listener", start: o.listenGRPC, stop: func(context.Context) error {
		o.grpcLis.Close()
		return nil
	}}}
	for _, s := range []struct {
		name, addr string
		routes     healthserver.Routes
	}{
		{"health server", o.cfg.HealthAddr, healthserver.Routes{Ready: o.readyErr}},
		{"metrics server", o.cfg.MetricsAddr, healthserver.Routes{Metrics: promhttp.HandlerFor(o.reg, promhttp.HandlerOpts{})}},
	} {
		if s.addr == "" {
			continue
		}
		hs := healthserver.New(s.addr, s.routes, o.log)
		cs = append(cs, component{name: s.name, start: hs.Start, stop: hs.Stop})
	}
	cs = append(cs, component{name: "informers", start: o.startInformers, stop: func(ctx context.Context) error {
		err := o.informers.stop(ctx)
		o.factory.Shutdown()
		o.policyInformers.Shutdown()
		return err
	}})
	if o.cfg.RelayAddr != "" {
		cs = append(cs, component{name: "flow relay", start: func(ctx context.Context) error {
			if err := o.startRelay(ctx); err != nil {
				o.log.Error("flow relay not started", "error", err)
			}
			return nil
		}, stop: func(ctx context.Context) error {
			if o.relay == nil {
				return nil
			}
			return o.relay.stop(ctx)
		}})
	}
	if o.cfg.LeaderElect {
		cs = append(cs, component{name: "leader election", start: func(ctx context.Context) error {
			o.election = newGroup(ctx)
			o.election.run(o.elect)
			return nil
		}, stop: func(ctx context.Context) error { return o.election.stop(ctx) }})
	}
	return append(cs, component{name: "agent server", start: func(ctx context.Context) error {
		o.agents = newGroup(ctx)
		o.agents.run(func(ctx context.Context) {
			if err := o.serve(ctx); err != nil && ctx.Err() == nil {
				o.log.Error("operator cannot serve agents", "error", err)
			}
		})
		return nil
	}, stop: func(ctx context.Context) error {
		o.agents.cancel()
		// Streams never end on their own: close them; agents keep their state and
		// reconnect to another replica or to the next start.
		if g := o.grpc.Load(); g != nil {
			g.Stop()
		}
		o.grpcLis.Close()
		return o.agents.stop(ctx)
	}})
}

func (o *Operator) listenGRPC(ctx context.Context) error {
	var err error
	o.grpcLis, err = listener.Addr(ctx, o.cfg.GRPCAddr)
	return err
}

// startInformers loads local mode's manifests and starts the informers and the
// mesh view.
func (o *Operator) startInformers(ctx context.Context) error {
	o.informers = newGroup(ctx)
	ctx = o.informers.ctx
	if o.loader != nil {
		if err := o.loader.Load(ctx); err != nil {
			o.log.Error("manifests", "error", err)
		}
		// The in-memory store always serves TrafficPolicies and Gateway API's
		// routes.
		for _, watch := range []func(dynamicinformer.DynamicSharedInformerFactory) error{
			o.view.WatchTrafficPolicies, o.view.WatchRoutes, o.view.WatchReferenceGrants, o.watchAuthorization, o.watchPeerAuthentication,
		} {
			if err := watch(o.policyInformers); err != nil {
				return err
			}
		}
	} else {
		for _, w := range o.customWatches() {
			o.watchWhenServed(ctx, w)
		}
		o.informers.run(o.writeRouteStatus)
		o.informers.run(o.reportConflicts)
	}
	o.factory.Start(ctx.Done())
	o.policyInformers.Start(ctx.Done())
	o.informers.run(o.view.Run)
	if o.loader != nil {
		o.informers.run(func(ctx context.Context) {
			// After the informers have listed: the in-memory clientset cannot
			// replay changes made between an informer's list and its watch.
			o.factory.WaitForCacheSync(ctx.Done())
			o.policyInformers.WaitForCacheSync(ctx.Done())
			o.loader.Start(ctx, o.cfg.PollInterval)
		})
	}
	return nil
}

// watchAuthorization reads AuthorizationPolicies; the operator's namespace is
// the one whose policies select across the mesh.
func (o *Operator) watchAuthorization(f dynamicinformer.DynamicSharedInformerFactory) error {
	return o.view.WatchAuthorizationPolicies(f, o.cfg.Namespace)
}

// watchPeerAuthentication reads PeerAuthentications; the operator's namespace
// holds the mesh-wide one.
func (o *Operator) watchPeerAuthentication(f dynamicinformer.DynamicSharedInformerFactory) error {
	return o.view.WatchPeerAuthentications(f, o.cfg.Namespace)
}

// customWatch is a custom resource the view reads once the API server serves it.
type customWatch struct {
	what      string // for log lines
	resources []schema.GroupVersionResource
	watch     func(dynamicinformer.DynamicSharedInformerFactory) error
	without   string // what Services get while it is not served
}

func (o *Operator) customWatches() []customWatch {
	return []customWatch{
		{what: "TrafficPolicy", resources: []schema.GroupVersionResource{mesh.TrafficPolicyResource()}, watch: o.view.WatchTrafficPolicies,
			without: "Services get the default load balancer"},
		{what: "HTTPRoute and GRPCRoute", resources: []schema.GroupVersionResource{mesh.HTTPRouteResource(), mesh.GRPCRouteResource()}, watch: o.view.WatchRoutes,
			without: "Services are not routed"},
		{what: "AuthorizationPolicy", resources: []schema.GroupVersionResource{mesh.AuthorizationPolicyResource()}, watch: o.watchAuthorization,
			without: "no authorization policy is enforced"},
		{what: "PeerAuthentication", resources: []schema.GroupVersionResource{mesh.PeerAuthenticationResource()}, watch: o.watchPeerAuthentication,
			without: "every workload is PERMISSIVE"},
		{what: "ReferenceGrant", resources: []schema.GroupVersionResource{mesh.ReferenceGrantResource()}, watch: o.view.WatchReferenceGrants,
			without: "routes to another namespace's Services are rejected"},
	}
}

// watchWhenServed watches w's resources at once when the API server serves them,
// so the first snapshot has them. A cluster may lack the CRDs (or not answer
// yet): the operator then serves Services without them and looks again every
// CRDPollInterval, watching once they appear.
func (o *Operator) watchWhenServed(ctx context.Context, w customWatch) {
	served, err := o.served(ctx, w.resources)
	if served {
		if err := w.watch(o.policyInformers); err != nil {
			o.log.Error("watch custom resources", "resource", w.what, "error", err)
		}
		return
	}
	if err != nil {
		o.log.Warn(w.what+": API discovery did not answer; "+w.without+" until it does", "resource", w.what, "recheck", o.cfg.CRDPollInterval, "error", err)
	} else {
		o.log.Warn(w.what+" not served by the API server (is deploy/ applied?); "+w.without+" until it is", "resource", w.what, "recheck", o.cfg.CRDPollInterval)
	}
	o.informers.run(func(ctx context.Context) {
		_ = wait.PollUntilContextCancel(ctx, o.cfg.CRDPollInterval, false, func(ctx context.Context) (bool, error) {
			served, _ := o.served(ctx, w.resources)
			return served, nil
		})
		if ctx.Err() != nil {
			return
		}
		if err := w.watch(o.policyInformers); err != nil {
			o.log.Error("watch custom resources", "resource", w.what, "error", err)
			return
		}
		o.policyInformers.Start(ctx.Done())
		o.log.Info(w.what+" served by the API server; watching it", "resource", w.what)
	})
}

// served asks the API server's discovery whether it serves every one of
// resources. Not found is (false, nil); an unanswered question is (false, err).
func (o *Operator) served(ctx context.Context, resources []schema.GroupVersionResource) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	for _, gvr := range resources {
		var list metav1.APIResourceList
		err := o.client.Discovery().RESTClient().Get().AbsPath("/apis", gvr.Group, gvr.Version).Do(ctx).Into(&list)
		if apierrors.IsNotFound(err) {
			return false, nil
		}
		if err != nil {
			return false, fmt.Errorf("discovery of %s: %w", gvr.GroupVersion(), err)
		}
		if !slices.ContainsFunc(list.APIResources, func(r metav1.APIResource) bool { return r.Name == gvr.Resource }) {
			return false, nil
		}
	}
	return true, nil
}

// readyErr says why the replica does not serve agents yet.
func (o *Operator) readyErr() error {
	if !o.ready.Load() {
		return errors.New("not ready: CA or informers not loaded yet")
	}
	return nil
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
	srv, err := server.New(server.Config{Auth: auth, View: o.view, CA: authority, CertTTL: o.cfg.CertTTL, Mesh: o.mesh, Metrics: o.reg, Log: o.log})
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
	o.agents.run(func(ctx context.Context) {
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

// Stop stops the components in reverse start order and waits for their goroutines,
// until ctx ends; a leader releases its lease.
func (o *Operator) Stop(ctx context.Context) error {
	if o.started == nil {
		return nil
	}
	err := stopAll(ctx, o.started)
	o.started = nil
	return err
}
