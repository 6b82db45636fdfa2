package agent

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net/http"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/ferrymesh/ferry/agent/proxy"
	"github.com/ferrymesh/ferry/api/ferryv1"
	"github.com/ferrymesh/ferry/bpf"
	"golang.org/x/net/http/httpguts"
	"google.golang.org/protobuf/encoding/protojson"
)

// ReadStateFile reads a NodeState written as protobuf JSON.
func ReadStateFile(path string) (*ferryv1.NodeState, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read state: %w", err)
	}
	st := &ferryv1.NodeState{}
	if err := protojson.Unmarshal(b, st); err != nil {
		return nil, fmt.Errorf("parse state %s: %w", path, err)
	}
	return st, nil
}

// CheckState converts st's workloads and Services as the agent does before applying
// a state, and returns why it would leave any entry out (each a *DroppedEntry,
// joined), or nil when it would take every one. The operator's tests use it to
// prove it never sends a state agents must cut.
func CheckState(st *ferryv1.NodeState) error {
	_, werr := workloads(st)
	_, serr := services(st)
	_, perr := strictPorts(st, st.GetNode())
	return errors.Join(werr, serr, perr)
}

// DroppedEntry is one entry of a NodeState the agent left out while it applied the
// rest: one bad object must not freeze every change behind it. What cannot be
// taken in part (a state for another node, a trust bundle or certificates that do
// not parse, authorization policies, which dropped could let through what they
// stop) still rejects the state whole.
type DroppedEntry struct {
	Kind string // "workload" or "service"
	Name string // namespace/name
	Err  error  // why, naming the entry's index in the state
}

func (d *DroppedEntry) Error() string { return d.Err.Error() }
func (d *DroppedEntry) Unwrap() error { return d.Err }

// droppedEntries lists the entries in err, as workloads and services join them.
func droppedEntries(err error) []*DroppedEntry {
	var out []*DroppedEntry
	var walk func(error)
	walk = func(err error) {
		var d *DroppedEntry
		if j, ok := err.(interface{ Unwrap() []error }); ok {
			for _, e := range j.Unwrap() {
				walk(e)
			}
		} else if errors.As(err, &d) {
			out = append(out, d)
		}
	}
	if err != nil {
		walk(err)
	}
	return out
}

// noteDropped keeps the entries left out of the applied state version for the
// admin API and the metrics, and logs those not left out of the last one.
// Called with a.mu held.
func (a *Agent) noteDropped(version uint64, dropped []*DroppedEntry) {
	before := map[string]bool{}
	for _, d := range a.dropped {
		before[d.Error()] = true
	}
	counts := map[string]int{"workload": 0, "service": 0}
	for _, d := range dropped {
		counts[d.Kind]++
		if !before[d.Error()] {
			a.log.Warn("state entry left out; the rest of the state applies", "version", version, "kind", d.Kind, "name", d.Name, "error", d.Err)
		}
	}
	a.dropped = dropped
	if a.obs != nil {
		for kind, n := range counts {
			a.obs.StateDropped(kind, n)
		}
	}
}

// workloads converts the state's workloads to the proxy's form, checking every
// field the data path relies on. It returns the good ones, and an entry that is not
// (*DroppedEntry, joined in the error) is left out: an address two workloads claim
// belongs to neither, as the operator withholds both when it cannot tell which is
// the live one.
func workloads(st *ferryv1.NodeState) ([]proxy.Workload, error) {
	out := make([]proxy.Workload, 0, len(st.GetWorkloads()))
	claims := map[netip.Addr][]string{}
	for _, w := range st.GetWorkloads() {
		for _, s := range w.GetIps() {
			if ip, err := netip.ParseAddr(s); err == nil {
				claims[ip.Unmap()] = append(claims[ip.Unmap()], w.GetNamespace()+"/"+w.GetName())
			}
		}
	}
	var errs []error
	for i, w := range st.GetWorkloads() {
		name := w.GetNamespace() + "/" + w.GetName()
		pw, err := workload(w, claims)
		if err != nil {
			errs = append(errs, &DroppedEntry{Kind: "workload", Name: name, Err: fmt.Errorf("workloads[%d] (%s): %w", i, name, err)})
			continue
		}
		out = append(out, pw)
	}
	return out, errors.Join(errs...)
}

// workload converts one workload; claims are the names of the workloads claiming
// each address.
func workload(w *ferryv1.Workload, claims map[netip.Addr][]string) (proxy.Workload, error) {
	name := w.GetNamespace() + "/" + w.GetName()
	if w.GetUid() == "" || w.GetName() == "" || w.GetNamespace() == "" || w.GetNode() == "" || w.GetIdentity() == "" {
		return proxy.Workload{}, errors.New("uid, name, namespace, node and identity are required")
	}
	pw := proxy.Workload{UID: w.GetUid(), Name: name, Identity: w.GetIdentity(), Node: w.GetNode(), Workload: name}
	if wl := w.GetWorkload(); wl != "" {
		pw.Workload = w.GetNamespace() + "/" + wl
	}
	for _, s := range w.GetIps() {
		ip, err := netip.ParseAddr(s)
		if err != nil {
			return proxy.Workload{}, fmt.Errorf("ip %q: %w", s, err)
		}
		ip = ip.Unmap()
		if slices.Contains(pw.IPs, ip) {
			return proxy.Workload{}, fmt.Errorf("ip %s listed twice", ip)
		}
		if names := claims[ip]; len(names) > 1 {
			others := slices.DeleteFunc(slices.Clone(names), func(n string) bool { return n == name })
			return proxy.Workload{}, fmt.Errorf("ip %s is also claimed by %s", ip, strings.Join(others, ", "))
		}
		pw.IPs = append(pw.IPs, ip)
	}
	if len(pw.IPs) == 0 {
		return proxy.Workload{}, errors.New("no ip")
	}
	return pw, nil
}

// services converts the state's Services to the proxy's form: cluster IPs, ports,
// and every backend with its readiness and pod ports. It returns the good ones; a
// malformed entry is left out (*DroppedEntry, joined in the error), and so, in
// turn, is a Service whose routes send requests to one left out.
func services(st *ferryv1.NodeState) ([]proxy.Service, error) {
	bad := map[string]error{} // by namespace/name
	for {
		ports := servicePorts(st)
		for name := range bad {
			delete(ports, name)
		}
		var out []proxy.Service
		more := false
		for i, sv := range st.GetServices() {
			name := sv.GetNamespace() + "/" + sv.GetName()
			if bad[name] != nil {
				continue
			}
			ps, err := service(sv, ports)
			if err != nil {
				bad[name] = &DroppedEntry{Kind: "service", Name: name, Err: fmt.Errorf("services[%d] (%s): %w", i, name, err)}
				more = true
				continue
			}
			out = append(out, ps)
		}
		if !more {
			var errs []error
			for _, sv := range st.GetServices() { // in the state's order
				name := sv.GetNamespace() + "/" + sv.GetName()
				if err := bad[name]; err != nil {
					errs = append(errs, err)
					delete(bad, name) // once, should two entries share a name
				}
			}
			return out, errors.Join(errs...)
		}
	}
}

// service converts one Service; ports are the ports of every Service its routes
// may name.
func service(sv *ferryv1.Service, ports map[string]map[uint32]bool) (proxy.Service, error) {
	name := sv.GetNamespace() + "/" + sv.GetName()
	ps := proxy.Service{Name: name, LoadBalancer: proxy.LoadBalancer(sv.GetLoadBalancer())}
	if !ps.LoadBalancer.Known() {
		return ps, fmt.Errorf("load balancer %q is not one this agent has", ps.LoadBalancer)
	}
	for _, text := range sv.GetClusterIps() {
		ip, err := netip.ParseAddr(text)
		if err != nil {
			return ps, fmt.Errorf("cluster ip %q: %w", text, err)
		}
		ps.VIPs = append(ps.VIPs, ip.Unmap())
	}
	for j, p := range sv.GetPorts() {
		if p.GetPort() == 0 || p.GetPort() > 65535 {
			return ps, fmt.Errorf("ports[%d]: port %d out of range", j, p.GetPort())
		}
		ps.Ports = append(ps.Ports, proxy.ServicePort{Port: uint16(p.GetPort()), Name: p.GetName(), AppProtocol: p.GetAppProtocol()})
	}
	for j, b := range sv.GetBackends() {
		pb := proxy.Backend{Ready: b.GetReady()}
		for _, text := range b.GetIps() {
			ip, err := netip.ParseAddr(text)
			if err != nil {
				return ps, fmt.Errorf("backends[%d]: ip %q: %w", j, text, err)
			}
			pb.IPs = append(pb.IPs, ip.Unmap())
		}
		if len(b.GetPorts()) != len(ps.Ports) {
			return ps, fmt.Errorf("backends[%d]: %d ports for the service's %d", j, len(b.GetPorts()), len(ps.Ports))
		}
		for _, port := range b.GetPorts() {
			if port > 65535 {
				return ps, fmt.Errorf("backends[%d]: port %d out of range", j, port)
			}
			pb.Ports = append(pb.Ports, uint16(port))
		}
		ps.Backends = append(ps.Backends, pb)
	}
	routes, err := routeTables(sv, ports)
	if err != nil {
		return ps, err
	}
	ps.Routes = routes
	if sv.GetPolicy() != nil {
		pol, err := servicePolicy(sv.GetPolicy())
		if err != nil {
			return ps, fmt.Errorf("policy %q: %w", sv.GetPolicy().GetName(), err)
		}
		ps.Policy = pol
	}
	return ps, nil
}

// servicePorts is every Service port of the state by Service (namespace/name), which
// a route's backends and mirrors must name.
func servicePorts(st *ferryv1.NodeState) map[string]map[uint32]bool {
	out := make(map[string]map[uint32]bool, len(st.GetServices()))
	for _, sv := range st.GetServices() {
		ports := map[uint32]bool{}
		for _, p := range sv.GetPorts() {
			ports[p.GetPort()] = true
		}
		out[sv.GetNamespace()+"/"+sv.GetName()] = ports
	}
	return out
}

// routeTables converts a Service's compiled routes, checking everything the proxy
// relies on when it matches and sends a request: one bad entry rejects the state,
// as a route half applied would send requests where no one asked.
func routeTables(sv *ferryv1.Service, ports map[string]map[uint32]bool) ([]proxy.RouteTable, error) {
	own := ports[sv.GetNamespace()+"/"+sv.GetName()]
	type tableKey struct {
		port uint32
		ns   string
	}
	seen := map[tableKey]bool{}
	var out []proxy.RouteTable
	for j, t := range sv.GetRouteTables() {
		at := fmt.Sprintf("route_tables[%d]", j)
		if !own[t.GetPort()] {
			return nil, fmt.Errorf("%s: port %d is not one of the service's ports", at, t.GetPort())
		}
		k := tableKey{t.GetPort(), t.GetClientNamespace()}
		if seen[k] {
			return nil, fmt.Errorf("%s: a second table for port %d and client namespace %q", at, k.port, k.ns)
		}
		seen[k] = true
		pt := proxy.RouteTable{Port: uint16(t.GetPort()), ClientNamespace: t.GetClientNamespace()}
		for r, rule := range t.GetRules() {
			pr, err := routeRule(rule, ports)
			if err != nil {
				return nil, fmt.Errorf("%s.rules[%d]: %w", at, r, err)
			}
			pt.Rules = append(pt.Rules, pr)
		}
		for m, match := range t.GetMatches() {
			pm, err := routeMatch(match, len(pt.Rules))
			if err != nil {
				return nil, fmt.Errorf("%s.matches[%d]: %w", at, m, err)
			}
			pt.Matches = append(pt.Matches, pm)
		}
		if err := prefixRewrites(pt); err != nil {
			return nil, fmt.Errorf("%s.%w", at, err)
		}
		out = append(out, pt)
	}
	return out, nil
}

// httpMethods are the methods a route may match (Gateway API's HTTPMethod).
var httpMethods = map[string]bool{
	http.MethodGet: true, http.MethodHead: true, http.MethodPost: true, http.MethodPut: true, http.MethodDelete: true,
	http.MethodConnect: true, http.MethodOptions: true, http.MethodTrace: true, http.MethodPatch: true,
}

func routeMatch(m *ferryv1.RouteMatch, rules int) (proxy.RouteMatch, error) {
	if m.GetRule() >= uint32(rules) {
		return proxy.RouteMatch{}, fmt.Errorf("rule %d out of range (%d rules)", m.GetRule(), rules)
	}
	pm := proxy.RouteMatch{Rule: int(m.GetRule()), Method: m.GetMethod()}
	if pm.Method != "" && !httpMethods[pm.Method] {
		return proxy.RouteMatch{}, fmt.Errorf("method %q is not an HTTP method", pm.Method)
	}
	if p := m.GetPath(); p != nil {
		sm, err := stringMatch(p.GetType(), p.GetValue(), true)
		if err != nil {
			return proxy.RouteMatch{}, fmt.Errorf("path: %w", err)
		}
		if sm.Type != proxy.MatchRegex && !strings.HasPrefix(sm.Value, "/") {
			return proxy.RouteMatch{}, fmt.Errorf("path: %q does not start with /", sm.Value)
		}
		pm.Path = &sm
	}
	for k, h := range m.GetHeaders() {
		if !httpguts.ValidHeaderFieldName(h.GetName()) {
			return proxy.RouteMatch{}, fmt.Errorf("headers[%d]: %q is not a header name", k, h.GetName())
		}
		sm, err := stringMatch(h.GetType(), h.GetValue(), false)
		if err != nil {
			return proxy.RouteMatch{}, fmt.Errorf("headers[%d] (%s): %w", k, h.GetName(), err)
		}
		pm.Headers = append(pm.Headers, proxy.NamedMatch{Name: http.CanonicalHeaderKey(h.GetName()), StringMatch: sm})
	}
	for k, q := range m.GetQueryParams() {
		if q.GetName() == "" {
			return proxy.RouteMatch{}, fmt.Errorf("query_params[%d]: no name", k)
		}
		sm, err := stringMatch(q.GetType(), q.GetValue(), false)
		if err != nil {
			return proxy.RouteMatch{}, fmt.Errorf("query_params[%d] (%s): %w", k, q.GetName(), err)
		}
		pm.Query = append(pm.Query, proxy.NamedMatch{Name: q.GetName(), StringMatch: sm})
	}
	return pm, nil
}

// stringMatch checks a match's type (PathPrefix only for a path) and compiles a
// regular expression anchored at both ends, as Gateway API's full match means.
func stringMatch(typ, value string, path bool) (proxy.StringMatch, error) {
	sm := proxy.StringMatch{Type: proxy.MatchType(typ), Value: value}
	switch sm.Type {
	case proxy.MatchExact:
	case proxy.MatchPathPrefix:
		if !path {
			return sm, fmt.Errorf("match type %q is for paths only", typ)
		}
	case proxy.MatchRegex:
		re, err := regexp.Compile(`^(?:` + value + `)$`)
		if err != nil {
			return sm, fmt.Errorf("regular expression %q: %w", value, err)
		}
		sm.Regex = re
	default:
		return sm, fmt.Errorf("match type %q is not one this agent has", typ)
	}
	return sm, nil
}

// Gateway API's bounds on a backend's weight and a retried status.
const (
	maxWeight                         = 1_000_000
	minRetryCode, maxRetryCode uint32 = 400, 599
)

func routeRule(r *ferryv1.RouteRule, ports map[string]map[uint32]bool) (proxy.RouteRule, error) {
	if r.GetRoute() == "" {
		return proxy.RouteRule{}, errors.New("no route name")
	}
	pr := proxy.RouteRule{
		Route: r.GetRoute(), Index: int(r.GetIndex()),
		RequestTimeout: time.Duration(r.GetRequestTimeoutMs()) * time.Millisecond,
		BackendTimeout: time.Duration(r.GetBackendRequestTimeoutMs()) * time.Millisecond,
	}
	if pr.RequestTimeout > 0 && pr.BackendTimeout > pr.RequestTimeout {
		return proxy.RouteRule{}, fmt.Errorf("backend request timeout %s exceeds the request timeout %s", pr.BackendTimeout, pr.RequestTimeout)
	}
	var total uint64
	for k, b := range r.GetBackends() {
		pb, err := weightedBackend(b, ports)
		if err != nil {
			return proxy.RouteRule{}, fmt.Errorf("backends[%d]: %w", k, err)
		}
		total += uint64(pb.Weight)
		pr.Backends = append(pr.Backends, pb)
	}
	if len(pr.Backends) > 0 && total == 0 {
		return proxy.RouteRule{}, errors.New("backends: weights sum to 0")
	}
	once := map[string]bool{}
	for k, f := range r.GetFilters() {
		pf, kind, err := routeFilter(f, ports)
		if err != nil {
			return proxy.RouteRule{}, fmt.Errorf("filters[%d]: %w", k, err)
		}
		// Gateway API allows each filter once per rule, mirrors excepted, and a
		// redirect and a rewrite not together.
		if kind != "mirror" && once[kind] {
			return proxy.RouteRule{}, fmt.Errorf("filters[%d]: a second %s filter", k, kind)
		}
		once[kind] = true
		if once["redirect"] && once["url_rewrite"] {
			return proxy.RouteRule{}, fmt.Errorf("filters[%d]: a redirect and a url_rewrite in one rule", k)
		}
		pr.Filters = append(pr.Filters, pf)
	}
	if rt := r.GetRetry(); rt != nil {
		var err error
		if pr.Retry, err = retry("retry", rt); err != nil {
			return proxy.RouteRule{}, err
		}
	}
	return pr, nil
}

func weightedBackend(b *ferryv1.WeightedBackend, ports map[string]map[uint32]bool) (proxy.WeightedBackend, error) {
	svc, ok := ports[b.GetService()]
	if !ok {
		return proxy.WeightedBackend{}, fmt.Errorf("service %q is not in the state", b.GetService())
	}
	if !svc[b.GetPort()] {
		return proxy.WeightedBackend{}, fmt.Errorf("service %s has no port %d", b.GetService(), b.GetPort())
	}
	if b.GetWeight() > maxWeight {
		return proxy.WeightedBackend{}, fmt.Errorf("weight %d above %d", b.GetWeight(), maxWeight)
	}
	return proxy.WeightedBackend{Service: b.GetService(), Port: uint16(b.GetPort()), Weight: b.GetWeight()}, nil
}

// routeFilter converts one filter and says which kind it is (its field's name).
func routeFilter(f *ferryv1.RouteFilter, ports map[string]map[uint32]bool) (proxy.RouteFilter, string, error) {
	var err error
	var pf proxy.RouteFilter
	switch f.GetFilter().(type) {
	case *ferryv1.RouteFilter_RequestHeaders:
		pf.RequestHeaders, err = headerModifier(f.GetRequestHeaders())
		return pf, "request_headers", err
	case *ferryv1.RouteFilter_ResponseHeaders:
		pf.ResponseHeaders, err = headerModifier(f.GetResponseHeaders())
		return pf, "response_headers", err
	case *ferryv1.RouteFilter_Redirect:
		pf.Redirect, err = redirect(f.GetRedirect())
		return pf, "redirect", err
	case *ferryv1.RouteFilter_UrlRewrite:
		u := f.GetUrlRewrite()
		if u == nil {
			return pf, "", errors.New("url_rewrite: empty")
		}
		if err := hostname(u.GetHostname()); err != nil {
			return pf, "", fmt.Errorf("url_rewrite: %w", err)
		}
		pf.URLRewrite = &proxy.URLRewrite{Hostname: u.GetHostname()}
		if pf.URLRewrite.Path, err = pathModifier(u.GetPath()); err != nil {
			return pf, "", fmt.Errorf("url_rewrite: %w", err)
		}
		return pf, "url_rewrite", nil
	case *ferryv1.RouteFilter_Mirror:
		m := f.GetMirror()
		if m == nil || m.GetBackend() == nil {
			return pf, "", errors.New("mirror: no backend")
		}
		b, err := weightedBackend(m.GetBackend(), ports)
		if err != nil {
			return pf, "", fmt.Errorf("mirror.backend: %w", err)
		}
		if m.GetPercent() < 0 || m.GetPercent() > 100 || math.IsNaN(m.GetPercent()) {
			return pf, "", fmt.Errorf("mirror: percent %v not between 0 and 100", m.GetPercent())
		}
		pf.Mirror = &proxy.Mirror{Backend: b, Percent: m.GetPercent()}
		return pf, "mirror", nil
	}
	return pf, "", errors.New("no filter set")
}

func headerModifier(m *ferryv1.HeaderModifier) (*proxy.HeaderModifier, error) {
	if m == nil {
		return nil, errors.New("header modifier: empty")
	}
	pm := &proxy.HeaderModifier{}
	headers := func(list []*ferryv1.Header, field string) ([]proxy.Header, error) {
		var out []proxy.Header
		for k, h := range list {
			if !httpguts.ValidHeaderFieldName(h.GetName()) {
				return nil, fmt.Errorf("%s[%d]: %q is not a header name", field, k, h.GetName())
			}
			if !httpguts.ValidHeaderFieldValue(h.GetValue()) {
				return nil, fmt.Errorf("%s[%d] (%s): value %q is not a header value", field, k, h.GetName(), h.GetValue())
			}
			out = append(out, proxy.Header{Name: http.CanonicalHeaderKey(h.GetName()), Value: h.GetValue()})
		}
		return out, nil
	}
	var err error
	if pm.Set, err = headers(m.GetSet(), "set"); err != nil {
		return nil, err
	}
	if pm.Add, err = headers(m.GetAdd(), "add"); err != nil {
		return nil, err
	}
	for k, name := range m.GetRemove() {
		if !httpguts.ValidHeaderFieldName(name) {
			return nil, fmt.Errorf("remove[%d]: %q is not a header name", k, name)
		}
		pm.Remove = append(pm.Remove, http.CanonicalHeaderKey(name))
	}
	return pm, nil
}

func redirect(r *ferryv1.Redirect) (*proxy.Redirect, error) {
	if r == nil {
		return nil, errors.New("redirect: empty")
	}
	pr := &proxy.Redirect{Scheme: r.GetScheme(), Hostname: r.GetHostname(), StatusCode: int(r.GetStatusCode())}
	switch pr.Scheme {
	case "", "http", "https":
	default:
		return nil, fmt.Errorf("redirect: scheme %q is not http or https", pr.Scheme)
	}
	if err := hostname(pr.Hostname); err != nil {
		return nil, fmt.Errorf("redirect: %w", err)
	}
	if r.GetPort() > 65535 {
		return nil, fmt.Errorf("redirect: port %d out of range", r.GetPort())
	}
	pr.Port = uint16(r.GetPort())
	switch pr.StatusCode {
	case 0:
		pr.StatusCode = http.StatusFound
	case http.StatusMovedPermanently, http.StatusFound:
	default:
		return nil, fmt.Errorf("redirect: status %d is not 301 or 302", pr.StatusCode)
	}
	var err error
	if pr.Path, err = pathModifier(r.GetPath()); err != nil {
		return nil, fmt.Errorf("redirect: %w", err)
	}
	return pr, nil
}

// hostname checks a host a redirect or rewrite puts in a request or a Location: a
// name or address without a port ("" keeps the request's).
func hostname(h string) error {
	if h == "" {
		return nil
	}
	if strings.ContainsAny(h, "/:?#@ ") || !httpguts.ValidHostHeader(h) {
		return fmt.Errorf("hostname %q is not a host name", h)
	}
	return nil
}

func pathModifier(m *ferryv1.PathModifier) (*proxy.PathModifier, error) {
	if m == nil {
		return nil, nil
	}
	pm := &proxy.PathModifier{Type: proxy.PathModifierType(m.GetType()), Value: m.GetValue()}
	switch pm.Type {
	case proxy.ReplaceFullPath, proxy.ReplacePrefixMatch:
	default:
		return nil, fmt.Errorf("path modifier type %q is not one this agent has", m.GetType())
	}
	// A prefix may be replaced by nothing ("/foo/bar" becomes "/bar"); a full path
	// must be one.
	if !strings.HasPrefix(pm.Value, "/") && (pm.Type == proxy.ReplaceFullPath || pm.Value != "") {
		return nil, fmt.Errorf("path modifier value %q does not start with /", pm.Value)
	}
	return pm, nil
}

// prefixRewrites checks that a rule replacing the matched prefix (a rewrite's or a
// redirect's ReplacePrefixMatch) is matched by path prefixes only: there is no
// prefix to replace otherwise (Gateway API requires it). A match without a path is
// the prefix "/".
func prefixRewrites(t proxy.RouteTable) error {
	for m, match := range t.Matches {
		if match.Path == nil || match.Path.Type == proxy.MatchPathPrefix {
			continue
		}
		for k, f := range t.Rules[match.Rule].Filters {
			var pm *proxy.PathModifier
			switch {
			case f.URLRewrite != nil:
				pm = f.URLRewrite.Path
			case f.Redirect != nil:
				pm = f.Redirect.Path
			}
			if pm != nil && pm.Type == proxy.ReplacePrefixMatch {
				return fmt.Errorf("rules[%d].filters[%d]: ReplacePrefixMatch with matches[%d], a %s path match, not a PathPrefix", match.Rule, k, m, match.Path.Type)
			}
		}
	}
	return nil
}

// Bounds on what a policy may ask, beyond which it is a mistake rather than a
// setting: a day for a timeout, and a retry count no outage is worth.
const (
	maxPolicyDuration = 24 * time.Hour
	maxRetryAttempts  = 10
)

// servicePolicy converts a Service's compiled TrafficPolicy, checking each field the
// proxy relies on; the error names the field.
func servicePolicy(sp *ferryv1.ServicePolicy) (proxy.Policy, error) {
	pol := proxy.Policy{
		Name:                     sp.GetName(),
		MaxConnections:           int(sp.GetMaxConnections()),
		MaxPendingRequests:       int(sp.GetMaxPendingRequests()),
		MaxRequests:              int(sp.GetMaxRequests()),
		MaxRequestsPerConnection: int(sp.GetMaxRequestsPerConnection()),
	}
	if pol.Name == "" {
		return proxy.Policy{}, errors.New("name is required")
	}
	if h := sp.GetHashHeader(); h != "" {
		if !httpguts.ValidHeaderFieldName(h) {
			return proxy.Policy{}, fmt.Errorf("hash_header %q is not a header name", h)
		}
		pol.HashHeader = http.CanonicalHeaderKey(h)
	}
	var err error
	for _, d := range []struct {
		field string
		ms    uint32
		to    *time.Duration
	}{
		{"connect_timeout_ms", sp.GetConnectTimeoutMs(), &pol.ConnectTimeout},
		{"idle_timeout_ms", sp.GetIdleTimeoutMs(), &pol.IdleTimeout},
		{"request_timeout_ms", sp.GetRequestTimeoutMs(), &pol.RequestTimeout},
	} {
		if *d.to, err = millis(d.field, d.ms); err != nil {
			return proxy.Policy{}, err
		}
	}
	if od := sp.GetOutlierDetection(); od != nil {
		o := &proxy.OutlierDetection{
			Consecutive5xx:           int(od.GetConsecutive_5Xx()),
			ConsecutiveGatewayErrors: int(od.GetConsecutiveGatewayErrors()),
			MaxEjectionPercent:       int(od.GetMaxEjectionPercent()),
		}
		if o.Consecutive5xx == 0 && o.ConsecutiveGatewayErrors == 0 {
			return proxy.Policy{}, errors.New("outlier_detection: consecutive_5xx or consecutive_gateway_errors is required")
		}
		if o.MaxEjectionPercent > 100 {
			return proxy.Policy{}, fmt.Errorf("outlier_detection.max_ejection_percent %d is over 100", o.MaxEjectionPercent)
		}
		if o.Interval, err = millis("outlier_detection.interval_ms", od.GetIntervalMs()); err != nil {
			return proxy.Policy{}, err
		}
		if o.BaseEjection, err = millis("outlier_detection.base_ejection_ms", od.GetBaseEjectionMs()); err != nil {
			return proxy.Policy{}, err
		}
		pol.Outlier = o
	}
	if f := sp.GetFault(); f != nil {
		pf := &proxy.Fault{AbortPercent: f.GetAbortPercent(), AbortStatus: int(f.GetAbortStatus()), DelayPercent: f.GetDelayPercent()}
		if err := percent("fault.abort_percent", pf.AbortPercent); err != nil {
			return proxy.Policy{}, err
		}
		if err := percent("fault.delay_percent", pf.DelayPercent); err != nil {
			return proxy.Policy{}, err
		}
		if pf.AbortPercent > 0 && (pf.AbortStatus < 200 || pf.AbortStatus > 599) {
			return proxy.Policy{}, fmt.Errorf("fault.abort_status %d is not a status from 200 to 599", pf.AbortStatus)
		}
		if pf.Delay, err = millis("fault.delay_ms", f.GetDelayMs()); err != nil {
			return proxy.Policy{}, err
		}
		if pf.DelayPercent > 0 && pf.Delay == 0 {
			return proxy.Policy{}, errors.New("fault.delay_ms is required with a delay_percent")
		}
		pol.Fault = pf
	}
	if rb := sp.GetRetryBudget(); rb != nil {
		b := &proxy.RetryBudget{Percent: rb.GetPercent(), MinPerSecond: int(rb.GetMinRetriesPerSecond())}
		if err := percent("retry_budget.percent", b.Percent); err != nil {
			return proxy.Policy{}, err
		}
		if b.TTL, err = millis("retry_budget.ttl_ms", rb.GetTtlMs()); err != nil {
			return proxy.Policy{}, err
		}
		pol.RetryBudget = b
	}
	if rl := sp.GetRateLimit(); rl != nil {
		if rl.GetRequestsPerSecond() == 0 {
			return proxy.Policy{}, errors.New("rate_limit.requests_per_second is required")
		}
		pol.RateLimit = &proxy.RateLimit{PerSecond: int(rl.GetRequestsPerSecond()), Burst: int(rl.GetBurst())}
	}
	if r := sp.GetRetry(); r != nil {
		if pol.Retry, err = retry("retry", r); err != nil {
			return proxy.Policy{}, err
		}
	}
	return pol, nil
}

// retry converts a route rule's retries, or a policy's for requests no rule covers.
func retry(field string, r *ferryv1.RouteRetry) (*proxy.Retry, error) {
	if r.GetAttempts() > maxRetryAttempts {
		return nil, fmt.Errorf("%s.attempts %d is over %d", field, r.GetAttempts(), maxRetryAttempts)
	}
	pr := &proxy.Retry{Attempts: int(r.GetAttempts())}
	for j, c := range r.GetCodes() {
		if c < minRetryCode || c > maxRetryCode {
			return nil, fmt.Errorf("%s.codes[%d]: %d is not an error status (%d to %d)", field, j, c, minRetryCode, maxRetryCode)
		}
		pr.Codes = append(pr.Codes, int(c))
	}
	var err error
	if pr.Backoff, err = millis(field+".backoff_ms", r.GetBackoffMs()); err != nil {
		return nil, err
	}
	return pr, nil
}

// millis is a duration field in milliseconds, at most maxPolicyDuration.
func millis(field string, ms uint32) (time.Duration, error) {
	d := time.Duration(ms) * time.Millisecond
	if d > maxPolicyDuration {
		return 0, fmt.Errorf("%s %d is over %s", field, ms, maxPolicyDuration)
	}
	return d, nil
}

// percent checks a share from 0 to 100.
func percent(field string, p float64) error {
	if math.IsNaN(p) || p < 0 || p > 100 {
		return fmt.Errorf("%s %v is not from 0 to 100", field, p)
	}
	return nil
}

// watchFile calls apply with the file's state each time it changes, until ctx ends.
// A state that cannot be read or applied is reported and the last good one stays.
func (a *Agent) watchFile(ctx context.Context, path string, every time.Duration) {
	var lastMod time.Time
	var lastSize int64
	if fi, err := os.Stat(path); err == nil {
		lastMod, lastSize = fi.ModTime(), fi.Size()
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		fi, err := os.Stat(path)
		if err != nil || (fi.ModTime().Equal(lastMod) && fi.Size() == lastSize) {
			continue
		}
		lastMod, lastSize = fi.ModTime(), fi.Size()
		st, err := ReadStateFile(path)
		if err == nil {
			err = a.Apply(st)
		}
		if err != nil {
			a.log.Error("state file rejected; keeping the last good state", "path", path, "error", err)
		}
	}
}

// authorization converts the state's AuthorizationPolicies, checking everything the
// proxy relies on when it decides: one bad entry rejects the state, as a policy
// half applied could let through what it was written to stop.
func authorization(st *ferryv1.NodeState) ([]proxy.AuthzPolicy, error) {
	uids := make(map[string]bool, len(st.GetWorkloads()))
	for _, w := range st.GetWorkloads() {
		uids[w.GetUid()] = true
	}
	var out []proxy.AuthzPolicy
	seen := map[string]bool{}
	for i, ap := range st.GetAuthorization() {
		at := fmt.Sprintf("authorization[%d] (%s)", i, ap.GetName())
		if ap.GetName() == "" || seen[ap.GetName()] {
			return nil, fmt.Errorf("%s: a name is required, once", at)
		}
		seen[ap.GetName()] = true
		pp := proxy.AuthzPolicy{Name: ap.GetName(), Action: proxy.AuthzAction(ap.GetAction())}
		switch pp.Action {
		case proxy.AuthzAllow, proxy.AuthzDeny, proxy.AuthzAudit:
		default:
			return nil, fmt.Errorf("%s: action %q is not Allow, Deny or Audit", at, ap.GetAction())
		}
		for _, uid := range ap.GetWorkloads() {
			if !uids[uid] {
				return nil, fmt.Errorf("%s: workload %q is not in the state", at, uid)
			}
			pp.Workloads = append(pp.Workloads, uid)
		}
		for r, rule := range ap.GetRules() {
			pr, err := authzRule(rule)
			if err != nil {
				return nil, fmt.Errorf("%s: rules[%d]: %w", at, r, err)
			}
			pp.Rules = append(pp.Rules, pr)
		}
		out = append(out, pp)
	}
	return out, nil
}

func authzRule(rule *ferryv1.AuthorizationRule) (proxy.AuthzRule, error) {
	var pr proxy.AuthzRule
	for j, s := range rule.GetFrom() {
		at := fmt.Sprintf("from[%d]", j)
		src := proxy.AuthzSource{Namespaces: s.GetNamespaces(), NotNamespaces: s.GetNotNamespaces()}
		for _, ids := range [][]string{s.GetIdentities(), s.GetNotIdentities()} {
			for _, id := range ids {
				if !validIdentityPattern(id) {
					return pr, fmt.Errorf("%s: identity %q is not a SPIFFE ID with at most one * at its start or end", at, id)
				}
			}
		}
		src.Identities, src.NotIdentities = s.GetIdentities(), s.GetNotIdentities()
		for _, ns := range append(slices.Clone(s.GetNamespaces()), s.GetNotNamespaces()...) {
			if ns == "" || strings.ContainsAny(ns, "*/") {
				return pr, fmt.Errorf("%s: namespace %q is not a name", at, ns)
			}
		}
		var err error
		if src.IPBlocks, err = prefixes(s.GetIpBlocks()); err != nil {
			return pr, fmt.Errorf("%s: ip_blocks: %w", at, err)
		}
		if src.NotIPBlocks, err = prefixes(s.GetNotIpBlocks()); err != nil {
			return pr, fmt.Errorf("%s: not_ip_blocks: %w", at, err)
		}
		pr.From = append(pr.From, src)
	}
	for j, o := range rule.GetTo() {
		at := fmt.Sprintf("to[%d]", j)
		op := proxy.AuthzOperation{Methods: o.GetMethods(), Paths: o.GetPaths(), Hosts: o.GetHosts()}
		var err error
		if op.Ports, err = authzPorts(o.GetPorts()); err != nil {
			return pr, fmt.Errorf("%s: ports: %w", at, err)
		}
		if op.NotPorts, err = authzPorts(o.GetNotPorts()); err != nil {
			return pr, fmt.Errorf("%s: not_ports: %w", at, err)
		}
		for _, m := range o.GetMethods() {
			if !httpguts.ValidHeaderFieldName(m) || m != strings.ToUpper(m) {
				return pr, fmt.Errorf("%s: method %q is not an HTTP method in upper case", at, m)
			}
		}
		for _, p := range o.GetPaths() {
			if p != "*" && (!strings.HasPrefix(p, "/") || strings.Contains(strings.TrimSuffix(p, "*"), "*")) {
				return pr, fmt.Errorf("%s: path %q does not start with / or has a * before its end", at, p)
			}
		}
		for _, h := range o.GetHosts() {
			if h == "" || h != strings.ToLower(h) || strings.Contains(strings.TrimPrefix(h, "*"), "*") {
				return pr, fmt.Errorf("%s: host %q is not lower case with at most a leading *", at, h)
			}
		}
		for _, h := range o.GetHeaders() {
			if !httpguts.ValidHeaderFieldName(h.GetName()) || h.GetName() != strings.ToLower(h.GetName()) {
				return pr, fmt.Errorf("%s: header %q is not a lower-case header name", at, h.GetName())
			}
			op.Headers = append(op.Headers, proxy.AuthzHeader{Name: h.GetName(), Values: h.GetValues()})
		}
		pr.To = append(pr.To, op)
	}
	return pr, nil
}

// validIdentityPattern: s is "*", a SPIFFE ID, a SPIFFE ID's prefix followed by
// "*", or "*" followed by a suffix; never a "*" anywhere else.
func validIdentityPattern(s string) bool {
	if s == "*" {
		return true
	}
	inner := strings.TrimSuffix(strings.TrimPrefix(s, "*"), "*")
	lead, trail := strings.HasPrefix(s, "*"), strings.HasSuffix(s, "*")
	return inner != "" && !strings.Contains(inner, "*") && !(lead && trail) &&
		(lead || strings.HasPrefix(s, "spiffe://"))
}

func prefixes(ss []string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, s := range ss {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return nil, err
		}
		if p != p.Masked() {
			return nil, fmt.Errorf("%s has bits past its length", s)
		}
		out = append(out, p)
	}
	return out, nil
}

func authzPorts(ps []uint32) ([]uint16, error) {
	var out []uint16
	for _, p := range ps {
		if p == 0 || p > 65535 {
			return nil, fmt.Errorf("port %d out of range", p)
		}
		out = append(out, uint16(p))
	}
	return out, nil
}

// PeerAuthentication modes as the state carries them (Workload.mtls_mode).
const (
	mtlsPermissive = "Permissive"
	mtlsStrict     = "Strict"
)

// mtlsMode checks one mode of the state: "" is PERMISSIVE.
func mtlsMode(s string) (bpf.MTLSMode, error) {
	switch s {
	case "", mtlsPermissive:
		return bpf.MTLSPermissive, nil
	case mtlsStrict:
		return bpf.MTLSStrict, nil
	}
	return 0, fmt.Errorf("mtls mode %q is not Permissive or Strict", s)
}

// strictPorts converts the mTLS modes of node's workloads into strict_ports
// entries: a wildcard entry for a STRICT pod, and an entry per port that differs
// from its pod's mode. A PERMISSIVE pod with no STRICT port needs none. A bad mode
// or port rejects the state, as a mode half applied would take plaintext where
// STRICT was asked.
func strictPorts(st *ferryv1.NodeState, node string) ([]bpf.StrictPort, error) {
	var out []bpf.StrictPort
	for i, w := range st.GetWorkloads() {
		at := fmt.Sprintf("workloads[%d] (%s/%s)", i, w.GetNamespace(), w.GetName())
		mode, err := mtlsMode(w.GetMtlsMode())
		if err != nil {
			return nil, fmt.Errorf("%s: %w", at, err)
		}
		ports := make([]uint32, 0, len(w.GetPortMtlsModes()))
		for p := range w.GetPortMtlsModes() {
			ports = append(ports, p)
		}
		slices.Sort(ports)
		type override struct {
			port uint16
			mode bpf.MTLSMode
		}
		var overrides []override
		for _, p := range ports {
			pm, err := mtlsMode(w.GetPortMtlsModes()[p])
			if err != nil {
				return nil, fmt.Errorf("%s: port_mtls_modes[%d]: %w", at, p, err)
			}
			if p == 0 || p > 65535 {
				return nil, fmt.Errorf("%s: port_mtls_modes: port %d out of range", at, p)
			}
			if pm != mode {
				overrides = append(overrides, override{uint16(p), pm})
			}
		}
		if w.GetNode() != node {
			continue
		}
		for _, s := range w.GetIps() {
			ip, err := netip.ParseAddr(s)
			if err != nil {
				return nil, fmt.Errorf("%s: ip %q: %w", at, s, err)
			}
			if mode == bpf.MTLSStrict {
				out = append(out, bpf.StrictPort{IP: ip.Unmap(), Mode: mode})
			}
			for _, o := range overrides {
				out = append(out, bpf.StrictPort{IP: ip.Unmap(), Port: o.port, Mode: o.mode})
			}
		}
	}
	return out, nil
}
