// This file holds `ferry agent routes`: the routes and TrafficPolicies an agent
// enforces, as the operator compiled them into its state, and what became of every
// route and policy the operator read (accepted, or rejected and why).

package main

import (
	"context"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/ferrymesh/ferry/api/admin"
	"github.com/ferrymesh/ferry/api/ferryv1"
	"google.golang.org/protobuf/encoding/protojson"
)

const routesLong = `Show, per Service and port, the routes the agent applies: for the producer routes
(every client) and each client namespace with consumer routes of its own, every match
in the order the proxy tries them (Gateway API's precedence), the route rule it
selects, where the rule sends requests (backend Services and their weights), its
filters, timeouts and retries. Then the TrafficPolicy in force on the Service: load
balancer, connection pool limits, outlier detection, faults, retry budget, rate limit.

Last, every HTTPRoute, GRPCRoute and TrafficPolicy the operator read, with its file
(local mode), generation and Gateway API conditions (Accepted, ResolvedRefs) with
their reasons and messages. A rejected one says which generation is still in force:
the operator keeps the last good configuration.

With -o json: the state version, the Services' route tables and policies and the
statuses, as the state carries them (the NodeState's JSON form).`

// showRoutes reads the agent's state and prints its routes, policies and statuses.
func showRoutes(ctx context.Context, w io.Writer, c *admin.Client, _ adminTarget, asJSON bool) error {
	raw, err := c.State(ctx)
	if err != nil {
		return err
	}
	st := &ferryv1.NodeState{}
	if err := (protojson.UnmarshalOptions{DiscardUnknown: true}).Unmarshal(raw, st); err != nil {
		return fmt.Errorf("agent state: %w", err)
	}
	return printRoutes(w, st, asJSON)
}

// routed are the state's Services that have routes, a policy or a load balancer
// other than the default, by namespace and name.
func routed(st *ferryv1.NodeState) []*ferryv1.Service {
	var out []*ferryv1.Service
	for _, s := range st.GetServices() {
		if len(s.GetRouteTables()) > 0 || s.GetPolicy() != nil || s.GetLoadBalancer() != "" {
			out = append(out, s)
		}
	}
	sort.Slice(out, func(i, j int) bool {
		return out[i].GetNamespace()+"/"+out[i].GetName() < out[j].GetNamespace()+"/"+out[j].GetName()
	})
	return out
}

func printRoutes(w io.Writer, st *ferryv1.NodeState, asJSON bool) error {
	svcs := routed(st)
	if asJSON {
		view := &ferryv1.NodeState{Version: st.GetVersion(), ConfigStatus: st.GetConfigStatus()}
		for _, s := range svcs {
			view.Services = append(view.Services, &ferryv1.Service{
				Name: s.GetName(), Namespace: s.GetNamespace(), ClusterIps: s.GetClusterIps(), Ports: s.GetPorts(),
				LoadBalancer: s.GetLoadBalancer(), RouteTables: s.GetRouteTables(), Policy: s.GetPolicy(),
			})
		}
		b, err := protojson.Marshal(view)
		if err != nil {
			return err
		}
		return printJSON(w, jsonRaw(b))
	}
	fmt.Fprintf(w, "state version %d\n", st.GetVersion())
	if len(svcs) == 0 {
		fmt.Fprintln(w, "\nno Service has routes or a TrafficPolicy")
	}
	for _, s := range svcs {
		fmt.Fprintf(w, "\nService %s/%s\n", s.GetNamespace(), s.GetName())
		tables := append([]*ferryv1.RouteTable(nil), s.GetRouteTables()...)
		sort.SliceStable(tables, func(i, j int) bool {
			if tables[i].GetPort() != tables[j].GetPort() {
				return tables[i].GetPort() < tables[j].GetPort()
			}
			return tables[i].GetClientNamespace() < tables[j].GetClientNamespace()
		})
		for _, t := range tables {
			clients := "every client (producer routes)"
			if ns := t.GetClientNamespace(); ns != "" {
				clients = "clients in namespace " + ns + " (consumer routes)"
			}
			fmt.Fprintf(w, "  port %d, %s:\n", t.GetPort(), clients)
			printTable(w, t)
		}
		printPolicy(w, s)
	}
	printStatuses(w, st.GetConfigStatus())
	return nil
}

// jsonRaw lets printJSON indent JSON that is already encoded.
type jsonRaw []byte

func (j jsonRaw) MarshalJSON() ([]byte, error) { return j, nil }

// printTable prints a route table's matches in precedence order, each with the
// rule it selects.
func printTable(w io.Writer, t *ferryv1.RouteTable) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "    #\tMATCH\tROUTE\tBACKENDS\tFILTERS\tTIMEOUTS\tRETRY")
	rules := t.GetRules()
	for i, m := range t.GetMatches() {
		idx := int(m.GetRule())
		if idx >= len(rules) {
			fmt.Fprintf(tw, "    %d\t%s\t(rule %d: not in the table)\t\t\t\t\n", i+1, matchText(m), idx)
			continue
		}
		r := rules[idx]
		fmt.Fprintf(tw, "    %d\t%s\t%s rule %d\t%s\t%s\t%s\t%s\n", i+1, matchText(m), r.GetRoute(), r.GetIndex(),
			backendsText(r), filtersText(r.GetFilters()), timeoutsText(r), retryText(r.GetRetry()))
	}
	if len(t.GetMatches()) == 0 {
		fmt.Fprintln(tw, "    -\t(no match: every request is answered 404)\t\t\t\t\t")
	}
	tw.Flush()
}

func matchText(m *ferryv1.RouteMatch) string {
	var parts []string
	if m.GetMethod() != "" {
		parts = append(parts, m.GetMethod())
	}
	if p := m.GetPath(); p != nil {
		parts = append(parts, "path "+stringMatchText(p.GetType(), p.GetValue()))
	}
	for _, h := range m.GetHeaders() {
		parts = append(parts, "header "+h.GetName()+namedMatchText(h))
	}
	for _, q := range m.GetQueryParams() {
		parts = append(parts, "query "+q.GetName()+namedMatchText(q))
	}
	if len(parts) == 0 {
		return "any request"
	}
	return strings.Join(parts, ", ")
}

func stringMatchText(typ, value string) string {
	switch typ {
	case "Exact":
		return "= " + value
	case "PathPrefix":
		return value + "*"
	case "RegularExpression":
		return "~ " + value
	}
	return typ + " " + value
}

func namedMatchText(m *ferryv1.NamedMatch) string {
	if m.GetType() == "RegularExpression" {
		return " ~ " + m.GetValue()
	}
	return "=" + m.GetValue()
}

func backendsText(r *ferryv1.RouteRule) string {
	bs := r.GetBackends()
	if len(bs) == 0 {
		for _, f := range r.GetFilters() {
			if f.GetRedirect() != nil {
				return "(redirect)"
			}
		}
		return "none (answered 500)"
	}
	var total uint64
	for _, b := range bs {
		total += uint64(b.GetWeight())
	}
	var parts []string
	for _, b := range bs {
		txt := fmt.Sprintf("%s:%d", b.GetService(), b.GetPort())
		if len(bs) > 1 || b.GetWeight() == 0 {
			share := 0.0
			if total > 0 {
				share = 100 * float64(b.GetWeight()) / float64(total)
			}
			txt += fmt.Sprintf(" weight %d (%s%%)", b.GetWeight(), strconv.FormatFloat(share, 'f', -1, 64))
		}
		parts = append(parts, txt)
	}
	return strings.Join(parts, ", ")
}

func filtersText(fs []*ferryv1.RouteFilter) string {
	var parts []string
	for _, f := range fs {
		switch {
		case f.GetRequestHeaders() != nil:
			parts = append(parts, "request headers "+headersText(f.GetRequestHeaders()))
		case f.GetResponseHeaders() != nil:
			parts = append(parts, "response headers "+headersText(f.GetResponseHeaders()))
		case f.GetRedirect() != nil:
			r := f.GetRedirect()
			code := r.GetStatusCode()
			if code == 0 {
				code = 302
			}
			var to []string
			if r.GetScheme() != "" {
				to = append(to, "scheme "+r.GetScheme())
			}
			if r.GetHostname() != "" {
				to = append(to, "host "+r.GetHostname())
			}
			if r.GetPort() != 0 {
				to = append(to, fmt.Sprintf("port %d", r.GetPort()))
			}
			if p := r.GetPath(); p != nil {
				to = append(to, pathModifierText(p))
			}
			parts = append(parts, fmt.Sprintf("redirect %d %s", code, strings.Join(to, " ")))
		case f.GetUrlRewrite() != nil:
			r := f.GetUrlRewrite()
			var to []string
			if r.GetHostname() != "" {
				to = append(to, "host "+r.GetHostname())
			}
			if p := r.GetPath(); p != nil {
				to = append(to, pathModifierText(p))
			}
			parts = append(parts, "rewrite "+strings.Join(to, " "))
		case f.GetMirror() != nil:
			m := f.GetMirror()
			parts = append(parts, fmt.Sprintf("mirror %s%% to %s:%d", strconv.FormatFloat(m.GetPercent(), 'f', -1, 64),
				m.GetBackend().GetService(), m.GetBackend().GetPort()))
		}
	}
	return dash(strings.Join(parts, "; "))
}

func headersText(h *ferryv1.HeaderModifier) string {
	var parts []string
	for _, x := range h.GetSet() {
		parts = append(parts, "set "+x.GetName()+": "+x.GetValue())
	}
	for _, x := range h.GetAdd() {
		parts = append(parts, "add "+x.GetName()+": "+x.GetValue())
	}
	for _, x := range h.GetRemove() {
		parts = append(parts, "remove "+x)
	}
	return strings.Join(parts, ", ")
}

func pathModifierText(p *ferryv1.PathModifier) string {
	if p.GetType() == "ReplacePrefixMatch" {
		return "prefix → " + p.GetValue()
	}
	return "path → " + p.GetValue()
}

func msText(ms uint32) string { return (time.Duration(ms) * time.Millisecond).String() }

func timeoutsText(r *ferryv1.RouteRule) string {
	var parts []string
	if ms := r.GetRequestTimeoutMs(); ms > 0 {
		parts = append(parts, "request "+msText(ms))
	}
	if ms := r.GetBackendRequestTimeoutMs(); ms > 0 {
		parts = append(parts, "per try "+msText(ms))
	}
	return dash(strings.Join(parts, ", "))
}

func retryText(r *ferryv1.RouteRetry) string {
	if r == nil {
		return "-"
	}
	txt := fmt.Sprintf("%d attempts", r.GetAttempts())
	if len(r.GetCodes()) > 0 {
		codes := make([]string, len(r.GetCodes()))
		for i, c := range r.GetCodes() {
			codes[i] = strconv.Itoa(int(c))
		}
		txt += " on " + strings.Join(codes, ",")
	}
	backoff := r.GetBackoffMs()
	if backoff == 0 {
		backoff = 25
	}
	return txt + ", backoff " + msText(backoff)
}

// printPolicy prints the TrafficPolicy in force on s: one line per part it sets.
func printPolicy(w io.Writer, s *ferryv1.Service) {
	p := s.GetPolicy()
	lb := s.GetLoadBalancer()
	if p == nil && lb == "" {
		fmt.Fprintln(w, "  no TrafficPolicy (load balancer P2CEWMA)")
		return
	}
	name := p.GetName()
	if name == "" {
		name = "(name not in the state)"
	}
	fmt.Fprintf(w, "  TrafficPolicy %s:\n", name)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	if lb == "" {
		lb = "P2CEWMA"
	}
	if lb == "RingHash" {
		if h := p.GetHashHeader(); h != "" {
			lb += " on header " + h
		} else {
			lb += " on the client's address"
		}
	}
	fmt.Fprintf(tw, "    load balancer\t%s\n", lb)
	var limits []string
	for _, l := range []struct {
		name string
		v    uint32
	}{
		{"connections", p.GetMaxConnections()}, {"pending requests", p.GetMaxPendingRequests()},
		{"requests", p.GetMaxRequests()}, {"requests per connection", p.GetMaxRequestsPerConnection()},
	} {
		if l.v > 0 {
			limits = append(limits, fmt.Sprintf("%d %s", l.v, l.name))
		}
	}
	if len(limits) > 0 {
		fmt.Fprintf(tw, "    limits\tat most %s (503 beyond, circuit open)\n", strings.Join(limits, ", "))
	}
	if o := p.GetOutlierDetection(); o != nil {
		var after []string
		if n := o.GetConsecutive_5Xx(); n > 0 {
			after = append(after, fmt.Sprintf("%d consecutive 5xx", n))
		}
		if n := o.GetConsecutiveGatewayErrors(); n > 0 {
			after = append(after, fmt.Sprintf("%d consecutive gateway errors", n))
		}
		fmt.Fprintf(tw, "    outlier detection\teject after %s, checked every %s, for %s × ejections, at most %d%% of endpoints\n",
			dash(strings.Join(after, " or ")), msText(o.GetIntervalMs()), msText(o.GetBaseEjectionMs()), o.GetMaxEjectionPercent())
	}
	if f := p.GetFault(); f != nil {
		var parts []string
		if f.GetAbortPercent() > 0 {
			parts = append(parts, fmt.Sprintf("abort %s%% with %d", strconv.FormatFloat(f.GetAbortPercent(), 'f', -1, 64), f.GetAbortStatus()))
		}
		if f.GetDelayPercent() > 0 {
			parts = append(parts, fmt.Sprintf("delay %s%% by %s", strconv.FormatFloat(f.GetDelayPercent(), 'f', -1, 64), msText(f.GetDelayMs())))
		}
		fmt.Fprintf(tw, "    fault injection\t%s\n", dash(strings.Join(parts, "; ")))
	}
	if b := p.GetRetryBudget(); b != nil {
		fmt.Fprintf(tw, "    retry budget\t%s%% of requests + %d/s, over %s\n", strconv.FormatFloat(b.GetPercent(), 'f', -1, 64), b.GetMinRetriesPerSecond(), msText(b.GetTtlMs()))
	}
	if r := p.GetRateLimit(); r != nil {
		fmt.Fprintf(tw, "    rate limit\t%d requests/s per endpoint, burst %d (429 beyond)\n", r.GetRequestsPerSecond(), r.GetBurst())
	}
	var timeouts []string
	for _, x := range []struct {
		name string
		ms   uint32
	}{{"connect", p.GetConnectTimeoutMs()}, {"idle", p.GetIdleTimeoutMs()}, {"request", p.GetRequestTimeoutMs()}} {
		if x.ms > 0 {
			timeouts = append(timeouts, x.name+" "+msText(x.ms))
		}
	}
	if len(timeouts) > 0 {
		fmt.Fprintf(tw, "    timeouts\t%s\n", strings.Join(timeouts, ", "))
	}
	if r := p.GetRetry(); r != nil {
		fmt.Fprintf(tw, "    retries\t%s (requests no route rule sets them for)\n", retryText(r))
	}
	tw.Flush()
}

// printStatuses prints every route and policy the operator read, with its
// conditions, rejected ones first.
func printStatuses(w io.Writer, cs []*ferryv1.ConfigStatus) {
	fmt.Fprintln(w, "\nROUTES AND POLICIES")
	if len(cs) == 0 {
		fmt.Fprintln(w, "  none")
		return
	}
	cs = append([]*ferryv1.ConfigStatus(nil), cs...)
	sort.SliceStable(cs, func(i, j int) bool {
		if ri, rj := rejected(cs[i]), rejected(cs[j]); ri != rj {
			return ri
		}
		if cs[i].GetKind() != cs[j].GetKind() {
			return cs[i].GetKind() < cs[j].GetKind()
		}
		return cs[i].GetName() < cs[j].GetName()
	})
	for _, c := range cs {
		where := fmt.Sprintf("generation %d", c.GetGeneration())
		if c.GetFile() != "" {
			where = "file " + c.GetFile() + ", " + where
		}
		fmt.Fprintf(w, "%s %s (%s) → %s\n", c.GetKind(), c.GetName(), where, dash(strings.Join(c.GetTargets(), ", ")))
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		for _, cond := range c.GetConditions() {
			status := "False"
			if cond.GetStatus() {
				status = "True"
			}
			fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\n", cond.GetType(), status, dash(cond.GetReason()), cond.GetMessage())
		}
		tw.Flush()
		switch {
		case !rejected(c):
			fmt.Fprintf(w, "  in force: generation %d\n", c.GetGeneration())
		case c.GetInForceGeneration() != 0:
			fmt.Fprintf(w, "  REJECTED; in force: generation %d\n", c.GetInForceGeneration())
		default:
			fmt.Fprintln(w, "  REJECTED; nothing in force (no generation was ever accepted)")
		}
	}
}

// rejected says whether a route or policy is not in force as it is: a condition is
// False, or an earlier generation is in force.
func rejected(c *ferryv1.ConfigStatus) bool {
	if c.GetInForceGeneration() != 0 && c.GetInForceGeneration() != c.GetGeneration() {
		return true
	}
	for _, cond := range c.GetConditions() {
		if !cond.GetStatus() {
			return true
		}
	}
	return false
}
