// Command ferry-operator is Ferry's control plane: it watches the cluster (or a
// folder of manifests in local mode), acts as the mesh CA and streams each node
// agent its state.
package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/ferrymesh/ferry/operator"
	"github.com/spf13/cobra"
	"k8s.io/klog/v2"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:])
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "ferry-operator:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string) error {
	var (
		cfg      operator.Config
		logLevel slog.Level
	)
	cmd := &cobra.Command{
		Use:   "ferry-operator",
		Short: "Ferry control plane: workload identities and node state for the agents",
		Long: `ferry-operator watches Namespaces, Pods, Services and ServiceAccounts. Pods in
namespaces labelled ferry.io/mesh=enabled are enrolled (a pod labelled
ferry.io/mesh=disabled opts out) with the SPIFFE identity
spiffe://<trust-domain>/ns/<namespace>/sa/<service account>.

It serves two gRPC services on --grpc-addr, over TLS with a certificate from its own
CA: Discovery (each agent's NodeState, resent on every change, ACK/NACK) and
Certificates (signs a CSR for a service account that has a pod on the caller's node).
Agents authenticate with a projected service-account token (audience
ferry-operator), checked with TokenReview.

The CA root lives in the Secret --ca-secret (created on first start by the leader),
or in --user-ca-secret when that exists. The trust bundle is published in the
ConfigMap ferry-ca-bundle (key ca.crt) for agents to mount as --operator-ca.

With --local DIR there is no cluster: Kubernetes manifests (Namespace, Node, Pod
with spec.nodeName and status.podIP, Service, ServiceAccount) are read from DIR and
watched, the CA is kept in --state-dir, and one token per node is written to
<state-dir>/tokens/<node> for the agents' --token-file.

With --relay-addr it also serves the cluster-wide flow relay: the Observer API that
'ferry observe --server' and 'ferry ui --server' read, merging every agent's flows in
time order. Its agents are the --relay-agent addresses and, with --relay-agent-port,
every running agent pod. The Observer API has no authentication yet: serve it only
where the network is trusted.`,
		Example: `  # in a cluster (the Deployment in deploy/)
  ferry-operator --leader-elect

  # local mode, for the lab and the demo
  ferry-operator --local deploy/examples/local --state-dir /run/ferry-operator \
      --grpc-addr unix:///run/ferry-operator/grpc.sock`,
		Args:          cobra.NoArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: logLevel}))
			// client-go (informers, leader election) logs through klog: one format.
			klog.SetSlogLogger(log.With("component", "client-go"))
			o, err := operator.New(cfg, log)
			if err != nil {
				return err
			}
			if err := o.Start(cmd.Context()); err != nil {
				return err
			}
			<-cmd.Context().Done()
			log.Info("stopping")
			o.Stop()
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.Kubeconfig, "kubeconfig", "", "kubeconfig file (default: in-cluster configuration)")
	f.StringVar(&cfg.Local, "local", "", "local mode: serve the manifests in this folder instead of a cluster")
	f.StringVar(&cfg.StateDir, "state-dir", "/var/lib/ferry-operator", "local mode: folder for the CA (ca.crt, ca.key) and node tokens (tokens/<node>)")
	f.StringVar(&cfg.Namespace, "namespace", "ferry-system", "namespace of the CA Secret, the trust bundle ConfigMap and the Lease")
	f.StringVar(&cfg.GRPCAddr, "grpc-addr", ":15012", "address of the Discovery and Certificates gRPC services (host:port or unix:///path)")
	f.StringVar(&cfg.HealthAddr, "health-addr", ":15021", "address of /healthz and /readyz (\"\" disables)")
	f.StringVar(&cfg.MetricsAddr, "metrics-addr", ":15014", "address of Prometheus /metrics (\"\" disables)")
	f.StringVar(&cfg.TrustDomain, "trust-domain", "cluster.local", "SPIFFE trust domain")
	f.StringVar(&cfg.CASecret, "ca-secret", "ferry-ca", "Secret holding the CA root (tls.crt, tls.key); created on first start")
	f.StringVar(&cfg.UserCASecret, "user-ca-secret", "", "Secret with a user-supplied CA (tls.crt, tls.key) used instead when it exists")
	f.StringVar(&cfg.AgentServiceAccount, "agent-service-account", operator.DefaultAgentSA, "service account (in --namespace) of the agents; \"\" accepts any pod-bound token")
	f.StringSliceVar(&cfg.ServingNames, "serving-names", nil, "extra DNS names for the gRPC serving certificate")
	f.BoolVar(&cfg.LeaderElect, "leader-elect", false, "elect a leader with the Lease ferry-operator (run more than one replica)")
	f.DurationVar(&cfg.LeaseDuration, "lease-duration", 15*time.Second, "leader election: how long a lease lasts without renewal")
	f.DurationVar(&cfg.RenewDeadline, "renew-deadline", 10*time.Second, "leader election: how long the leader retries renewing before it steps down")
	f.DurationVar(&cfg.RetryPeriod, "retry-period", 2*time.Second, "leader election: time between attempts")
	f.StringVar(&cfg.Identity, "id", os.Getenv("POD_NAME"), "this replica's name in the Lease (default $POD_NAME, else hostname and a random suffix)")
	f.DurationVar(&cfg.CertTTL, "cert-ttl", 24*time.Hour, "lifetime of workload certificates (agents renew at half life)")
	f.StringVar(&cfg.RelayAddr, "relay-addr", "", "serve the cluster-wide flow relay (Observer API) here, host:port or unix:///path (\"\" disables)")
	f.StringArrayVar(&cfg.RelayAgents, "relay-agent", nil, "an agent Observer address the relay reads, unix:///path or host:port (repeatable)")
	f.IntVar(&cfg.RelayAgentPort, "relay-agent-port", 0, "also read every running agent pod at its IP and this port (the agents' --observer-addr)")
	f.TextVar(&logLevel, "log-level", slog.LevelInfo, "debug, info, warn or error")
	cmd.SetArgs(args)
	return cmd.ExecuteContext(ctx)
}
