// This file holds `ferry lab`: build, inspect and tear down the one-machine lab, run
// commands in its pods, and the built-in echo workloads.

package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/ferrymesh/ferry/internal/listener"
	"github.com/ferrymesh/ferry/lab"
	"github.com/ferrymesh/ferry/lab/echo"
	"github.com/spf13/cobra"
)

// labFlags are the flags every lab subcommand shares.
type labFlags struct {
	prefix   string
	stateDir string
}

func (f *labFlags) dir() string {
	if f.stateDir != "" {
		return f.stateDir
	}
	return lab.StateDirFor(f.prefix)
}

// load reattaches to the lab the flags name; it needs root.
func (f *labFlags) load() (*lab.Lab, error) {
	if err := requireRoot(); err != nil {
		return nil, err
	}
	return lab.LoadDir(f.dir())
}

func newLabCommand() *cobra.Command {
	f := &labFlags{}
	cmd := &cobra.Command{
		Use:   "lab",
		Short: "Run a whole Ferry cluster on this machine, in network namespaces",
		Long: `The lab simulates a cluster on one Linux machine: each node is a network namespace
with a bridge for its pods, each pod is a network namespace with a veth to its node, and
the nodes share a fabric bridge in one more namespace. Each node has a cgroup v2 that
holds its agent and its pods' processes. Nothing is routed from the host: lab traffic
never leaves these namespaces. Service names (NAME.NAMESPACE.svc.cluster.local, and the
short forms a pod's search list allows) resolve in the pods through the lab's DNS on each
node's pod gateway (see 'ferry lab dns').

Everything the lab creates is named after --prefix, so 'ferry lab up' and
'ferry lab down' also remove what a crashed run left.`,
		Example: `  sudo ferry lab up
  sudo ferry lab status
  sudo ferry lab exec c -- ferry lab echo-server --listen :8080 &
  sudo ferry lab exec a -- ferry lab echo-client --to 10.100.2.10:8080
  sudo ferry lab down`,
	}
	cmd.PersistentFlags().StringVar(&f.prefix, "prefix", lab.DefaultPrefix, "name prefix of the lab's namespaces, cgroups and pin folders")
	cmd.PersistentFlags().StringVar(&f.stateDir, "state-dir", "", "lab state folder (default /run/ferry-lab/<prefix>)")
	cmd.AddCommand(
		newLabUpCommand(f),
		newLabDownCommand(f),
		newLabStatusCommand(f),
		newLabExecCommand(f),
		newLabEchoServerCommand(),
		newLabEchoClientCommand(),
		newLabDemoCommand(f),
		newLabDNSCommand(f),
		newLabRestartAgentCommand(f),
		newLabUpgradeAgentCommand(f),
		newLabImpairCommand(f),
	)
	return cmd
}

func requireRoot() error {
	if os.Geteuid() != 0 {
		return lab.ErrNotRoot
	}
	return nil
}

func newLabUpCommand(f *labFlags) *cobra.Command {
	var (
		configFile  string
		nodes       []string
		agent       string
		operatorBin string
		agentArgs   []string
		trustDomain string
		waitReady   time.Duration
		withDNS     bool
	)
	cmd := &cobra.Command{
		Use:   "up",
		Short: "Build the lab (removing any previous one with the same prefix)",
		Long: `Build the lab: namespaces, bridges, veths, addresses and routes, one cgroup per node,
a mesh CA with a certificate per enrolled pod, and one state file per node. With --agent,
start that agent binary on every node and wait until it answers on its admin socket.

Without --config or --node, the lab has two nodes: node1 with pods a, b (enrolled) and
d (not enrolled), node2 with pod c (enrolled). Node i is 10.99.0.i on the fabric and its
pods are 10.100.i.10, .11, ...

--node NAME=POD[,POD...] describes one node (repeat it for more); a POD is
[NAMESPACE/]NAME[@SERVICEACCOUNT][:out], where :out leaves the pod out of the mesh.
--config reads a JSON lab config instead (the fields of lab.Config).`,
		Example: `  # the default two-node lab, no agents
  sudo ferry lab up

  # with agents
  sudo ferry lab up --agent ./bin/ferry-agent --agent-arg=--log-level=debug

  # with agents fed by the operator in local mode (manifests in <state-dir>/manifests)
  sudo ferry lab up --agent ./bin/ferry-agent --operator ./bin/ferry-operator

  # three nodes; pod web in namespace shop, pod legacy outside the mesh
  sudo ferry lab up --node n1=shop/web,legacy:out --node n2=shop/api@api-sa --node n3=db`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := requireRoot(); err != nil {
				return err
			}
			cfg := lab.DefaultConfig()
			switch {
			case configFile != "" && len(nodes) > 0:
				return errors.New("use --config or --node, not both")
			case configFile != "":
				data, err := os.ReadFile(configFile)
				if err != nil {
					return fmt.Errorf("config: %w", err)
				}
				cfg = lab.Config{}
				dec := json.NewDecoder(strings.NewReader(string(data)))
				dec.DisallowUnknownFields()
				if err := dec.Decode(&cfg); err != nil {
					return fmt.Errorf("config %s: %w", configFile, err)
				}
			case len(nodes) > 0:
				cfg.Nodes = nil
				for _, spec := range nodes {
					n, err := lab.ParseNodeFlag(spec)
					if err != nil {
						return err
					}
					cfg.Nodes = append(cfg.Nodes, n)
				}
			}
			flags := cmd.Flags()
			if flags.Changed("prefix") || cfg.Prefix == "" {
				cfg.Prefix = f.prefix
			}
			if f.stateDir != "" {
				cfg.StateDir = f.stateDir
			}
			if agent != "" {
				cfg.AgentBinary = agent
			}
			if operatorBin != "" {
				cfg.Operator.Binary = operatorBin
			}
			if len(agentArgs) > 0 {
				cfg.AgentArgs = agentArgs
			}
			if trustDomain != "" {
				cfg.TrustDomain = trustDomain
			}
			if withDNS && cfg.DNS.Binary == "" {
				self, err := os.Executable()
				if err != nil {
					return fmt.Errorf("dns: %w", err)
				}
				cfg.DNS.Binary = self
			}
			if !withDNS {
				cfg.DNS = lab.DNSConfig{}
			}
			out := cmd.OutOrStdout()
			log := slog.New(lab.NewProgressHandler(out))
			l, err := lab.Up(cmd.Context(), cfg, log)
			if err != nil {
				return err
			}
			defer l.Close()
			if l.Config().AgentBinary != "" && waitReady > 0 {
				ctx, cancel := context.WithTimeout(cmd.Context(), waitReady)
				defer cancel()
				for _, n := range l.Nodes() {
					log.Info("wait for agent on " + n)
					if err := l.WaitAgentReady(ctx, n); err != nil {
						return fmt.Errorf("%w\nthe lab stays up; remove it with 'ferry lab down --prefix %s'", err, l.Prefix())
					}
				}
			}
			fmt.Fprintln(out)
			printStatus(out, l.Status())
			fmt.Fprintf(out, "\nrun a command in a pod: ferry lab exec %s -- CMD...\nremove the lab:        ferry lab down%s\n",
				l.Pods()[0].Name, prefixFlag(l.Prefix()))
			return nil
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&configFile, "config", "", "JSON lab config file (fields of lab.Config)")
	fl.StringArrayVar(&nodes, "node", nil, "a node and its pods: NAME=[NS/]POD[@SA][:out],... (repeatable)")
	fl.StringVar(&agent, "agent", "", "ferry-agent binary to start on every node")
	fl.StringVar(&operatorBin, "operator", "", "ferry-operator binary to run in local mode on manifests of the lab's pods; agents then get state and certificates from it instead of state files")
	fl.StringArrayVar(&agentArgs, "agent-arg", nil, "extra flag for every agent (repeatable)")
	fl.StringVar(&trustDomain, "trust-domain", "", "SPIFFE trust domain (default cluster.local)")
	fl.DurationVar(&waitReady, "wait", 30*time.Second, "how long to wait for the agents to answer GET /status (0: do not wait)")
	fl.BoolVar(&withDNS, "dns", true, "answer DNS for the Services (NAME.NAMESPACE.svc.cluster.local) on every node's pod gateway and give pod commands a resolv.conf pointing there")
	return cmd
}

func prefixFlag(prefix string) string {
	if prefix == lab.DefaultPrefix {
		return ""
	}
	return " --prefix " + prefix
}

func newLabDownCommand(f *labFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "down",
		Short: "Stop the agents and remove everything the lab created",
		Long: `Stop the agents (SIGTERM, then SIGKILL), run each agent with --cleanup, kill every
process left in the lab's cgroups, and remove the lab's network namespaces, cgroups,
BPF pin folders and state folder. It works on a crashed or half-built lab too, and does
nothing when there is no lab.`,
		Example: `  sudo ferry lab down
  sudo ferry lab down --prefix demo`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := requireRoot(); err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			log := slog.New(lab.NewProgressHandler(out))
			if err := lab.Clean(f.prefix, f.stateDir, log); err != nil {
				return err
			}
			fmt.Fprintf(out, "lab %s is down\n", f.prefix)
			return nil
		},
	}
}

func newLabStatusCommand(f *labFlags) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the lab's nodes, pods, addresses, identities and agents",
		Example: `  sudo ferry lab status
  sudo ferry lab status --json | jq '.pods[] | {name, ip}'`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			l, err := lab.LoadDir(f.dir())
			if err != nil {
				return err
			}
			defer l.Close()
			st := l.Status()
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(st)
			}
			printStatus(cmd.OutOrStdout(), st)
			return nil
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the status as JSON")
	return cmd
}

func printStatus(w io.Writer, st lab.Status) {
	if op := st.Operator; op != nil {
		state := fmt.Sprintf("pid %d running", op.PID)
		if !op.Alive {
			state = fmt.Sprintf("pid %d not running (see %s)", op.PID, op.Log)
		}
		fmt.Fprintf(w, "operator (local mode): %s, manifests in %s\n\n", state, op.Manifests)
	}
	if d := st.DNS; d != nil {
		state := fmt.Sprintf("pid %d running", d.PID)
		if !d.Alive {
			state = fmt.Sprintf("pid %d not running (see %s)", d.PID, d.Log)
		}
		fmt.Fprintf(w, "dns (%s, on each node's pod gateway): %s\n\n", d.Domain, state)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tFABRIC IP\tPOD CIDR\tAGENT")
	for _, n := range st.Nodes {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", n.Name, n.FabricIP, n.PodCIDR, agentState(n))
	}
	tw.Flush()
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tPOD\tNAMESPACE\tIP\tENROLLED\tIDENTITY\tAGENT")
	agents := map[string]string{}
	for _, n := range st.Nodes {
		agents[n.Name] = agentState(n)
	}
	for _, p := range st.Pods {
		id := p.Identity
		if !p.Enrolled {
			id = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%t\t%s\t%s\n", p.Node, p.Name, p.Namespace, p.IP, p.Enrolled, id, agents[p.Node])
	}
	tw.Flush()
}

func agentState(n lab.NodeStatus) string {
	switch {
	case n.AgentPID == 0:
		return "none"
	case n.AgentAlive:
		return fmt.Sprintf("pid %d running", n.AgentPID)
	default:
		return fmt.Sprintf("pid %d exited (see %s)", n.AgentPID, n.AgentLog)
	}
}

func newLabExecCommand(f *labFlags) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "exec POD -- CMD [ARG...]",
		Short: "Run a command in a pod's network namespace and its node's cgroup",
		Long: `Run a command inside a pod: in its network namespace and in its node's cgroup, so
the node's agent sees its sockets. FERRY_LAB_POD, FERRY_LAB_NODE and FERRY_LAB_IP are set.
A CMD of "ferry" runs this very binary when no ferry is on PATH. A failing command makes
ferry exit with status 1.`,
		Example: `  sudo ferry lab exec a -- curl -s http://10.100.2.10:8080/
  sudo ferry lab exec c -- ferry lab echo-server --listen :8080 --http
  sudo ferry lab exec a -- ferry lab echo-client --to 10.100.2.10:8080 --bytes 100MiB
  sudo ferry lab exec b -- sh`,
		Args: cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			l, err := f.load()
			if err != nil {
				return err
			}
			defer l.Close()
			pod, command := args[0], args[1:]
			// With interspersed flags off, cobra leaves the "--" in place.
			if command[0] == "--" {
				command = command[1:]
			}
			if len(command) == 0 {
				return errors.New("no command: ferry lab exec POD -- CMD [ARG...]")
			}
			name, rest := command[0], command[1:]
			if _, ok := l.Pod(pod); !ok {
				var names []string
				for _, p := range l.Pods() {
					names = append(names, p.Name)
				}
				return fmt.Errorf("no pod %q in lab %s (pods: %s)", pod, l.Prefix(), strings.Join(names, ", "))
			}
			if name == "ferry" {
				if _, err := exec.LookPath(name); err != nil {
					if self, err := os.Executable(); err == nil {
						name = self
					}
				}
			}
			c := l.Command(cmd.Context(), pod, name, rest...)
			c.Stdin, c.Stdout, c.Stderr = os.Stdin, cmd.OutOrStdout(), cmd.ErrOrStderr()
			if err := c.Run(); err != nil {
				return fmt.Errorf("%s in pod %s: %w", filepath.Base(name), pod, err)
			}
			return nil
		},
	}
	// Everything after POD belongs to the command, even without "--".
	cmd.Flags().SetInterspersed(false)
	return cmd
}

func newLabEchoServerCommand() *cobra.Command {
	var (
		listen     string
		banner     string
		httpMode   bool
		grpcMode   bool
		failStatus int
		delay      time.Duration
	)
	cmd := &cobra.Command{
		Use:   "echo-server",
		Short: "Serve TCP echo (or a tiny HTTP server) until interrupted",
		Long: `Serve on --listen until interrupted. In echo mode every byte is copied back, and when
the client closes its side the server finishes echoing and closes its own (half-close).
--banner makes the server speak first. --http serves /echo (the request body),
/bytes?n=N (N pattern bytes), / (JSON with the pod and the client's address), and for
traffic tests: /fail?percent=P&code=C (C for P% of the requests, spread evenly),
/delay/DURATION, /request/... (the request as the app saw it, JSON) and /stats
(requests and client cancellations per "tag" query parameter); every answer names the
pod in the header Ferry-Lab-Pod. --fail-status and --delay make the whole server fail
or slow. --grpc serves the gRPC health service, naming the pod in the response header
ferry-lab-pod. The listener does not use MPTCP, like every listener Ferry opens.`,
		Example: `  sudo ferry lab exec c -- ferry lab echo-server --listen :8080
  sudo ferry lab exec c -- ferry lab echo-server --listen :8081 --banner "hello from c"
  sudo ferry lab exec b -- ferry lab echo-server --listen :80 --http
  sudo ferry lab exec b -- ferry lab echo-server --listen :8082 --grpc
  sudo ferry lab exec e -- ferry lab echo-server --listen :8083 --http --fail-status 500`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			lc := listener.Config()
			ln, err := lc.Listen(cmd.Context(), "tcp", listen)
			if err != nil {
				return fmt.Errorf("listen: %w", err)
			}
			opts := echo.Options{Banner: banner, Pod: os.Getenv("FERRY_LAB_POD"), FailStatus: failStatus, Delay: delay}
			mode := "echo"
			switch {
			case httpMode && grpcMode:
				return errors.New("--http and --grpc: pick one")
			case !httpMode && (failStatus != 0 || delay != 0):
				return errors.New("--fail-status and --delay need --http")
			case failStatus != 0 && (failStatus < 200 || failStatus > 599):
				return fmt.Errorf("--fail-status %d: want a status from 200 to 599", failStatus)
			case httpMode:
				opts.Mode, mode = echo.ModeHTTP, "http"
			case grpcMode:
				opts.Mode, mode = echo.ModeGRPC, "grpc"
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s server listening on %s\n", mode, ln.Addr())
			return echo.Serve(cmd.Context(), ln, opts)
		},
	}
	cmd.Flags().StringVar(&listen, "listen", ":8080", "address to listen on")
	cmd.Flags().StringVar(&banner, "banner", "", "text sent to each client on accept, before reading")
	cmd.Flags().BoolVar(&httpMode, "http", false, "serve HTTP instead of raw echo")
	cmd.Flags().BoolVar(&grpcMode, "grpc", false, "serve the gRPC health service instead of raw echo")
	cmd.Flags().IntVar(&failStatus, "fail-status", 0, "with --http: answer every request with this status (an endpoint that keeps failing)")
	cmd.Flags().DurationVar(&delay, "delay", 0, "with --http: hold every answer back this long (an endpoint slower than its peers)")
	return cmd
}

func newLabEchoClientCommand() *cobra.Command {
	var (
		to      string
		size    string
		conns   int
		banner  string
		seed    uint64
		timeout time.Duration

		roundTrips int
		grpcCalls  int
	)
	cmd := &cobra.Command{
		Use:   "echo-client",
		Short: "Send a pattern to an echo server and verify every byte that comes back",
		Long: `Open --conns connections to an echo server, send --bytes of a deterministic pattern on
each while reading the echo back, and check it byte for byte, including that the server
closes after echoing everything. Prints bytes, duration, throughput and the result; a
mismatch names the first differing offset.

With --round-trips N it measures latency instead: one connection, N request-response
round trips of --bytes each, and prints the connect time and the percentiles.`,
		Example: `  sudo ferry lab exec a -- ferry lab echo-client --to 10.100.2.10:8080
  sudo ferry lab exec a -- ferry lab echo-client --to 10.100.2.10:8080 --round-trips 10000 --bytes 64
  sudo ferry lab exec a -- ferry lab echo-client --to 10.100.1.11:8080 --bytes 1GiB --conns 8
  sudo ferry lab exec a -- ferry lab echo-client --to 10.100.2.10:8081 --banner "hello from c"
  sudo ferry lab exec a -- ferry lab echo-client --to 10.96.0.52:80 --grpc-calls 6`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if to == "" {
				return errors.New("--to IP:PORT is required")
			}
			n, err := echo.ParseSize(size)
			if err != nil {
				return fmt.Errorf("--bytes %q: %w", size, err)
			}
			if conns < 1 {
				return errors.New("--conns must be at least 1")
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
			defer cancel()
			if roundTrips > 0 {
				return echo.MeasureRoundTrips(ctx, cmd.OutOrStdout(), to, roundTrips, n)
			}
			if grpcCalls > 0 {
				return echo.GRPCCalls(ctx, cmd.OutOrStdout(), to, grpcCalls)
			}
			return echo.Run(ctx, cmd.OutOrStdout(), echo.Load{To: to, Bytes: n, Conns: conns, Banner: banner, Seed: seed})
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&to, "to", "", "echo server address IP:PORT")
	fl.StringVar(&size, "bytes", "10MiB", "bytes to send per connection (suffixes KiB, MiB, GiB, KB, MB, GB)")
	fl.IntVar(&conns, "conns", 1, "parallel connections")
	fl.StringVar(&banner, "banner", "", "banner the server sends first, checked before sending")
	fl.Uint64Var(&seed, "seed", 0, "pattern seed (connection i uses seed+i)")
	fl.DurationVar(&timeout, "timeout", 5*time.Minute, "give up after this long")
	fl.IntVar(&roundTrips, "round-trips", 0, "measure latency: this many request-response round trips of --bytes")
	fl.IntVar(&grpcCalls, "grpc-calls", 0, "instead of echo: this many gRPC health checks over one channel to a --grpc server; prints which pods answered")
	return cmd
}

func newLabDemoCommand(f *labFlags) *cobra.Command {
	var agentBin, demoOperator string
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Bring up the default lab with agents, send traffic between pods, show what crossed the mesh",
		Long: `The demo (what 'make demo' runs): build the default two-node lab with an agent on
each node, start echo servers (TCP, HTTP, gRPC) in every pod, send 1 MiB across nodes
(a → c, mTLS tunnel), on one node (a → b), into the mesh from a pod outside it (d → c),
out of the mesh (a → d) and twice to Service web (10.96.0.50, TCP); then 6 curl
requests on one connection to Service api (10.96.0.51, HTTP) and 6 gRPC calls on one
channel to Service rpc (10.96.0.52), each balanced per request over b and c; and print
what the agents carried: how, between which identities, and how many bytes. The lab
stays up afterwards so you can look around.`,
		Example: `  sudo ferry lab demo --agent ./bin/ferry-agent
  sudo ferry lab status
  sudo ferry lab down`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := requireRoot(); err != nil {
				return err
			}
			self, err := os.Executable()
			if err != nil {
				return err
			}
			if agentBin == "" {
				agentBin = filepath.Join(filepath.Dir(self), "ferry-agent")
			}
			if _, err := os.Stat(agentBin); err != nil {
				return fmt.Errorf("agent binary: %w (build it with 'make build' or pass --agent)", err)
			}
			if !cmd.Flags().Changed("operator") {
				// The demo runs the control plane too when it was built alongside.
				if p := filepath.Join(filepath.Dir(self), "ferry-operator"); fileExists(p) {
					demoOperator = p
				}
			}
			cfg := lab.DefaultConfig()
			cfg.Prefix, cfg.StateDir, cfg.AgentBinary = f.prefix, f.stateDir, agentBin
			cfg.Operator.Binary = demoOperator
			cfg.Services = lab.DemoServices
			cfg.DNS.Binary = self
			out := cmd.OutOrStdout()
			log := slog.New(lab.NewProgressHandler(out))
			l, err := lab.Up(cmd.Context(), cfg, log)
			if err != nil {
				return err
			}
			defer l.Close()
			ctx, cancel := context.WithTimeout(cmd.Context(), 30*time.Second)
			defer cancel()
			for _, n := range l.Nodes() {
				log.Info("wait for agent on " + n)
				if err := l.WaitAgentReady(ctx, n); err != nil {
					return err
				}
			}
			if err := l.Demo(cmd.Context(), self, log, out); err != nil {
				return fmt.Errorf("%w\nthe lab stays up; agent logs are in %s", err, l.Status().StateDir)
			}
			fmt.Fprintf(out, "\nThe flows, as 'ferry observe --lab %s --last 20 -o table' shows them:\n", l.Prefix())
			if err := printLabFlows(cmd.Context(), out, l.Prefix(), 20); err != nil {
				log.Warn("flows: " + err.Error())
			}
			fmt.Fprintln(out)
			printStatus(out, l.Status())
			pin := filepath.Join(lab.BPFRoot, l.Prefix()+"-node1")
			fmt.Fprintf(out, `
The lab stays up. Try:
  %[1]s lab exec a -- %[1]s lab echo-client --to 10.100.2.10:%[2]d --bytes 10MiB
  %[1]s bpf progs --pin-dir %[3]s
  %[1]s bpf maps --pin-dir %[3]s
  %[1]s observe --lab %[5]s -f          (flows as they happen)
  %[1]s ui --lab %[5]s                  (service map and flows on http://127.0.0.1:8099/)
  %[1]s check --lab %[5]s
  %[1]s lab down%[4]s
`, self, lab.DemoPort, pin, prefixFlag(l.Prefix()), l.Prefix())
			return nil
		},
	}
	cmd.Flags().StringVar(&agentBin, "agent", "", "ferry-agent binary (default: next to this ferry binary)")
	cmd.Flags().StringVar(&demoOperator, "operator", "", "ferry-operator binary run in local mode (default: next to this ferry binary if there; \"\" for state files)")
	return cmd
}

func newLabDNSCommand(f *labFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "dns",
		Short: "Answer DNS for the lab's Services (ferry lab up runs it)",
		Long: `Answer DNS queries for the lab's zone, cluster.local, on port 53 (UDP and TCP) of
every node's pod gateway, inside the node's network namespace, until stopped.
NAME.NAMESPACE.svc.cluster.local is a Service's cluster IP (A; AAAA for IPv6 ones); an
unknown name in the zone is NXDOMAIN, and a name outside it is REFUSED at once: nothing is
forwarded off the machine. 'ferry lab up' starts it (unless --dns=false) and 'ferry lab
down' stops it; the pods' resolv.conf point at it with the search list of their namespace.`,
		Example: `  sudo ferry lab exec a -- getent hosts web.default.svc.cluster.local
  sudo ferry lab exec a -- ferry lab echo-client --to web.default:80`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			l, err := f.load()
			if err != nil {
				return err
			}
			defer l.Close()
			log := slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), nil))
			return l.ServeDNS(cmd.Context(), log)
		},
	}
}

func newLabUpgradeAgentCommand(f *labFlags) *cobra.Command {
	var (
		timeout time.Duration
		noWait  bool
		asJSON  bool
	)
	cmd := &cobra.Command{
		Use:   "upgrade-agent NODE",
		Short: "Start a second agent beside NODE's running one, which takes its listeners over",
		Long: `Upgrade NODE's agent the way a DaemonSet with maxSurge 1 does: start a second agent
with the running one's command line, in the node's network namespace and cgroup, beside
it. The new agent finds the node's lock held, asks the running one over handoff.sock in
its state folder for its listening sockets and locks, serves on them, and tells it so;
only then does the old agent stop accepting, drain its connections (--drain-grace) and
exit, leaving the pins, links and enrollments to the new one. No new connection meets
a closed listener.

Prints the time until the new agent serves and until the old one exited (it exits as
soon as the connections it carries have ended).`,
		Example: `  sudo ferry lab upgrade-agent node1
  sudo ferry lab upgrade-agent node2 --no-wait --json`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			l, node, err := f.loadNode(args[0])
			if err != nil {
				return err
			}
			defer l.Close()
			ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
			defer cancel()
			u, err := l.UpgradeAgent(ctx, node, 0, !noWait)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if asJSON {
				enc := json.NewEncoder(out)
				enc.SetIndent("", "  ")
				return enc.Encode(u)
			}
			fmt.Fprintf(out, "agent on %s: pid %d serving after %s", node, u.NewPID, u.Serving.Round(time.Millisecond))
			switch {
			case noWait:
				fmt.Fprintf(out, "; pid %d drains\n", u.OldPID)
			case u.Exited == 0:
				fmt.Fprintf(out, "; pid %d still drains after %s\n", u.OldPID, timeout)
			default:
				fmt.Fprintf(out, "; pid %d drained and exited after %s\n", u.OldPID, u.Exited.Round(time.Millisecond))
			}
			return nil
		},
	}
	cmd.Flags().DurationVar(&timeout, "timeout", time.Minute, "how long to wait for the new agent to serve and the old one to exit")
	cmd.Flags().BoolVar(&noWait, "no-wait", false, "return once the new agent serves, leaving the old one draining")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the pids and timings as JSON")
	return cmd
}

func newLabRestartAgentCommand(f *labFlags) *cobra.Command {
	var (
		signal  string
		timeout time.Duration
		asJSON  bool
	)
	cmd := &cobra.Command{
		Use:   "restart-agent NODE",
		Short: "Restart one node's agent the way a supervisor would",
		Long: `Restart NODE's agent as a supervisor (the kubelet, systemd) does: send it a signal,
wait for it to exit, and start the same command line again at once, in the node's
network namespace and cgroup, with the same flags (those the lab gives every agent and
any the running one was started with beyond them). Then wait until the new agent answers
on its admin socket, and print how long the node was without one.

--signal TERM is a rolling restart: the new agent starts beside the old one and takes
its listeners over (see upgrade-agent), then the old one gets SIGTERM, drains and exits;
--signal KILL is a crash: the new agent starts once the old one is gone.
A node whose agent is not running has it started. The agent's output goes on to
<state-dir>/<node>/agent.log.`,
		Example: `  sudo ferry lab restart-agent node1
  sudo ferry lab restart-agent node2 --signal KILL
  for i in $(seq 10); do sudo ferry lab restart-agent node1 --signal KILL; done`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			sig, err := parseSignal(signal)
			if err != nil {
				return err
			}
			l, node, err := f.loadNode(args[0])
			if err != nil {
				return err
			}
			defer l.Close()
			ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
			defer cancel()
			r, err := l.RestartAgent(ctx, node, sig)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if asJSON {
				enc := json.NewEncoder(out)
				enc.SetIndent("", "  ")
				return enc.Encode(r)
			}
			if r.OldPID == 0 {
				fmt.Fprintf(out, "agent on %s was not running; started pid %d, ready after %s\n", node, r.NewPID, r.Ready.Round(time.Millisecond))
				return nil
			}
			fmt.Fprintf(out, "agent on %s: pid %d stopped (%s) in %s, pid %d ready %s after the signal\n",
				node, r.OldPID, signalName(sig), r.Stopped.Round(time.Millisecond), r.NewPID, r.Ready.Round(time.Millisecond))
			return nil
		},
	}
	cmd.Flags().StringVar(&signal, "signal", "TERM", "signal that stops the running agent: TERM (a rolling restart) or KILL (a crash)")
	cmd.Flags().DurationVar(&timeout, "timeout", 30*time.Second, "how long to wait for the new agent to be ready")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the pids and timings as JSON")
	return cmd
}

func signalName(sig syscall.Signal) string {
	if sig == syscall.SIGKILL {
		return "SIGKILL"
	}
	return "SIGTERM"
}

// loadNode loads the lab and checks it has node.
func (f *labFlags) loadNode(node string) (*lab.Lab, string, error) {
	l, err := f.load()
	if err != nil {
		return nil, "", err
	}
	if !slices.Contains(l.Nodes(), node) {
		l.Close()
		return nil, "", fmt.Errorf("no node %q in lab %s (nodes: %s)", node, l.Prefix(), strings.Join(l.Nodes(), ", "))
	}
	return l, node, nil
}

// parseSignal reads restart-agent's --signal: TERM or KILL, with or without SIG.
func parseSignal(s string) (syscall.Signal, error) {
	switch strings.TrimPrefix(strings.ToUpper(s), "SIG") {
	case "TERM":
		return syscall.SIGTERM, nil
	case "KILL":
		return syscall.SIGKILL, nil
	}
	return 0, fmt.Errorf("--signal %q: want TERM or KILL", s)
}

func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}
