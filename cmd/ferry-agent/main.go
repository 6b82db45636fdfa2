// Command ferry-agent is Ferry's node agent: one per node (a DaemonSet), it loads
// the eBPF data path and runs the node proxy for the node's enrolled pods.
package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/ferrymesh/ferry/agent"
	"github.com/ferrymesh/ferry/agent/datapath"
	"github.com/spf13/cobra"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:])
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "ferry-agent:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string) error {
	var (
		cfg        agent.Config
		cleanup    bool
		mountBPFFS bool
		logLevel   slog.Level
	)
	cfg.Datapath = datapath.Config{
		PinDir: datapath.DefaultPinDir,
		Mark:   datapath.DefaultMark,
		// Off by default: with the sk_msg ingress redirect the kernel applies no
		// back-pressure, and a sender faster than the agent gets ENOMEM from write
		// (docs/datapath.md, "Fast path").
		FastPath: false,
		MaxPods:  datapath.DefaultMaxPods,
	}
	cmd := &cobra.Command{
		Use:   "ferry-agent",
		Short: "Ferry node agent: eBPF capture and the node proxy",
		Long: `ferry-agent runs on every node. It loads Ferry's eBPF programs (pinned under
--bpf-pin-dir so capture survives a restart), enrolls the node's mesh pods from the
state it is given, and carries their TCP traffic: mutual TLS to pods on other nodes,
straight through to pods on this node, plaintext to destinations outside the mesh.

With --cleanup it removes everything Ferry put in the kernel and exits; given --state
and --node, also the iptables capture rules in the node's pods.`,
		Example: `  # in a cluster (the DaemonSet in deploy/)
  ferry-agent --operator ferry-operator.ferry-system.svc:15012 \
      --token-file /var/run/secrets/ferry/token --operator-ca /etc/ferry/ca/ca.crt
  # lab, local mode operator
  ferry-agent --node node1 --operator unix:///run/ferry-lab/fy/operator/grpc.sock \
      --token-file /run/ferry-lab/fy/operator/tokens/node1 --operator-ca /run/ferry-lab/fy/operator/ca.crt
  # a fixed state file, no operator
  ferry-agent --node node1 --state /var/lib/ferry/state.json
  ferry-agent --cleanup --bpf-pin-dir /sys/fs/bpf/ferry`,
		Args:          cobra.NoArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: logLevel}))
			if mountBPFFS {
				// The DaemonSet's privileged init container: the mount must be
				// made where the host sees it, which the agent's own container
				// (not privileged) cannot do.
				if err := datapath.EnsureBPFFS(cfg.Datapath.PinDir); err != nil {
					return err
				}
				log.Info("bpffs ready for pins", "pin_dir", cfg.Datapath.PinDir)
				return nil
			}
			if cleanup {
				if cfg.StatePath != "" { // iptables capture lives in the pods, not under the pin folder
					if err := agent.CleanupIPTables(cfg.StatePath, cfg.Node); err != nil {
						return err
					}
				}
				if err := datapath.Cleanup(cfg.Datapath.PinDir, cfg.Datapath.CgroupPath); err != nil {
					return err
				}
				log.Info("removed Ferry's programs, maps, links and pins", "pin_dir", cfg.Datapath.PinDir)
				return nil
			}
			a, err := agent.New(cfg, log.With("node", cfg.Node))
			if err != nil {
				return err
			}
			if err := a.Start(cmd.Context()); err != nil {
				return err
			}
			<-cmd.Context().Done()
			log.Info("stopping")
			return a.Stop()
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.Node, "node", os.Getenv("NODE_NAME"), "name of this node (default $NODE_NAME)")
	f.StringVar(&cfg.StatePath, "state", "", "node state file (protobuf JSON NodeState), instead of --operator")
	f.StringVar(&cfg.Operator, "operator", "", "operator address for the state stream and certificates (host:port or unix:///path)")
	f.StringVar(&cfg.TokenFile, "token-file", "/var/run/secrets/ferry/token", "bearer token for the operator (projected service-account token, audience ferry-operator)")
	f.StringVar(&cfg.OperatorCA, "operator-ca", "/etc/ferry/ca/ca.crt", "PEM bundle that verifies the operator's serving certificate (ConfigMap ferry-ca-bundle)")
	f.StringVar(&cfg.StateCache, "state-cache", "/run/ferry/state.cache", "with --operator: file keeping the last state and certificates (0600) so a restarted agent serves before the operator answers (\"\" disables)")
	f.StringVar(&cfg.HealthAddr, "health-addr", ":15021", "address of /healthz and /readyz (ready once a state is applied; \"\" disables)")
	f.StringVar(&cfg.AdminSocket, "admin-socket", "/run/ferry/agent.sock", "unix socket for the admin API (\"\" disables it)")
	f.StringVar(&cfg.Datapath.PinDir, "bpf-pin-dir", cfg.Datapath.PinDir, "bpffs folder where programs, maps and links are pinned")
	f.StringVar(&cfg.Datapath.CgroupPath, "cgroup", "", "cgroup v2 folder to attach capture to (default: the cgroup2 mount root)")
	f.Uint32Var(&cfg.Datapath.Mark, "mark", cfg.Datapath.Mark, "SO_MARK on the agent's own sockets, which capture skips")
	f.BoolVar(&cfg.Datapath.FastPath, "fast-path", cfg.Datapath.FastPath, "experimental: move bytes between local sockets with sockmap/sk_msg (a sender faster than the agent can get ENOMEM)")
	f.StringVar(&cfg.Capture, "capture", datapath.CaptureEBPF, "how pod traffic is captured: ebpf, or iptables (nat REDIRECT, to compare)")
	f.IntVar(&cfg.Datapath.MaxPods, "max-pods", cfg.Datapath.MaxPods, "most pods on this node; sizes the BPF maps")
	cfg.Observe.Flags(f)
	f.BoolVar(&cleanup, "cleanup", false, "remove everything Ferry put in the kernel and exit")
	f.BoolVar(&mountBPFFS, "mount-bpffs", false, "mount bpffs for --bpf-pin-dir where none is, create the folder, and exit (the DaemonSet's init container)")
	f.TextVar(&logLevel, "log-level", slog.LevelInfo, "debug, info, warn or error")
	cmd.SetArgs(args)
	return cmd.ExecuteContext(ctx)
}
