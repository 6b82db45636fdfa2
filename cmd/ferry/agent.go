// This file holds `ferry agent`: read a node agent's state through its admin API.

package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/ferrymesh/ferry/api/admin"
	"github.com/ferrymesh/ferry/lab"
	"github.com/spf13/cobra"
)

// defaultAdminSocket is where a node's agent serves its admin API by default.
const defaultAdminSocket = "/run/ferry/agent.sock"

// agentFlags say which agents to ask.
type agentFlags struct {
	socket string
	lab    string
	nodes  []string
	output string
}

// adminTarget is one agent's admin API.
type adminTarget struct {
	node   string
	socket string
}

func (f *agentFlags) targets() ([]adminTarget, error) {
	if f.lab == "" {
		if len(f.nodes) > 0 {
			return nil, errors.New("--node needs --lab")
		}
		return []adminTarget{{node: "", socket: f.socket}}, nil
	}
	l, err := lab.Load(f.lab)
	if err != nil {
		return nil, err
	}
	var out []adminTarget
	for _, n := range l.Status().Nodes {
		if len(f.nodes) == 0 || contains(f.nodes, n.Name) {
			out = append(out, adminTarget{node: n.Name, socket: n.AgentSocket})
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("lab %s has no node %s", f.lab, strings.Join(f.nodes, ", "))
	}
	return out, nil
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func newAgentCommand() *cobra.Command {
	f := &agentFlags{}
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Read a node agent's state: status, workloads, services, routes, certificates, config",
		Long: `Read what a node agent holds, through its admin API on a unix socket (default
` + defaultAdminSocket + `; only root on the node can reach it, pods cannot). Every view names
the version of the state the agent applied and how long ago.

With --lab PREFIX, every agent of the lab is asked (--node picks some).`,
		Example: `  ferry agent status
  ferry agent status --lab fy
  ferry agent workloads --lab fy --node node1
  ferry agent routes --lab fy
  ferry agent certs --socket /run/ferry/agent.sock -o json`,
	}
	pf := cmd.PersistentFlags()
	pf.StringVar(&f.socket, "socket", defaultAdminSocket, "the agent's admin socket")
	pf.StringVar(&f.lab, "lab", "", "ask every agent of the lab with this prefix")
	pf.StringSliceVar(&f.nodes, "node", nil, "with --lab: only these nodes")
	pf.StringVarP(&f.output, "output", "o", "table", "table or json")

	sub := func(use, short, long, example string, show func(ctx context.Context, w io.Writer, c *admin.Client, t adminTarget, json bool) error) *cobra.Command {
		return &cobra.Command{
			Use: use, Short: short, Long: long, Example: example, Args: cobra.NoArgs,
			RunE: func(cmd *cobra.Command, _ []string) error {
				if f.output != "table" && f.output != "json" {
					return fmt.Errorf("unknown output %q: use table or json", f.output)
				}
				ts, err := f.targets()
				if err != nil {
					return err
				}
				var failed []string
				for i, t := range ts {
					w := cmd.OutOrStdout()
					if len(ts) > 1 && f.output == "table" {
						if i > 0 {
							fmt.Fprintln(w)
						}
						fmt.Fprintf(w, "== agent on %s\n", t.node)
					}
					ctx, cancel := context.WithTimeout(cmd.Context(), 10*time.Second)
					err := show(ctx, w, admin.NewClient(t.socket), t, f.output == "json")
					cancel()
					if err != nil {
						name := t.node
						if name == "" {
							name = t.socket
						}
						fmt.Fprintf(cmd.ErrOrStderr(), "ferry agent %s: %s: %v\n", use, name, err)
						failed = append(failed, name)
					}
				}
				if len(failed) > 0 {
					return fmt.Errorf("could not read %d of %d agents (%s)", len(failed), len(ts), strings.Join(failed, ", "))
				}
				return nil
			},
		}
	}
	cmd.AddCommand(
		sub("status", "Show the agent's state version and age, pods, connections and tunnels",
			"Show the agent's node, the version of its state and its age, how many connections and tunnels it carries, and the pods it enrolled with their netns cookies.",
			"  ferry agent status --lab fy", showStatus),
		sub("workloads", "List the mesh workloads the agent knows, and which it enrolled",
			"List every workload of the agent's state: namespace, name, node, addresses and identity; for workloads on the agent's node, whether they are enrolled (captured) and if not, why.",
			"  ferry agent workloads --lab fy --node node2", showWorkloads),
		sub("services", "List the services in the agent's state and their endpoints",
			"List the services the agent was given: cluster IPs, ports and the workloads behind them.",
			"  ferry agent services", showServices),
		sub("routes", "Show the routes and TrafficPolicies the agent applies, and every route's and policy's status",
			routesLong,
			"  ferry agent routes --lab tm --node node1\n  ferry agent routes -o json", showRoutes),
		sub("certs", "Show the local workloads' certificates and the trust bundle",
			"Show, for each identity of a workload on the agent's node, its certificate's serial, issuer and validity, and the CAs the agent trusts.",
			"  ferry agent certs --lab fy", showCerts),
		sub("config", "Show how the agent runs: flags, sockets, BPF pins, state version",
			"Show the agent's configuration as it runs: node, state source and version, sockets, the metrics and Observer addresses, the BPF pin folder, cgroup, mark and fast path.",
			"  ferry agent config -o json", showConfig),
	)
	return cmd
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func showStatus(ctx context.Context, w io.Writer, c *admin.Client, _ adminTarget, asJSON bool) error {
	st, err := c.Status(ctx)
	if err != nil {
		return err
	}
	if asJSON {
		return printJSON(w, st)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "node\t%s\n", st.Node)
	fmt.Fprintf(tw, "state version\t%d (applied %s ago)\n", st.StateVersion, st.StateAge)
	fmt.Fprintf(tw, "uptime\t%s\n", st.Uptime.Round(time.Second))
	fmt.Fprintf(tw, "connections\t%d live\n", st.LiveConns)
	fmt.Fprintf(tw, "tunnels\t%d connections, %d streams\n", st.TunnelConns, st.TunnelStreams)
	fmt.Fprintf(tw, "fast path\t%t\n", st.FastPath)
	fmt.Fprintf(tw, "goroutines, fds\t%d, %d\n", st.Goroutines, st.OpenFDs)
	for _, d := range st.Dropped {
		fmt.Fprintf(tw, "left out of the state\t%s\n", d)
	}
	tw.Flush()
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "POD\tIP\tIDENTITY\tNETNS COOKIE")
	for _, p := range st.Pods {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\n", p.Name, p.IP, p.Identity, p.NetnsCookie)
	}
	if len(st.Pods) == 0 {
		fmt.Fprintln(tw, "(no pods enrolled)\t\t\t")
	}
	return tw.Flush()
}

func showWorkloads(ctx context.Context, w io.Writer, c *admin.Client, _ adminTarget, asJSON bool) error {
	ws, err := c.Workloads(ctx)
	if err != nil {
		return err
	}
	if asJSON {
		return printJSON(w, ws)
	}
	fmt.Fprintf(w, "state version %d, applied %s ago\n", ws.StateVersion, ws.StateAge)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAMESPACE\tNAME\tNODE\tIPS\tIDENTITY\tMTLS\tHERE")
	for _, x := range ws.Workloads {
		here := "-"
		switch {
		case x.Enrolled:
			here = fmt.Sprintf("enrolled (netns %d)", x.NetnsCookie)
		case x.Local && x.Error != "":
			here = "NOT ENROLLED: " + x.Error
		case x.Local:
			here = "not enrolled yet"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", x.Namespace, x.Name, x.Node, strings.Join(x.IPs, ","), x.Identity, x.MTLS, here)
	}
	return tw.Flush()
}

// stateServices is the part of the NodeState JSON `ferry agent services` reads.
type stateServices struct {
	Version  string `json:"version"`
	Services []struct {
		Name       string   `json:"name"`
		Namespace  string   `json:"namespace"`
		ClusterIPs []string `json:"clusterIps"`
		Ports      []struct {
			Name        string `json:"name"`
			Port        uint32 `json:"port"`
			TargetPort  string `json:"targetPort"`
			AppProtocol string `json:"appProtocol"`
		} `json:"ports"`
		Endpoints []string `json:"endpoints"`
	} `json:"services"`
	Workloads []struct {
		UID       string `json:"uid"`
		Name      string `json:"name"`
		Namespace string `json:"namespace"`
	} `json:"workloads"`
}

func showServices(ctx context.Context, w io.Writer, c *admin.Client, _ adminTarget, asJSON bool) error {
	raw, err := c.State(ctx)
	if err != nil {
		return err
	}
	var st stateServices
	if err := json.Unmarshal(raw, &st); err != nil {
		return fmt.Errorf("agent state: %w", err)
	}
	if asJSON {
		return printJSON(w, st.Services)
	}
	names := map[string]string{}
	for _, x := range st.Workloads {
		names[x.UID] = x.Namespace + "/" + x.Name
	}
	if len(st.Services) == 0 {
		fmt.Fprintf(w, "no services in state version %s\n", dash(st.Version))
		return nil
	}
	sort.Slice(st.Services, func(i, j int) bool {
		return st.Services[i].Namespace+"/"+st.Services[i].Name < st.Services[j].Namespace+"/"+st.Services[j].Name
	})
	fmt.Fprintf(w, "state version %s\n", st.Version)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAMESPACE\tNAME\tCLUSTER IPS\tPORTS\tENDPOINTS")
	for _, s := range st.Services {
		var ports, eps []string
		for _, p := range s.Ports {
			txt := fmt.Sprintf("%d→%s", p.Port, dash(p.TargetPort))
			if p.AppProtocol != "" {
				txt += "/" + p.AppProtocol
			}
			ports = append(ports, txt)
		}
		for _, uid := range s.Endpoints {
			if n, ok := names[uid]; ok {
				eps = append(eps, n)
			} else {
				eps = append(eps, uid)
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", s.Namespace, s.Name, dash(strings.Join(s.ClusterIPs, ",")), dash(strings.Join(ports, ",")), dash(strings.Join(eps, ",")))
	}
	return tw.Flush()
}

// certState says whether a certificate is usable now.
func certState(c admin.CertInfo, now time.Time) string {
	switch {
	case c.Error != "":
		return "MISSING: " + c.Error
	case now.Before(c.NotBefore):
		return "NOT YET VALID"
	case now.After(c.NotAfter):
		return "EXPIRED"
	}
	return "valid, expires in " + durationText(c.NotAfter.Sub(now))
}

// durationText is a duration for people: days past two days, else hours and minutes.
func durationText(d time.Duration) string {
	if d >= 48*time.Hour {
		return fmt.Sprintf("%dd", int(d.Hours()/24))
	}
	return strings.TrimSuffix(d.Round(time.Minute).String(), "0s")
}

func showCerts(ctx context.Context, w io.Writer, c *admin.Client, _ adminTarget, asJSON bool) error {
	cs, err := c.Certs(ctx)
	if err != nil {
		return err
	}
	if asJSON {
		return printJSON(w, cs)
	}
	now := time.Now()
	fmt.Fprintf(w, "state version %d, applied %s ago\n", cs.StateVersion, cs.StateAge)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "IDENTITY\tSERIAL\tNOT AFTER\tSTATE")
	for _, x := range cs.Workloads {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", x.Identity, dash(x.Serial), timeText(x.NotAfter), certState(x, now))
	}
	tw.Flush()
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "TRUST BUNDLE CA\tSERIAL\tNOT AFTER\tSTATE")
	for _, x := range cs.TrustBundle {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", x.Identity, dash(x.Serial), timeText(x.NotAfter), certState(x, now))
	}
	return tw.Flush()
}

func timeText(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.UTC().Format(time.RFC3339)
}

func showConfig(ctx context.Context, w io.Writer, c *admin.Client, _ adminTarget, asJSON bool) error {
	cfg, err := c.Config(ctx)
	if err != nil {
		return err
	}
	if asJSON {
		return printJSON(w, cfg)
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	rows := [][2]string{
		{"node", cfg.Node},
		{"state", fmt.Sprintf("version %d from %s, applied %s ago", cfg.StateVersion, dash(cfg.StatePath), cfg.StateAge)},
		{"trust domain", dash(cfg.TrustDomain)},
		{"admin socket", cfg.AdminSocket},
		{"observer socket", dash(cfg.ObserverSocket)},
		{"observer address", dash(cfg.ObserverAddr)},
		{"metrics address", dash(cfg.MetricsAddr) + " (and /metrics on the admin socket)"},
		{"flow buffer", fmt.Sprint(cfg.FlowCapacity)},
		{"bpf pin dir", cfg.PinDir},
		{"cgroup", dash(cfg.Cgroup)},
		{"mark", fmt.Sprintf("%#x", cfg.Mark)},
		{"fast path", fmt.Sprint(cfg.FastPath)},
		{"max pods", fmt.Sprint(cfg.MaxPods)},
		{"excluded ports", dash(strings.Trim(fmt.Sprint(cfg.ExcludedPorts), "[]"))},
	}
	for _, r := range rows {
		fmt.Fprintf(tw, "%s\t%s\n", r[0], r[1])
	}
	return tw.Flush()
}
