// This file holds `ferry explain`: what the mesh would do with a connection or
// request from one pod to a destination, asked of the agents that decide it.

package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/ferrymesh/ferry/api/admin"
	"github.com/spf13/cobra"
)

// explainReport is the source's agent's answer, with each endpoint's decision as
// the endpoint's own agent made it where that agent could be asked.
type explainReport struct {
	admin.Explain
	// Notes say which agents could not be asked, and so whose view is shown.
	Notes []string `json:"notes,omitempty"`
}

func newExplainCommand() *cobra.Command {
	f := &agentFlags{}
	var withHTTP bool
	var dstSocket string
	cmd := &cobra.Command{
		Use:   "explain SRC DST:PORT [--http METHOD PATH]",
		Short: "Explain what the mesh does with a connection or request: capture, route, identities, policy",
		Long: `Explain what Ferry would do now with a connection from SRC to DST:PORT, or with an
HTTP request on it (--http METHOD PATH), step by step:

  capture        is SRC enrolled (its netns cookie in the enrolled_netns map), is the
                 destination port captured (not a mesh or excluded port)
  route          a Service: its port, protocol, the route rule METHOD PATH matches, and
                 the endpoints with their nodes; a pod or an address outside the mesh
  identity       what the source presents (its SPIFFE ID, or plaintext) and what each
                 destination presents on the tunnel
  authorization  for each endpoint pod: its mTLS mode and the decision of its
                 AuthorizationPolicies, with the policy and rule index that decide it,
                 per connection (L4) or per request on its normalised path (L7)

SRC is a pod (namespace/name) or an IP (a pod that is not enrolled, or any client).
DST is a pod IP, a Service cluster IP or a Service's DNS name (name.namespace[.svc]).

The source's agent answers the capture and the route; each endpoint's decision is
asked of the agent of the endpoint's node, the one that enforces it, computed by the
same function the proxy enforces with. With --lab every agent of the lab can be
asked; else --socket is the source node's agent and --dst-socket the destination's.`,
		Example: `  ferry explain shop/a 10.110.2.2:8080 --lab az
  ferry explain shop/a echo.shop:80 --http GET /admin --lab mx
  ferry explain 10.115.1.4 10.115.2.2:8080 --lab mx -o json
  sudo ferry explain shop/a 10.96.0.60:80 --socket /run/ferry/agent.sock`,
		RunE: func(cmd *cobra.Command, args []string) error {
			if f.output != "table" && f.output != "json" {
				return fmt.Errorf("unknown output %q: use table or json", f.output)
			}
			q, err := explainQuery(args, withHTTP)
			if err != nil {
				return err
			}
			ts, err := f.targets()
			if err != nil {
				return err
			}
			if f.lab == "" && dstSocket != "" {
				ts = append(ts, adminTarget{node: "", socket: dstSocket})
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), 15*time.Second)
			defer cancel()
			rep, err := explain(ctx, q, ts)
			if err != nil {
				return err
			}
			if f.output == "json" {
				return printJSON(cmd.OutOrStdout(), rep)
			}
			writeExplain(cmd.OutOrStdout(), rep)
			return nil
		},
	}
	fl := cmd.Flags()
	fl.BoolVar(&withHTTP, "http", false, "explain an HTTP request: METHOD and PATH follow DST:PORT")
	fl.StringVar(&f.socket, "socket", defaultAdminSocket, "the source node agent's admin socket")
	fl.StringVar(&dstSocket, "dst-socket", "", "the destination node agent's admin socket, to ask it for its decision")
	fl.StringVar(&f.lab, "lab", "", "ask the agents of the lab with this prefix")
	fl.StringVarP(&f.output, "output", "o", "table", "table or json")
	return cmd
}

func explainQuery(args []string, withHTTP bool) (admin.ExplainQuery, error) {
	switch {
	case withHTTP && len(args) != 4:
		return admin.ExplainQuery{}, errors.New("explain --http needs SRC DST:PORT METHOD PATH")
	case !withHTTP && len(args) != 2:
		return admin.ExplainQuery{}, errors.New("explain needs SRC and DST:PORT (and --http METHOD PATH for a request)")
	}
	q := admin.ExplainQuery{Src: args[0], Dst: args[1]}
	if withHTTP {
		q.Method, q.Path = strings.ToUpper(args[2]), args[3]
		if !strings.HasPrefix(q.Path, "/") {
			return q, fmt.Errorf("path %q: want an absolute path (/...)", q.Path)
		}
	}
	return q, nil
}

// explain asks the source's agent, then each endpoint's agent for its decision.
func explain(ctx context.Context, q admin.ExplainQuery, ts []adminTarget) (explainReport, error) {
	var rep explainReport
	// Any agent knows the mesh's workloads: the first that answers says which
	// node the source is on.
	var first admin.Explain
	var errs []string
	asked := -1
	for i, t := range ts {
		ex, err := admin.NewClient(t.socket).Explain(ctx, q)
		var ee *admin.ExplainError
		if errors.As(err, &ee) {
			return rep, fmt.Errorf("explain: %s", ee.Why)
		}
		if err != nil {
			errs = append(errs, fmt.Sprintf("%s: %v", targetName(t), err))
			continue
		}
		first, asked = ex, i
		break
	}
	if asked < 0 {
		return rep, fmt.Errorf("explain: no agent answered: %s", strings.Join(errs, "; "))
	}
	rep.Explain = first
	if n := first.Source.Node; n != "" && n != first.Node {
		if t, ok := targetFor(ts, n); ok {
			ex, err := admin.NewClient(t.socket).Explain(ctx, q)
			if err != nil {
				rep.Notes = append(rep.Notes, fmt.Sprintf("the source's agent on %s: %v; the route is %s's view", n, err, first.Node))
			} else {
				rep.Explain = ex
			}
		} else {
			rep.Notes = append(rep.Notes, fmt.Sprintf("no agent of node %s to ask: capture unknown, the route is %s's view", n, first.Node))
		}
	}
	// Each decision from the agent that enforces it.
	for i, d := range rep.Decisions {
		if d.Node == "" || d.Node == d.DecidedBy {
			continue
		}
		t, ok := targetFor(ts, d.Node)
		if !ok {
			rep.Notes = append(rep.Notes, fmt.Sprintf("no agent of node %s to ask: %s's decision is %s's view", d.Node, d.Pod, d.DecidedBy))
			continue
		}
		dq := q
		dq.Dst, dq.Request = d.Endpoint, d.Level == "request"
		ex, err := admin.NewClient(t.socket).Explain(ctx, dq)
		if err != nil || len(ex.Decisions) != 1 {
			rep.Notes = append(rep.Notes, fmt.Sprintf("the agent of node %s did not decide for %s (%v): %s's view is shown", d.Node, d.Pod, err, d.DecidedBy))
			continue
		}
		rep.Decisions[i] = ex.Decisions[0]
	}
	return rep, nil
}

// targetFor finds node's agent among ts; without --lab, an unnamed target
// beyond the first (--dst-socket) stands for any other node.
func targetFor(ts []adminTarget, node string) (adminTarget, bool) {
	for _, t := range ts {
		if t.node == node {
			return t, true
		}
	}
	if len(ts) > 1 && ts[len(ts)-1].node == "" {
		return ts[len(ts)-1], true
	}
	return adminTarget{}, false
}

func targetName(t adminTarget) string {
	if t.node != "" {
		return t.node
	}
	return t.socket
}

func writeExplain(w io.Writer, rep explainReport) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	defer tw.Flush()
	s, d := rep.Source, rep.Destination
	enrolled := "not enrolled (plaintext)"
	if s.Enrolled {
		enrolled = "enrolled"
	}
	fmt.Fprintf(tw, "SOURCE\t%s\t%s\t%s\t%s\n", dash(s.Pod), s.IP, dash(s.Node), enrolled)
	target := d.Kind
	if d.Service != "" {
		target += " " + d.Service
	}
	if d.Pod != "" {
		target += " " + d.Pod
	}
	req := ""
	if rep.Query.Method != "" {
		req = rep.Query.Method + " " + rep.Query.Path
	}
	fmt.Fprintf(tw, "DESTINATION\t%s\t%s\t%s\n", d.Addr, target, req)
	fmt.Fprintf(tw, "STATE\tnode %s, version %d\n", rep.Node, rep.StateVersion)

	fmt.Fprintln(tw, "\nCAPTURE")
	if c := rep.Capture; c == nil {
		fmt.Fprintln(tw, "  not known\tthe source is not an enrolled pod of an agent asked")
	} else {
		in := "not in enrolled_netns"
		if c.InEnrolledNetns {
			in = "in enrolled_netns"
		}
		fmt.Fprintf(tw, "  netns cookie\t%d (%s)\n", c.NetnsCookie, in)
		fmt.Fprintf(tw, "  excluded ports\t%s\n", dash(strings.Trim(fmt.Sprint(c.ExcludedPorts), "[]")))
		fmt.Fprintf(tw, "  captured\t%t\t%s\n", c.Captured, c.Why)
		if c.Error != "" {
			fmt.Fprintf(tw, "  error\t%s\n", c.Error)
		}
	}

	r := rep.Route
	fmt.Fprintln(tw, "\nROUTE")
	if r.Service != "" {
		level := "L4"
		if r.L7 {
			level = "L7"
		}
		fmt.Fprintf(tw, "  service\t%s port %d, protocol %s, %s\n", r.Service, r.Port, dash(string(r.Protocol)), level)
	}
	if r.Route != "" {
		fmt.Fprintf(tw, "  route rule\t%s rule %d\n", r.Route, r.Rule)
	}
	fmt.Fprintf(tw, "  why\t%s\n", r.Why)
	if r.Status != 0 {
		fmt.Fprintf(tw, "  answered\t%d by the source's proxy\n", r.Status)
	}
	fmt.Fprintln(tw, "\nIDENTITY")
	fmt.Fprintf(tw, "  source presents\t%s\n", orPlaintext(s.Identity))
	if len(r.Endpoints) > 0 {
		fmt.Fprintln(tw, "  ENDPOINT\tPOD\tNODE\tCARRIED\tPRESENTS")
		for _, e := range r.Endpoints {
			fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\n", e.Addr, dash(e.Pod), dash(e.Node), e.Security, dash(e.Identity))
		}
	}

	fmt.Fprintln(tw, "\nAUTHORIZATION")
	if len(rep.Decisions) == 0 {
		fmt.Fprintln(tw, "  none\tno endpoint in the mesh: no policy of Ferry's applies")
	} else {
		fmt.Fprintln(tw, "  POD\tDECIDED BY\tMTLS\tLEVEL\tVERDICT\tPOLICY\tRULE\tWHY")
		for _, d := range rep.Decisions {
			v := d.Verdict
			verdict := "DENIED"
			if v.Allowed {
				verdict = "ALLOWED"
			}
			rule := "-"
			if v.Rule >= 0 {
				rule = fmt.Sprint(v.Rule)
			}
			level := d.Level
			if v.Path != "" {
				level += " " + v.Path
			}
			fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", d.Pod, d.DecidedBy, d.MTLSMode, level, verdict, dash(v.Policy), rule, v.Why)
			if len(v.Audits) > 0 {
				fmt.Fprintf(tw, "  \t\t\t\taudited by\t%s\n", strings.Join(v.Audits, ", "))
			}
		}
	}
	for _, n := range rep.Notes {
		fmt.Fprintf(tw, "\nnote: %s\n", n)
	}
}

func orPlaintext(id string) string {
	if id == "" {
		return "nothing (plaintext)"
	}
	return id
}
