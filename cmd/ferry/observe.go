// This file holds `ferry observe`: read flows from one agent, several, a whole lab or
// a relay, filter them, and print them as they come.

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/ferrymesh/ferry/agent/flows"
	"github.com/ferrymesh/ferry/api/ferryv1"
	"github.com/ferrymesh/ferry/internal/observertls"
	"github.com/ferrymesh/ferry/lab"
	"github.com/ferrymesh/ferry/operator/relay"
	"github.com/spf13/cobra"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// defaultObserverSocket is where a node's agent serves the Observer API by default
// (observer.sock beside the admin socket /run/ferry/agent.sock).
const defaultObserverSocket = "/run/ferry/observer.sock"

// sourceFlags say where flows come from; ferry observe and ferry ui share them.
type sourceFlags struct {
	lab     string
	sockets []string
	servers []string
	tls     observertls.Files // for --server on TCP: the Observer API there is mTLS only
}

func (s *sourceFlags) add(cmd *cobra.Command) {
	f := cmd.Flags()
	f.StringVar(&s.lab, "lab", "", "read every agent of the lab with this prefix (e.g. fy)")
	f.StringArrayVar(&s.sockets, "agent-socket", nil, "an agent's Observer unix socket (repeatable)")
	f.StringArrayVar(&s.servers, "server", nil, "an agent's or relay's Observer API at HOST:PORT (repeatable)")
	f.StringVar(&s.tls.Cert, "tls-cert", "", "with --server on TCP: a certificate from the mesh CA to present (the Observer API on TCP is mutual TLS only)")
	f.StringVar(&s.tls.Key, "tls-key", "", "with --server on TCP: the certificate's private key")
	f.StringVar(&s.tls.CA, "tls-ca", "", "with --server on TCP: the mesh CA bundle the server's certificate must chain to")
}

// agents resolves the flags to Observer addresses. With none given it reads the lab
// "fy" when one is up, else this node's agent.
func (s *sourceFlags) agents() ([]relay.Agent, error) {
	var out []relay.Agent
	if s.lab != "" {
		as, err := labObservers(s.lab)
		if err != nil {
			return nil, err
		}
		out = append(out, as...)
	}
	for _, p := range s.sockets {
		abs, err := filepath.Abs(p)
		if err != nil {
			return nil, err
		}
		out = append(out, relay.Agent{Name: p, Address: "unix://" + abs})
	}
	for _, a := range s.servers {
		out = append(out, relay.Agent{Name: a, Address: a})
	}
	if len(out) > 0 {
		return out, nil
	}
	if as, err := labObservers(lab.DefaultPrefix); err == nil {
		return as, nil
	}
	if _, err := os.Stat(defaultObserverSocket); err != nil {
		return nil, fmt.Errorf("no flow source: no lab %q is up and %s: %w (use --lab, --agent-socket or --server)", lab.DefaultPrefix, defaultObserverSocket, err)
	}
	return []relay.Agent{{Name: "local", Address: "unix://" + defaultObserverSocket}}, nil
}

// relay starts an in-process relay over the agents the flags name, and returns it
// with the agents' names; Stop it after.
func (s *sourceFlags) relay(ctx context.Context) (*relay.Relay, []string, error) {
	agents, err := s.agents()
	if err != nil {
		return nil, nil, err
	}
	cfg := relay.Config{Agents: agents}
	if slices.ContainsFunc(s.servers, observertls.IsTCP) {
		if cfg.ClientTLS, err = observertls.ClientConfig(s.tls); err != nil {
			return nil, nil, fmt.Errorf("--server on TCP: %w (--tls-cert, --tls-key, --tls-ca)", err)
		}
	}
	r, err := relay.New(cfg)
	if err != nil {
		return nil, nil, err
	}
	if err := r.Start(ctx); err != nil {
		return nil, nil, err
	}
	names := make([]string, len(agents))
	for i, a := range agents {
		names[i] = a.Name
	}
	return r, names, nil
}

// labObservers lists the Observer sockets of a lab's agents, named by node. Agents
// run in the nodes' network namespaces; their unix sockets are reachable from here.
func labObservers(prefix string) ([]relay.Agent, error) {
	l, err := lab.Load(prefix)
	if err != nil {
		return nil, err
	}
	var out []relay.Agent
	for _, n := range l.Nodes() {
		out = append(out, relay.Agent{Name: n, Address: "unix://" + l.ObserverSocket(n)})
	}
	return out, nil
}

// filterFlags are ferry observe's filters.
type filterFlags struct {
	fromPod, toPod, namespace, fromID, toID, verdict, protocol, node []string
	httpStatus, httpMethod, httpPath, grpcStatus, route              []string
	port                                                             []uint
}

func (ff *filterFlags) add(cmd *cobra.Command) {
	f := cmd.Flags()
	f.StringSliceVar(&ff.fromPod, "from-pod", nil, "source pod, NAME or NAMESPACE/NAME (repeatable, comma-separated)")
	f.StringSliceVar(&ff.toPod, "to-pod", nil, "destination pod, NAME or NAMESPACE/NAME")
	f.StringSliceVarP(&ff.namespace, "namespace", "n", nil, "namespace of either side")
	f.StringSliceVar(&ff.fromID, "from-identity", nil, "source identity: SPIFFE ID or NAMESPACE/SERVICEACCOUNT")
	f.StringSliceVar(&ff.toID, "to-identity", nil, "destination identity: SPIFFE ID or NAMESPACE/SERVICEACCOUNT")
	f.StringSliceVar(&ff.verdict, "verdict", nil, "forwarded, dropped or error")
	f.StringSliceVar(&ff.protocol, "protocol", nil, "tcp (connections), http or grpc (requests)")
	f.UintSliceVar(&ff.port, "port", nil, "destination port")
	f.StringSliceVar(&ff.httpStatus, "http-status", nil, "HTTP status of request flows: a code (404), a range (500-599) or a class (5xx)")
	f.StringSliceVar(&ff.httpMethod, "http-method", nil, "HTTP method of request flows (GET, POST)")
	f.StringSliceVar(&ff.httpPath, "http-path", nil, "prefix of the request path (/api/)")
	f.StringSliceVar(&ff.grpcStatus, "grpc-status", nil, "gRPC status code of gRPC calls (0 is OK, 14 UNAVAILABLE)")
	f.StringSliceVar(&ff.node, "node", nil, "node whose agent recorded the flow")
	f.StringSliceVar(&ff.route, "route", nil, `route of request flows: "HTTPRoute NAMESPACE/NAME" or NAMESPACE/NAME`)
}

func (ff *filterFlags) filter() (*ferryv1.FlowFilter, error) {
	flt := &ferryv1.FlowFilter{
		FromPod: ff.fromPod, ToPod: ff.toPod, Namespace: ff.namespace,
		FromIdentity: ff.fromID, ToIdentity: ff.toID, Verdict: ff.verdict, Protocol: ff.protocol,
		Port: u32s(ff.port), Node: ff.node, HttpMethod: ff.httpMethod, HttpPathPrefix: ff.httpPath, GrpcStatus: ff.grpcStatus,
		Route: ff.route,
	}
	for _, s := range ff.httpStatus {
		r, err := flows.ParseStatusRange(s)
		if err != nil {
			return nil, fmt.Errorf("--http-status: %w", err)
		}
		flt.HttpStatusRange = append(flt.HttpStatusRange, r)
	}
	return flt, flows.CheckFilter(flt)
}

func u32s(v []uint) []uint32 {
	out := make([]uint32, len(v))
	for i, x := range v {
		out[i] = uint32(x)
	}
	return out
}

// parseSince reads a duration back from now ("5m") or a time (RFC 3339).
func parseSince(s string, now time.Time) (time.Time, error) {
	if d, err := time.ParseDuration(s); err == nil {
		return now.Add(-d), nil
	}
	t, err := time.Parse(time.RFC3339, s)
	if err != nil {
		return time.Time{}, fmt.Errorf("--since %q: want a duration (5m) or a time (2026-01-02T15:04:05Z)", s)
	}
	return t, nil
}

func newObserveCommand() *cobra.Command {
	var (
		src    sourceFlags
		ff     filterFlags
		since  string
		last   uint64
		follow bool
		output string
	)
	cmd := &cobra.Command{
		Use:   "observe",
		Short: "Show the connections the mesh carried (flows), live or recent",
		Long: `Show flows: one record per connection the node proxies carried, with the pods, their
identities, the verdict (forwarded, dropped, error) and why, how it was secured (mtls,
same-node, plaintext), bytes each way and duration. A flow is recorded when its
connection ends. Each agent keeps its last flows (4096 by default) in memory.

Traffic the proxies carry at L7 (HTTP/1.1, HTTP/2, gRPC) also gives one flow per
request, with protocol http or grpc: method, authority and path, status, gRPC status
and latency (the flow's duration), and the bodies' bytes. Select them with
--protocol http (or grpc) and the --http-* and --grpc-status filters. A request to a
Service with routes (HTTPRoute, GRPCRoute) names the route and rule that carried it
(--route selects them) and how many times it was retried; a request the mesh answered
itself says why (fault, circuit_open, rate_limited, no_route, no_endpoints, timeout).

Flows come from every agent of a lab (--lab), from agents' Observer sockets
(--agent-socket), or from an agent or relay over TCP (--server); from several sources
they are merged in time order. With no source flag: the lab "fy" if it is up, else
this node's agent at ` + defaultObserverSocket + `.

Filters: within one flag any value matches; across flags all must match.
Without --last, --since or --follow the last 20 flows are shown; --follow alone shows
only new flows.`,
		Example: `  ferry observe --lab fy
  ferry observe --lab fy --from-pod a --verdict error -o table
  ferry observe --lab fy -f --to-identity default/c
  ferry observe --agent-socket /run/ferry/observer.sock --last 100 -o json | jq .
  ferry observe --server 10.0.0.5:4245 --since 5m --port 8080
  ferry observe --lab fy --protocol http --http-status 500-599
  ferry observe --lab fy -f --protocol http,grpc --http-method POST --http-path /api/
  ferry observe --lab fy --protocol grpc --grpc-status 14 -o table
  ferry observe --lab fy --route default/canary --http-status 5xx`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			out := cmd.OutOrStdout()
			p, err := newFlowPrinter(out, output, follow)
			if err != nil {
				return err
			}
			flt, err := ff.filter()
			if err != nil {
				return err
			}
			req := &ferryv1.GetFlowsRequest{Filter: flt, Number: last, Follow: follow}
			now := time.Now()
			switch {
			case since != "":
				t, err := parseSince(since, now)
				if err != nil {
					return err
				}
				req.Since = timestamppb.New(t)
			case follow && !cmd.Flags().Changed("last"):
				req.Since = timestamppb.New(now)
			case !follow && !cmd.Flags().Changed("last"):
				req.Number = 20
			}
			r, names, err := src.relay(cmd.Context())
			if err != nil {
				return err
			}
			defer r.Stop()
			unavailable := map[string]bool{}
			errOut := cmd.ErrOrStderr()
			err = r.Flows(cmd.Context(), req, p.print, func(e relay.AgentError) {
				if !unavailable[e.Agent] {
					fmt.Fprintf(errOut, "ferry observe: warning: %v\n", e)
				}
				unavailable[e.Agent] = true
			})
			p.flush()
			if cmd.Context().Err() != nil {
				return nil // interrupted while following
			}
			if len(unavailable) == len(names) {
				return fmt.Errorf("no agent could be read (%s): is the agent running?", strings.Join(names, ", "))
			}
			if err != nil {
				return err
			}
			if p.n == 0 && output != "json" && !follow {
				fmt.Fprintln(errOut, "no flows matched")
			}
			return nil
		},
	}
	src.add(cmd)
	ff.add(cmd)
	f := cmd.Flags()
	f.StringVar(&since, "since", "", "only flows from this long ago (5m) or this time (RFC 3339)")
	f.Uint64Var(&last, "last", 0, "only the last N stored flows (default 20 without --follow)")
	f.BoolVarP(&follow, "follow", "f", false, "keep printing new flows until interrupted")
	f.StringVarP(&output, "output", "o", "compact", "output: compact, table or json (one flow per line)")
	return cmd
}

// flowPrinter prints flows in one of the output formats.
type flowPrinter struct {
	w      io.Writer
	format string
	follow bool // show each flow as it comes
	tw     *tabwriter.Writer
	n      int
}

func newFlowPrinter(w io.Writer, format string, follow bool) (*flowPrinter, error) {
	p := &flowPrinter{w: w, format: format, follow: follow}
	switch format {
	case "compact", "json":
	case "table":
		p.tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	default:
		return nil, fmt.Errorf("unknown output %q: use compact, table or json", format)
	}
	return p, nil
}

var jsonFlow = protojson.MarshalOptions{UseProtoNames: true}

func (p *flowPrinter) print(f *ferryv1.Flow) error {
	p.n++
	switch p.format {
	case "json":
		b, err := jsonFlow.Marshal(f)
		if err != nil {
			return err
		}
		// protojson varies its spacing on purpose; one compact line per flow is what
		// jq and line-oriented tools want.
		var line bytes.Buffer
		if err := json.Compact(&line, b); err != nil {
			return err
		}
		line.WriteByte('\n')
		_, err = p.w.Write(line.Bytes())
		return err
	case "table":
		if p.n == 1 {
			fmt.Fprintln(p.tw, "TIME\tNODE\tSOURCE\tDESTINATION\tSECURITY\tVERDICT\tPROTOCOL\tREQUEST\tSTATUS\tROUTE\tSENT\tRECEIVED\tDURATION\tCERT\tREASON")
		}
		request, status, route := "-", "-", "-"
		if h := f.GetHttp(); h != nil {
			request, status, route = requestText(h), statusText(h), routeText(h)
		}
		fmt.Fprintf(p.tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\t%s\t%s\t%s\n",
			f.GetTime().AsTime().Local().Format("15:04:05.000"), f.GetNode(),
			endpointText(f.GetSource()), endpointText(f.GetDestination()), f.GetSecurity(),
			strings.ToUpper(flows.VerdictName(f.GetVerdict())), dash(f.GetProtocol()), request, status, route,
			f.GetBytesSent(), f.GetBytesReceived(), f.GetDuration().AsDuration().Round(time.Microsecond), dash(certText(f)), dash(f.GetReason()))
		if p.follow { // each row as it comes; columns may then shift a little
			return p.tw.Flush()
		}
		return nil
	}
	src, dst := f.GetSource(), f.GetDestination()
	// A request flow reads as Hubble's http lines do: the protocol and version, the
	// request, "=>", its status and latency.
	l7 := ""
	if h := f.GetHttp(); h != nil {
		l7 = fmt.Sprintf(" %s %s %s => %s", f.GetProtocol(), dash(h.GetVersion()), requestText(h), statusText(h))
		if h.GetRoute() != "" {
			l7 += " via " + routeText(h)
		}
	}
	cert := ""
	if c := certText(f); c != "" {
		cert = " [" + c + "]"
	}
	_, err := fmt.Fprintf(p.w, "%s [%s] %s %s -> %s %s %s %s%s ↑%s ↓%s %s%s%s\n",
		f.GetTime().AsTime().Local().Format("Jan _2 15:04:05.000"), f.GetNode(),
		endpointText(src), idText(src.GetIdentity()), endpointText(dst), idText(dst.GetIdentity()),
		f.GetSecurity(), strings.ToUpper(flows.VerdictName(f.GetVerdict())), l7,
		byteText(f.GetBytesSent()), byteText(f.GetBytesReceived()),
		f.GetDuration().AsDuration().Round(time.Microsecond), cert, reasonText(f.GetReason()))
	return err
}

// certText says, for a flow whose pod's certificate was about to expire
// (cert_expiring), how long it had left when the flow began: "cert expires in 6s",
// or "cert expired" once past; "" for any other flow.
func certText(f *ferryv1.Flow) string {
	if !f.GetCertExpiring() || f.GetCertNotAfter() == nil {
		return ""
	}
	began := f.GetTime().AsTime().Add(-f.GetDuration().AsDuration())
	left := f.GetCertNotAfter().AsTime().Sub(began)
	if left <= 0 {
		return "cert expired"
	}
	return "cert expires in " + left.Round(time.Second).String()
}

// requestText is "METHOD authority/path": GET web.default/items/1.
func requestText(h *ferryv1.HTTP) string {
	return dash(h.GetMethod()) + " " + h.GetAuthority() + h.GetPath()
}

// statusText is the response status, with the gRPC status of a call and the delay
// fault injection added before it was sent: "200", "200 grpc-status 14",
// "503 (delayed 100ms)", "-" when no response came.
func statusText(h *ferryv1.HTTP) string {
	s := "-"
	if h.GetStatus() != 0 {
		s = strconv.Itoa(int(h.GetStatus()))
	}
	if g := h.GetGrpcStatus(); g != "" {
		s += " grpc-status " + g
	}
	if d := h.GetFaultDelay(); d != nil {
		s += " (delayed " + d.AsDuration().String() + ")"
	}
	return s
}

// routeText is the route rule and retries of a request: "HTTPRoute default/canary
// rule 1 (2 retries)", "-" without a route.
func routeText(h *ferryv1.HTTP) string {
	s := "-"
	if h.GetRoute() != "" {
		s = fmt.Sprintf("%s rule %d", h.GetRoute(), h.GetRouteRule())
	}
	switch n := h.GetRetries(); {
	case n == 1:
		s += " (1 retry)"
	case n > 1:
		s += fmt.Sprintf(" (%d retries)", n)
	}
	return s
}

func (p *flowPrinter) flush() {
	if p.tw != nil {
		p.tw.Flush()
	}
}

// endpointText is "namespace/pod (ip:port)", or the address alone outside the mesh.
func endpointText(e *ferryv1.Endpoint) string {
	addr := e.GetIp()
	if e.GetPort() != 0 {
		addr += ":" + strconv.Itoa(int(e.GetPort()))
		if strings.Contains(e.GetIp(), ":") {
			addr = "[" + e.GetIp() + "]:" + strconv.Itoa(int(e.GetPort()))
		}
	}
	if e.GetPod() == "" {
		return addr
	}
	return e.GetNamespace() + "/" + e.GetPod() + " (" + addr + ")"
}

func idText(id string) string {
	if id == "" {
		return "[no identity]"
	}
	return "[" + id + "]"
}

func reasonText(r string) string {
	if r == "" {
		return ""
	}
	return " (" + r + ")"
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func byteText(n uint64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1fGiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1fMiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1fKiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%dB", n)
}

// printLabFlows writes the last flows of the lab's agents as a table, as
// `ferry observe --lab PREFIX --last N -o table` does.
func printLabFlows(ctx context.Context, w io.Writer, prefix string, last uint64) error {
	agents, err := labObservers(prefix)
	if err != nil {
		return err
	}
	r, err := relay.New(relay.Config{Agents: agents})
	if err != nil {
		return err
	}
	if err := r.Start(ctx); err != nil {
		return err
	}
	defer r.Stop()
	p, err := newFlowPrinter(w, "table", false)
	if err != nil {
		return err
	}
	var agentErrs []error
	err = r.Flows(ctx, &ferryv1.GetFlowsRequest{Number: last}, p.print, func(e relay.AgentError) { agentErrs = append(agentErrs, e) })
	p.flush()
	return errors.Join(append(agentErrs, err)...)
}
