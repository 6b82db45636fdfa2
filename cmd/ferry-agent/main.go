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
	"time"

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
		cfg        = agent.DefaultConfig()
		cleanup    bool
		mountBPFFS bool
		logLevel   slog.Level
		// exitAfterDrain: a supervisor that restarts an exited agent (the kubelet)
		// would start the old version again, so there the agent waits for its stop.
		exitAfterDrain = true
	)
	cmd := &cobra.Command{
		Use:   "ferry-agent",
		Short: "Ferry node agent: eBPF capture and the node proxy",
		Long: `ferry-agent runs on every node. It loads Ferry's eBPF programs (pinned under
--bpf-pin-dir so capture survives a restart), enrolls the node's mesh pods from the
state it is given, and carries their TCP traffic: mutual TLS to pods on other nodes,
straight through to pods on this node, plaintext to destinations outside the mesh.

One agent runs per node: it holds a lock in its state folder (--lock-file) and on
--bpf-pin-dir while it runs. A second agent started for the node (an upgrade, a
restart) takes the running one's listeners and locks over through handoff.sock in
the state folder, and the old one stops accepting, drains (--drain-grace) and exits,
leaving the pins and enrollments to the new one; a second agent that cannot take over
(--no-handoff, a refusal) exits at once, naming the running one's pid, without
touching its pins, pods, sockets or files.

With --cleanup it removes everything Ferry put in the kernel and exits (refusing while
an agent runs); given --state and --node, also the iptables capture rules in the node's
pods.`,
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
			// Not the signal's context: told to stop, the agent goes on serving until a
			// new one takes over or --handoff-wait passes, and then drains.
			if err := a.Start(context.WithoutCancel(cmd.Context())); err != nil {
				return err
			}
			return serve(cmd.Context(), a, cfg, exitAfterDrain, log)
		},
	}
	f := cmd.Flags()
	cfg.Flags(f)
	f.BoolVar(&cleanup, "cleanup", false, "remove everything Ferry put in the kernel and exit")
	f.BoolVar(&mountBPFFS, "mount-bpffs", false, "mount bpffs for --bpf-pin-dir where none is, create the folder, and exit (the DaemonSet's init container)")
	f.BoolVar(&exitAfterDrain, "exit-after-drain", exitAfterDrain, "exit once the connections are drained after a new agent took the listeners over; false waits for SIGTERM (under a supervisor that restarts exited agents, the kubelet)")
	f.TextVar(&logLevel, "log-level", slog.LevelInfo, "debug, info, warn or error")
	cmd.SetArgs(args)
	return cmd.ExecuteContext(ctx)
}

// serve runs the started agent until it is told to stop or a new agent takes its
// listeners over. Told to stop, it first gives a new agent started beside it (a
// restart) --handoff-wait to take over. Once one has, it drains for at most
// --drain-grace and exits leaving the pins, links and enrollments to the new one.
func serve(ctx context.Context, a *agent.Agent, cfg agent.Config, exitAfterDrain bool, log *slog.Logger) error {
	handed := false
	select {
	case <-ctx.Done():
		log.Info("stopping")
		if a.CanHandOff() && cfg.HandoffWait > 0 {
			log.Info("serving on until a new agent takes over", "handoff_wait", cfg.HandoffWait)
			t := time.NewTimer(cfg.HandoffWait)
			select {
			case <-a.HandedOff():
				handed = true
			case <-t.C:
			}
			t.Stop()
		}
	case <-a.HandedOff():
		handed = true
	}
	if !handed {
		// The signal ended ctx; stopping still waits for what it must.
		return a.Stop(context.WithoutCancel(ctx))
	}
	start := time.Now()
	drainCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cfg.DrainGrace)
	a.Drain(drainCtx)
	cancel()
	log.Info("drained after the handoff", "took", time.Since(start).Round(time.Millisecond))
	if !exitAfterDrain {
		<-ctx.Done()
	}
	// What is left past the grace is cut when the process exits; Stop gets a short
	// while for the rest.
	stopCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- a.Stop(stopCtx) }()
	select {
	case err := <-done:
		return err
	case <-stopCtx.Done():
		log.Warn("connections still open past the drain grace; exiting")
		return nil
	}
}
