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

// stopTimeout bounds how long a stopping operator waits for its parts.
const stopTimeout = 10 * time.Second

func run(ctx context.Context, args []string) error {
	cfg := operator.DefaultConfig()
	var logLevel slog.Level
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
			ctx, cancel := context.WithTimeout(context.WithoutCancel(cmd.Context()), stopTimeout)
			defer cancel()
			return o.Stop(ctx)
		},
	}
	f := cmd.Flags()
	cfg.Flags(f)
	f.TextVar(&logLevel, "log-level", slog.LevelInfo, "debug, info, warn or error")
	cmd.SetArgs(args)
	return cmd.ExecuteContext(ctx)
}
