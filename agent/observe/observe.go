// Package observe is the agent's observability component: every connection and
// every L7 request the proxy reports becomes a flow in a bounded ring, served over
// the Observer gRPC API, and counts in the Prometheus metrics, served on an address of its own (and, through
// Handler, on the admin socket).
package observe

import (
	"context"

	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ferrymesh/ferry/agent/flows"
	"github.com/ferrymesh/ferry/agent/metrics"
	"github.com/ferrymesh/ferry/api/admin"
	"github.com/ferrymesh/ferry/api/ferryv1"
	"github.com/ferrymesh/ferry/internal/healthserver"
	"github.com/ferrymesh/ferry/internal/listener"
	"github.com/ferrymesh/ferry/internal/observertls"
	"github.com/spf13/pflag"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
)

// Config configures the agent's flows and metrics and where it serves them.
type Config struct {
	// FlowCapacity is how many flows the ring keeps.
	FlowCapacity int
	// ObserverSocket is the unix socket of the Observer gRPC API. Empty: observer.sock
	// beside the admin socket (see Beside); "none": no socket.
	ObserverSocket string
	// ObserverAddr is a TCP address for the Observer API, for a relay on another host
	// ("" for none). Flows name pods and identities, so it serves only mutual TLS:
	// ObserverTLS is required with it, and clients must prove a mesh CA certificate.
	ObserverAddr string
	ObserverTLS  observertls.Files
	// MetricsAddr is a TCP address serving /metrics for Prometheus ("" for none). The
	// admin socket serves /metrics too.
	MetricsAddr string
}

// DefaultConfig is the configuration the agent's flags start from.
func DefaultConfig() Config {
	return Config{FlowCapacity: flows.DefaultCapacity}
}

// Flags registers the configuration's flags, with its defaults, on fs.
func (c *Config) Flags(fs *pflag.FlagSet) {
	d := DefaultConfig()
	fs.StringVar(&c.ObserverSocket, "observer-socket", d.ObserverSocket, "unix socket for the Observer (flows) gRPC API (default: observer.sock beside --admin-socket; \"none\" disables it)")
	fs.StringVar(&c.ObserverAddr, "observer-addr", d.ObserverAddr, "TCP address for the Observer API, for the relay (e.g. 10.0.0.5:4245; \"\" disables it); mutual TLS only, with the --observer-tls-* files")
	fs.StringVar(&c.ObserverTLS.Cert, "observer-tls-cert", d.ObserverTLS.Cert, "with --observer-addr: this agent's certificate (PEM), issued by the mesh CA")
	fs.StringVar(&c.ObserverTLS.Key, "observer-tls-key", d.ObserverTLS.Key, "with --observer-addr: the certificate's private key (PEM)")
	fs.StringVar(&c.ObserverTLS.CA, "observer-tls-ca", d.ObserverTLS.CA, "with --observer-addr: the mesh CA bundle that clients' certificates must chain to")
	fs.StringVar(&c.MetricsAddr, "metrics-addr", d.MetricsAddr, "TCP address serving Prometheus /metrics (e.g. :15020; the admin socket serves /metrics too)")
	fs.IntVar(&c.FlowCapacity, "flow-buffer", d.FlowCapacity, "flows kept in memory for the Observer API")
}

// Beside returns c with its Observer socket resolved: an empty one becomes
// observer.sock in the admin socket's folder, "none" becomes no socket.
func (c Config) Beside(adminSocket string) Config {
	if c.ObserverSocket == "" && adminSocket != "" {
		c.ObserverSocket = filepath.Join(filepath.Dir(adminSocket), "observer.sock")
	}
	if c.ObserverSocket == "none" {
		c.ObserverSocket = ""
	}
	return c
}

// Sources is what the observer reads from the rest of the agent at scrape time.
type Sources struct {
	// LiveConns counts the connections being proxied now; nil counts none.
	LiveConns func() int
	// PinDir is the data path's bpffs folder, whose maps the metrics read.
	PinDir string
	// Certificates reports the workload certificates held now (identity to
	// NotAfter), for ferry_certificate_expiry_timestamp_seconds; nil exports none.
	Certificates func() map[string]time.Time
}

// Observer records every proxied connection as a flow and in the metrics, and
// serves both. It is the proxy's ConnObserver.
type Observer struct {
	cfg     Config
	node    string
	log     *slog.Logger
	ring    *flows.Ring
	metrics *metrics.Metrics

	grpc        *grpc.Server
	grpcTCP     *grpc.Server // the Observer API on ObserverAddr, over mutual TLS
	httpSrv     *healthserver.Server
	metricsAddr atomic.Pointer[string]
	wg          sync.WaitGroup

	// services names the service behind a destination address, for flows and the
	// destination_service label; replaced whole on every state (SetState).
	services atomic.Pointer[map[netip.AddrPort]service]
	// pods names the workload behind a pod IP, for the kernel's STRICT refusals,
	// which no proxy saw (SetState).
	pods atomic.Pointer[map[netip.Addr]podRef]
}

// New allocates the ring and the metrics for node; nothing is served until Start.
// cfg's zero fields take DefaultConfig's values; cfg.ObserverSocket is used as is
// (resolve it with Beside first).
func New(cfg Config, node string, src Sources, log *slog.Logger) *Observer {
	if cfg.FlowCapacity <= 0 {
		cfg.FlowCapacity = DefaultConfig().FlowCapacity
	}
	if cfg.ObserverSocket == "none" {
		cfg.ObserverSocket = ""
	}
	o := &Observer{cfg: cfg, node: node, log: log, ring: flows.NewRing(cfg.FlowCapacity)}
	live := src.LiveConns
	if live == nil {
		live = func() int { return 0 }
	}
	o.metrics = metrics.New(node, metrics.Sources{
		Flows: func() (int, int, uint64, uint64) {
			st := o.ring.Status()
			return st.Flows, st.Capacity, st.Seen, st.Lost
		},
		LiveConns:    live,
		Kernel:       kernelReader{pinDir: src.PinDir},
		Certificates: src.Certificates,
	})
	return o
}

// Config is the configuration the observer runs with.
func (o *Observer) Config() Config { return o.cfg }

// FlowCapacity is how many flows the ring keeps.
func (o *Observer) FlowCapacity() int { return o.ring.Status().Capacity }

// Handler serves the metrics, for the admin socket.
func (o *Observer) Handler() http.Handler { return o.metrics.Handler() }

// MetricsAddr is the address the metrics listener was bound to ("" before Start or
// without one): with MetricsAddr ":0" the port the kernel chose.
func (o *Observer) MetricsAddr() string {
	if a := o.metricsAddr.Load(); a != nil {
		return *a
	}
	return ""
}

// SetState indexes the state's services by the addresses that reach them, for flows
// and metrics (see serviceIndex).
func (o *Observer) SetState(st *ferryv1.NodeState) {
	o.services.Store(serviceIndex(st))
	o.pods.Store(podIndex(st))
}

// Start serves the Observer API and the metrics on the configured addresses.
func (o *Observer) Start(ctx context.Context) error {
	o.grpc = grpc.NewServer()
	flows.NewServer(o.ring, o.node).Register(o.grpc)
	var lns []net.Listener
	fail := func(err error) error {
		for _, ln := range lns {
			ln.Close()
		}
		return err
	}
	if p := o.cfg.ObserverSocket; p != "" {
		if err := os.MkdirAll(filepath.Dir(p), 0o750); err != nil {
			return fmt.Errorf("observer socket dir: %w", err)
		}
		// Replaces a killed or handing-over agent's socket; removed on close only
		// while it is still this one.
		ln, err := listener.Unix(ctx, p)
		if err != nil {
			return fail(fmt.Errorf("observer socket: %w", err))
		}
		if err := os.Chmod(p, 0o600); err != nil {
			return fail(fmt.Errorf("observer socket: %w", err))
		}
		lns = append(lns, ln)
	}
	var tcp net.Listener
	if a := o.cfg.ObserverAddr; a != "" {
		tlsCfg, err := observertls.ServerConfig(o.cfg.ObserverTLS)
		if err != nil {
			return fail(fmt.Errorf("observer listener %s: %w", a, err))
		}
		// A previous agent's listener, during a handoff.
		if tcp, err = listener.TCP(ctx, a); err != nil {
			return fail(fmt.Errorf("observer listener: %w", err))
		}
		o.grpcTCP = grpc.NewServer(grpc.Creds(credentials.NewTLS(tlsCfg)))
		flows.NewServer(o.ring, o.node).Register(o.grpcTCP)
	}
	serve := func(s *grpc.Server, ln net.Listener) {
		o.wg.Add(1)
		go func() {
			defer o.wg.Done()
			if err := s.Serve(ln); err != nil {
				o.log.Error("observer API stopped", "error", err)
			}
		}()
		o.log.Info("observer API listening", "address", ln.Addr().String())
	}
	for _, ln := range lns {
		serve(o.grpc, ln)
	}
	if tcp != nil {
		serve(o.grpcTCP, tcp)
	}
	stopGRPC := func() {
		o.grpc.Stop()
		if o.grpcTCP != nil {
			o.grpcTCP.Stop()
		}
	}
	if a := o.cfg.MetricsAddr; a != "" {
		o.httpSrv = healthserver.New(a, healthserver.Routes{Metrics: o.metrics.Handler()}, o.log)
		if err := o.httpSrv.Start(ctx); err != nil {
			stopGRPC()
			o.wg.Wait()
			return fmt.Errorf("metrics listener: %w", err)
		}
		addr := o.httpSrv.Addr().String()
		o.metricsAddr.Store(&addr)
		o.log.Info("metrics listening", "address", addr)
	}
	return nil
}

// Stop closes the servers, waiting for scrapes in progress until ctx ends;
// followers' streams end at once.
func (o *Observer) Stop(ctx context.Context) error {
	if o.grpc != nil {
		o.grpc.Stop()
	}
	if o.grpcTCP != nil {
		o.grpcTCP.Stop()
	}
	var err error
	if o.httpSrv != nil {
		if err = o.httpSrv.Stop(ctx); err != nil {
			err = fmt.Errorf("metrics server: %w", err)
		}
	}
	o.wg.Wait()
	return err
}

// ConnOpened counts a connection the proxy accepted.
func (o *Observer) ConnOpened(c admin.Conn) {
	l := connLabels(c, o.serviceOf(c))
	for _, r := range reporters(c) {
		l.Reporter = r
		o.metrics.ConnOpened(l)
	}
}

// ConnClosed records an ended connection as a flow and in the metrics.
func (o *Observer) ConnClosed(c admin.Conn) {
	svc := o.serviceOf(c)
	l := connLabels(c, svc)
	for _, r := range reporters(c) {
		l.Reporter = r
		o.metrics.ConnClosed(l, c.BytesSent, c.BytesRecv)
	}
	f := o.flow(c)
	f.Service = svc.flow
	o.ring.Add(f)
}

// Authorized counts a decision of an AuthorizationPolicy (proxy.AuthzObserver).
func (o *Observer) Authorized(policy, action string) {
	o.metrics.Authorization(policy, action)
}

// BudgetRefused counts a refusal by a per-pod budget (proxy.BudgetObserver).
func (o *Observer) BudgetRefused(pod, budget string) { o.metrics.BudgetRefused(pod, budget) }

// Panicked counts a panic the proxy recovered (proxy.BudgetObserver).
func (o *Observer) Panicked(pod string) { o.metrics.Panicked(pod) }

// StateDropped sets how many entries of kind the applied state had left out.
func (o *Observer) StateDropped(kind string, n int) { o.metrics.StateDropped(kind, n) }

// Request records one request the proxy carried at L7 as a flow and in Istio's
// request metrics. A record without c.HTTP is not a request and is ignored.
func (o *Observer) Request(c admin.Conn) {
	if c.HTTP == nil {
		return
	}
	svc := o.serviceOf(c)
	l := requestLabels(c, svc)
	for _, r := range reporters(c) {
		l.Reporter = r
		o.metrics.Request(l, c.End.Sub(c.Start), c.BytesSent, c.BytesRecv)
	}
	o.metrics.Retries(svc.metric, c.HTTP.Retries)
	f := o.requestFlow(c)
	f.Service = svc.flow
	o.ring.Add(f)
}
