package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/ferrymesh/ferry/bench"
	"github.com/ferrymesh/ferry/internal/listener"
	"github.com/spf13/cobra"
)

func newBenchCommand() *cobra.Command {
	var (
		quick            bool
		out              string
		agentBin, fortio string
		reps             int
		duration, warmup time.Duration
		verbose          bool
		only, scenarios  []string
		profile          bool
	)
	cmd := &cobra.Command{
		Use:   "bench",
		Short: "Measure Ferry beside no mesh and an HAProxy pair, in one run, and write a table and plots",
		Long: `Bring up a benchmark lab (prefix bn, pods in 10.104.0.0/16, two nodes) and measure,
in one run, alternating and repeated:

  no mesh (pod to pod), across nodes and on one node      the floor
  an HAProxy pair doing mTLS (client cert), both places   the peer
  Ferry (eBPF capture, sockmap fast path), both places
  Ferry with --fast-path=false, both places
  the same through Service ports declared tcp             HTTP/2, gRPC only: Ferry at L4
  Ferry with --capture=iptables, both places
  Go crypto/tls pod to pod, no mesh, both places          bulk only: the TLS bound

with fortio (HTTP/1.1 keep-alive at fixed rates with p50/p90/p99/p99.9, maximum
req/s, one new connection per request; 1 KiB and 10 KiB), bulk TCP throughput,
HTTP/2 with h2load (h2c, 4 connections × 100 streams, after 1 s of its own
warm-up; maximum req/s, and 1,000 req/s in the full run) and gRPC with fortio's ping service (unary, 1 KiB; 1,000
calls/s and maximum, 3,000 calls/s in the full run), plus the proxies' CPU seconds
per 1,000 requests and peak RSS, small request-response exchanges (rr-small: 64
connections, 16-byte request, 64-byte reply, one at a time), and each agent's RSS
and vCPU per 1,000 req/s during the 1,000 req/s run. Load generators and servers run on CPU 0, proxies
on CPU 1.

For HTTP/2 and gRPC the HAProxy pair works at L7 (mode http, h2 over mTLS), and
Ferry's client dials a Service cluster IP whose port declares its protocol
(appProtocol kubernetes.io/h2c or grpc); each Ferry row says whether Ferry carried
it at L7 or at L4, as the client node's connection records say. The rows through
ports declared tcp give Ferry's L4 figure for the same workloads, so L7 and L4 sit
side by side in one run. The quick run measures HTTP/2 and gRPC in the no-mesh,
HAProxy and --fast-path=false scenarios only; the full run in all.

It writes report.md (medians, spread, ratios to no mesh and to the HAProxy pair),
samples.json and latency.png, throughput.png under --out, and prints the report;
the report and the end of the run list issue 14's goals, held or missed, and the
goal figures are appended to results/history.tsv (ferry bench history prints them).
--quick takes about 6 minutes, the full run about 30. Needs root, haproxy, h2load,
iptables and taskset (make deps), ferry-agent and fortio binaries (make bench builds
them).`,
		Example: `  # what make bench QUICK=1 runs
  sudo ferry bench --quick --agent bin/ferry-agent --fortio bin/fortio

  # the full run, results in a folder of your choice
  sudo ferry bench --out results/before-change

  # a custom run: 5 repetitions of 10 s
  sudo ferry bench --reps 5 --duration 10s

  # one workload in three scenarios, with the agents' CPU profiles
  sudo ferry bench --quick --only rr-small --scenarios nomesh-x,haproxy-x,ferry-x --profile`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if os.Geteuid() != 0 {
				return errors.New("ferry bench needs root (network namespaces, eBPF, iptables)")
			}
			self, err := os.Executable()
			if err != nil {
				return err
			}
			if agentBin == "" {
				agentBin = filepath.Join(filepath.Dir(self), "ferry-agent")
			}
			if fortio == "" {
				fortio = filepath.Join(filepath.Dir(self), "fortio")
				if _, err := os.Stat(fortio); err != nil {
					if p, lerr := exec.LookPath("fortio"); lerr == nil {
						fortio = p
					} else {
						return fmt.Errorf("no fortio next to ferry or in $PATH: build it with `go build -o bin/ fortio.org/fortio` (make bench does)")
					}
				}
			}
			if out == "" {
				out = filepath.Join("results", time.Now().UTC().Format("20060102-150405"))
			}
			plan := bench.NewPlan(quick)
			if reps > 0 {
				plan.Reps = reps
			}
			if duration > 0 {
				plan.Duration = duration
			}
			if cmd.Flags().Changed("warmup") {
				plan.Warmup = warmup
			}
			if err := plan.Select(only, scenarios); err != nil {
				return err
			}
			level := slog.LevelWarn
			if verbose {
				level = slog.LevelInfo
			}
			w := cmd.OutOrStdout()
			fmt.Fprintf(w, "bench: %d scenarios, %d workloads, %d runs of %s (%d repetitions); results in %s\n",
				len(plan.Scenarios), len(plan.Workloads), plan.Runs(), plan.Duration, plan.Reps, out)
			res, err := bench.Run(cmd.Context(), bench.Config{
				Plan:         plan,
				Out:          out,
				FerryBinary:  self,
				AgentBinary:  agentBin,
				FortioBinary: fortio,
				Profile:      profile,
				Progress:     w,
				Log:          slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})),
			})
			if err != nil {
				return err
			}
			report, err := bench.Save(out, res)
			if err != nil {
				return err
			}
			md, err := os.ReadFile(report)
			if err != nil {
				return err
			}
			goals := bench.Goals(res)
			fmt.Fprintf(w, "\n%s\nbench: wrote %s, %s, %s, %s\n", md, report,
				filepath.Join(out, "samples.json"), filepath.Join(out, "latency.png"), filepath.Join(out, "throughput.png"))
			fmt.Fprintf(w, "\nIssue 14 goals:\n")
			if err := bench.WriteGoalsText(w, goals); err != nil {
				return err
			}
			commit, dirty := gitCommit()
			if err := bench.AppendHistory(bench.HistoryFile, bench.HistoryRows(res, goals, commit, dirty)); err != nil {
				return err
			}
			fmt.Fprintf(w, "bench: appended %d goal rows to %s (ferry bench history prints them)\n", len(goals), bench.HistoryFile)
			return nil
		},
	}
	f := cmd.Flags()
	f.BoolVar(&quick, "quick", false, "the short run (3 repetitions of 1 s; about 6 minutes)")
	f.StringVar(&out, "out", "", "results folder (default results/<UTC date-time>)")
	f.StringVar(&agentBin, "agent", "", "ferry-agent binary (default: next to this ferry binary)")
	f.StringVar(&fortio, "fortio", "", "fortio binary (default: next to this ferry binary, then $PATH)")
	f.IntVar(&reps, "reps", 0, "repetitions (default 4, or 3 with --quick)")
	f.DurationVar(&duration, "duration", 0, "length of each workload run (default 3s, or 1s with --quick)")
	f.DurationVar(&warmup, "warmup", 0, "light traffic before each scenario (default 1s, or 300ms with --quick)")
	f.BoolVar(&verbose, "verbose", false, "log the lab's steps")
	f.BoolVar(&profile, "profile", false, "fetch a CPU profile from each agent (/debug/pprof/profile on its admin socket) during the first repetition of each max-rate Ferry run; writes profiles/<scenario>-<workload>-<node>.pprof and .top.txt")
	f.StringSliceVar(&only, "only", nil, "measure only these workloads (keys, e.g. rr-small,http-1k-1000)")
	f.StringSliceVar(&scenarios, "scenarios", nil, "measure only these scenarios (keys, e.g. nomesh-x,haproxy-x,ferry-x)")
	cmd.AddCommand(newBenchSinkCommand(), newBenchSendCommand(), newBenchRRServerCommand(), newBenchRRClientCommand(), newBenchHistoryCommand())
	return cmd
}

// newBenchRRServerCommand is the small request-response server the harness runs in pods.
func newBenchRRServerCommand() *cobra.Command {
	var listen string
	cmd := &cobra.Command{
		Use:     "rr-server",
		Short:   "Answer every 16-byte request with a 64-byte reply (the small request-response server)",
		Example: `  sudo ferry lab exec c -- ferry bench rr-server --listen :5202`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			lc := listener.Config()
			ln, err := lc.Listen(cmd.Context(), "tcp", listen)
			if err != nil {
				return fmt.Errorf("listen: %w", err)
			}
			return bench.RRServe(cmd.Context(), ln)
		},
	}
	cmd.Flags().StringVar(&listen, "listen", ":5202", "address to listen on")
	return cmd
}

// newBenchRRClientCommand is the small request-response client the harness runs in pods.
func newBenchRRClientCommand() *cobra.Command {
	var (
		to    string
		conns int
		d     time.Duration
	)
	cmd := &cobra.Command{
		Use:   "rr-client",
		Short: "Do 16-byte request / 64-byte reply exchanges, one at a time per connection, as fast as possible; print exchanges and p50/p99 as JSON",
		Example: `  sudo ferry lab exec a -- ferry bench rr-client --to 10.100.2.10:5202 --conns 64 --duration 5s
  {"exchanges":412345,"seconds":5.0011,"p50_ms":0.71,"p99_ms":2.3}`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if to == "" {
				return errors.New("--to IP:PORT is required")
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), d+10*time.Second)
			defer cancel()
			res, err := bench.RRLoad(ctx, to, conns, d)
			if err != nil {
				return err
			}
			return bench.WriteRRResult(cmd.OutOrStdout(), res)
		},
	}
	cmd.Flags().StringVar(&to, "to", "", "rr-server address IP:PORT")
	cmd.Flags().IntVar(&conns, "conns", 64, "connections, each with one exchange in flight")
	cmd.Flags().DurationVar(&d, "duration", 5*time.Second, "how long to run")
	return cmd
}

// newBenchHistoryCommand prints the goal rows every run appended to the history file.
func newBenchHistoryCommand() *cobra.Command {
	var file, goal string
	cmd := &cobra.Command{
		Use:   "history",
		Short: "Print the goal figures of past benchmark runs (results/history.tsv) as a table",
		Example: `  ferry bench history
  ferry bench history --goal rr-small`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			f, err := os.Open(file)
			if err != nil {
				return fmt.Errorf("history: %w", err)
			}
			defer f.Close()
			rows, err := bench.ReadHistory(f)
			if err != nil {
				return err
			}
			return bench.WriteHistoryTable(cmd.OutOrStdout(), rows, goal)
		},
	}
	cmd.Flags().StringVar(&file, "file", bench.HistoryFile, "history file")
	cmd.Flags().StringVar(&goal, "goal", "", "only goals whose key contains this")
	return cmd
}

// newBenchSinkCommand is the bulk-throughput server the harness runs in pods.
func newBenchSinkCommand() *cobra.Command {
	var (
		listen string
		files  bench.TLSFiles
	)
	cmd := &cobra.Command{
		Use:   "tcp-sink",
		Short: "Accept TCP (or, with --cert, mutual TLS) connections and discard what they send (the bulk-throughput server)",
		Example: `  sudo ferry lab exec c -- ferry bench tcp-sink --listen :5201
  sudo ferry lab exec c -- ferry bench tcp-sink --listen :5203 --cert c.crt --key c.key --ca root.pem`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			tlsCfg, err := files.TLSConfig(true)
			if err != nil {
				return err
			}
			lc := listener.Config()
			ln, err := lc.Listen(cmd.Context(), "tcp", listen)
			if err != nil {
				return fmt.Errorf("listen: %w", err)
			}
			if tlsCfg != nil {
				ln = tls.NewListener(ln, tlsCfg)
			}
			return bench.Sink(cmd.Context(), ln)
		},
	}
	cmd.Flags().StringVar(&listen, "listen", ":5201", "address to listen on")
	tlsFlags(cmd, &files, "the sink's")
	return cmd
}

// tlsFlags registers the certificate flags of tcp-sink and tcp-send.
func tlsFlags(cmd *cobra.Command, f *bench.TLSFiles, whose string) {
	cmd.Flags().StringVar(&f.Cert, "cert", "", whose+" certificate (PEM); with --key and --ca, speak TLS 1.3 with crypto/tls and require the peer's certificate")
	cmd.Flags().StringVar(&f.Key, "key", "", whose+" private key (PEM)")
	cmd.Flags().StringVar(&f.CA, "ca", "", "CA certificate (PEM) the peer's certificate must chain to")
	cmd.MarkFlagsRequiredTogether("cert", "key", "ca")
}

// newBenchSendCommand is the bulk-throughput client the harness runs in pods.
func newBenchSendCommand() *cobra.Command {
	var (
		to    string
		conns int
		d     time.Duration
		files bench.TLSFiles
	)
	cmd := &cobra.Command{
		Use:   "tcp-send",
		Short: "Send bytes to a tcp-sink as fast as possible for a while and print the total as JSON",
		Example: `  sudo ferry lab exec a -- ferry bench tcp-send --to 10.100.2.10:5201 --duration 5s
  {"bytes":6123683840,"seconds":5.0004}`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if to == "" {
				return errors.New("--to IP:PORT is required")
			}
			if conns < 1 || d <= 0 {
				return errors.New("--conns must be at least 1 and --duration positive")
			}
			tlsCfg, err := files.TLSConfig(false)
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), d+10*time.Second)
			defer cancel()
			res, err := bench.Send(ctx, to, conns, d, tlsCfg)
			if err != nil {
				return err
			}
			return bench.WriteSendResult(cmd.OutOrStdout(), res)
		},
	}
	cmd.Flags().StringVar(&to, "to", "", "sink address IP:PORT")
	cmd.Flags().IntVar(&conns, "conns", 1, "parallel connections")
	cmd.Flags().DurationVar(&d, "duration", 5*time.Second, "how long to send")
	tlsFlags(cmd, &files, "the sender's")
	return cmd
}

// gitCommit is the short commit of the working tree the run is made from and whether
// it has uncommitted changes; "unknown" outside a git checkout.
func gitCommit() (string, bool) {
	out, err := exec.Command("git", "rev-parse", "--short=12", "HEAD").Output()
	if err != nil {
		return "unknown", false
	}
	st, err := exec.Command("git", "status", "--porcelain", "--untracked-files=no").Output()
	return strings.TrimSpace(string(out)), err == nil && len(strings.TrimSpace(string(st))) > 0
}
