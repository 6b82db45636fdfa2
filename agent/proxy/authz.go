// This file is AuthorizationPolicy at the destination: the compiled policies by
// the workload they protect, and the one decision every way into an enrolled pod
// asks for (a tunnel stream, a plaintext connection, a same-node connection, and
// each HTTP request carried at L7).

package proxy

import (
	"errors"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"

	"github.com/ferrymesh/ferry/agent/tunnel"
	"github.com/ferrymesh/ferry/api/admin"
	"github.com/ferrymesh/ferry/api/spiffe"
)

// AuthzAction is what a policy does with what it matches.
type AuthzAction string

// Authorization actions (api/v1alpha1.AuthorizationAction).
const (
	AuthzAllow AuthzAction = "Allow"
	AuthzDeny  AuthzAction = "Deny"
	AuthzAudit AuthzAction = "Audit"
)

// AuthzPolicy is a compiled AuthorizationPolicy (ferryv1.AuthorizationPolicy).
type AuthzPolicy struct {
	Name      string // namespace/name
	Action    AuthzAction
	Workloads []string // UIDs of the workloads it protects
	// Rules: any one matches; none, the policy matches nothing (as Istio's).
	Rules []AuthzRule
}

// AuthzRule matches when its From (any source, or none given) and its To (any
// operation, or none given) both match.
type AuthzRule struct {
	From []AuthzSource
	To   []AuthzOperation
}

// AuthzSource matches a caller: every non-empty list must match, a Not list when
// none of its entries does.
type AuthzSource struct {
	Identities, NotIdentities []string // a leading or trailing "*" is a wildcard
	Namespaces, NotNamespaces []string
	IPBlocks, NotIPBlocks     []netip.Prefix
}

// AuthzOperation matches the destination port and, for HTTP, the request.
type AuthzOperation struct {
	Ports, NotPorts []uint16
	Methods         []string
	Paths           []string // normalised; a trailing "*" matches any suffix
	Hosts           []string // lower case, no port; a leading "*" matches any prefix
	Headers         []AuthzHeader
}

// AuthzHeader needs the header (lower-case name) with one of Values, or any value.
type AuthzHeader struct {
	Name   string
	Values []string
}

// http says whether the operation needs a request to be decided.
func (o *AuthzOperation) http() bool {
	return len(o.Methods) > 0 || len(o.Paths) > 0 || len(o.Hosts) > 0 || len(o.Headers) > 0
}

// authzTable is the policies by protected workload, Deny, Allow and Audit apart.
type authzTable map[string]*workloadAuthz

type workloadAuthz struct {
	deny, allow, audit []*AuthzPolicy
}

// SetAuthorization replaces the policies the proxy enforces. The agent sets them
// with the rest of a state, before the pods of that state get listeners, so a
// pod is never served without its policies.
func (p *Proxy) SetAuthorization(ps []AuthzPolicy) {
	t := authzTable{}
	for i := range ps {
		pol := &ps[i]
		for _, uid := range pol.Workloads {
			w := t[uid]
			if w == nil {
				w = &workloadAuthz{}
				t[uid] = w
			}
			switch pol.Action {
			case AuthzDeny:
				w.deny = append(w.deny, pol)
			case AuthzAudit:
				w.audit = append(w.audit, pol)
			default:
				w.allow = append(w.allow, pol)
			}
		}
	}
	p.mu.Lock()
	p.authz = t
	p.mu.Unlock()
}

// caller is who opened a connection or sent a request, as the destination knows
// it: the identity is the verified peer certificate's (the source pod's, on the
// same node), "" for plaintext.
type caller struct {
	identity  string
	namespace string
	addr      netip.Addr
}

func callerOf(identity string, addr netip.Addr) caller {
	c := caller{identity: identity, addr: addr.Unmap()}
	if identity != "" {
		_, c.namespace, _, _ = spiffe.Parse(identity)
	}
	return c
}

// authzRequest is what HTTP rules see of a request; nil for a TCP connection.
type authzRequest struct {
	method string
	path   string // normalised
	host   string // lower case, no port
	header http.Header
	// foldCase: paths match whatever their case (PathOptions.CaseInsensitive).
	foldCase bool
}

// PolicyDenied is a connection or request a policy refused.
type PolicyDenied struct {
	Policy string // namespace/name of the Deny policy, or of the first Allow policy
	// Allow: no Allow policy matched (Policy is one of them); else a Deny matched.
	Allow bool
}

// deniedPrefix starts PolicyDenied's text, which a refused tunnel stream carries
// back to the source as its reason (refusedByPolicy reads it there).
const deniedPrefix = "denied by policy "

func (e *PolicyDenied) Error() string {
	if e.Allow {
		return deniedPrefix + e.Policy + ": no allow policy matches"
	}
	return deniedPrefix + e.Policy
}

// refusedByPolicy finds, in a tunnel's refusal, the destination's policy that
// refused the stream, so the source's record names it too.
func refusedByPolicy(err error) (string, bool) {
	var re *tunnel.RefusedError
	if !errors.As(err, &re) || re.Status != http.StatusForbidden {
		return "", false
	}
	rest, ok := strings.CutPrefix(re.Reason, deniedPrefix)
	if !ok {
		return "", false
	}
	pol, _, _ := strings.Cut(rest, ":")
	return pol, true
}

// AuthzDecision is what the policies of a workload decide for a connection or a
// request, and what decides it: enforcement and `ferry explain` both get it from
// decideAuthz, so explain cannot tell another story than the proxy enforces.
type AuthzDecision struct {
	// Denied is set when the connection or request is refused.
	Denied *PolicyDenied
	// Policy is the policy that decided (the Deny that matched, the Allow that
	// matched, or the first Allow when none did); "" when no policy protects
	// the workload, or only Deny policies that do not match.
	Policy string
	Action AuthzAction
	// Rule is the index of the deciding policy's rule that matched; -1 when no
	// rule matched (no Allow matched, or no policy decided).
	Rule int
	// Audits are the Audit policies that match.
	Audits []string
}

// decideAuthz decides a connection (req nil) or request from c to port of workload
// uid: a matching Deny refuses it; else, if any Allow protects uid, one must
// match.
func (p *Proxy) decideAuthz(uid string, c caller, port uint16, req *authzRequest) AuthzDecision {
	p.mu.RLock()
	w := p.authz[uid]
	p.mu.RUnlock()
	d := AuthzDecision{Rule: -1}
	if w == nil {
		return d
	}
	for _, pol := range w.audit {
		if pol.matches(c, port, req, false) >= 0 {
			d.Audits = append(d.Audits, pol.Name)
		}
	}
	for _, pol := range w.deny {
		if r := pol.matches(c, port, req, true); r >= 0 {
			d.Policy, d.Action, d.Rule = pol.Name, AuthzDeny, r
			d.Denied = &PolicyDenied{Policy: pol.Name}
			return d
		}
	}
	if len(w.allow) == 0 {
		return d
	}
	for _, pol := range w.allow {
		if r := pol.matches(c, port, req, false); r >= 0 {
			d.Policy, d.Action, d.Rule = pol.Name, AuthzAllow, r
			return d
		}
	}
	d.Policy, d.Action = w.allow[0].Name, AuthzAllow
	d.Denied = &PolicyDenied{Policy: w.allow[0].Name, Allow: true}
	return d
}

// matches returns the index of the first rule that matches, -1 for none. On a
// TCP connection (req nil) HTTP conditions cannot be decided: a Deny (deny true)
// ignores them, so the rest of its rule refuses the connection; an Allow's or
// Audit's rule with them does not match (Istio's rule: the stricter reading
// either way).
func (pol *AuthzPolicy) matches(c caller, port uint16, req *authzRequest, deny bool) int {
	for i := range pol.Rules {
		r := &pol.Rules[i]
		if (len(r.From) == 0 || slices.ContainsFunc(r.From, func(s AuthzSource) bool { return s.matches(c) })) &&
			(len(r.To) == 0 || slices.ContainsFunc(r.To, func(o AuthzOperation) bool { return o.matches(port, req, deny) })) {
			return i
		}
	}
	return -1
}

func (s *AuthzSource) matches(c caller) bool {
	idMatch := func(pat string) bool { return c.identity != "" && wildcard(pat, c.identity) }
	nsMatch := func(ns string) bool { return c.namespace != "" && ns == c.namespace }
	ipMatch := func(pfx netip.Prefix) bool { return pfx.Contains(c.addr) }
	return (len(s.Identities) == 0 || slices.ContainsFunc(s.Identities, idMatch)) &&
		!slices.ContainsFunc(s.NotIdentities, idMatch) &&
		(len(s.Namespaces) == 0 || slices.ContainsFunc(s.Namespaces, nsMatch)) &&
		!slices.ContainsFunc(s.NotNamespaces, nsMatch) &&
		(len(s.IPBlocks) == 0 || slices.ContainsFunc(s.IPBlocks, ipMatch)) &&
		!slices.ContainsFunc(s.NotIPBlocks, ipMatch)
}

func (o *AuthzOperation) matches(port uint16, req *authzRequest, deny bool) bool {
	if len(o.Ports) > 0 && !slices.Contains(o.Ports, port) || slices.Contains(o.NotPorts, port) {
		return false
	}
	if !o.http() {
		return true
	}
	if req == nil {
		return deny
	}
	if len(o.Methods) > 0 && !slices.Contains(o.Methods, req.method) {
		return false
	}
	if len(o.Paths) > 0 && !slices.ContainsFunc(o.Paths, func(pat string) bool { return pathMatch(pat, req.path, req.foldCase) }) {
		return false
	}
	if len(o.Hosts) > 0 && !slices.ContainsFunc(o.Hosts, func(pat string) bool { return wildcard(pat, req.host) }) {
		return false
	}
	for _, h := range o.Headers {
		// Every value of every line of the header is looked at, so a second
		// line cannot hide a value a Deny is looking for.
		vals := req.header.Values(h.Name)
		if len(vals) == 0 || len(h.Values) > 0 && !slices.ContainsFunc(vals, func(v string) bool { return slices.Contains(h.Values, v) }) {
			return false
		}
	}
	return true
}

// wildcard matches s against pat: "*" any non-empty s, "*x" a suffix, "x*" a
// prefix, else exactly.
func wildcard(pat, s string) bool {
	switch {
	case pat == "*":
		return s != ""
	case strings.HasPrefix(pat, "*"):
		return strings.HasSuffix(s, pat[1:])
	case strings.HasSuffix(pat, "*"):
		return strings.HasPrefix(s, pat[:len(pat)-1])
	}
	return s == pat
}

// pathMatch compares a normalised path with a rule's: a trailing "*" matches any
// suffix; otherwise one trailing slash makes no difference, so a Deny of /admin
// also holds for /admin/ (what most apps serve alike). foldCase compares them
// in lower case (MeshConfig.case_insensitive_paths).
func pathMatch(pat, path string, foldCase bool) bool {
	if foldCase {
		pat, path = strings.ToLower(pat), strings.ToLower(path)
	}
	if strings.HasSuffix(pat, "*") {
		return wildcard(pat, path)
	}
	trim := func(s string) string {
		if len(s) > 1 {
			return strings.TrimSuffix(s, "/")
		}
		return s
	}
	return trim(pat) == trim(path)
}

// requestHost is the request's Host as rules compare it: lower case, without a
// port.
func requestHost(h string) string {
	if host, _, err := net.SplitHostPort(h); err == nil {
		h = host
	}
	return strings.ToLower(strings.TrimSuffix(h, "."))
}

// AuthzObserver, when the Config's Observer is one too, is told of every
// authorization decision a policy made: action "audit" for each Audit match,
// "deny" for each denial.
type AuthzObserver interface {
	Authorized(policy, action string)
}

// admit decides a connection (req nil) or request from c into pod pd on port,
// logs the Audit policies that match and tells the observer what decided.
func (p *Proxy) admit(pd *pod, c caller, port uint16, req *authzRequest) *PolicyDenied {
	d := p.decideAuthz(pd.w.UID, c, port, req)
	denied := d.Denied
	obs, _ := p.cfg.Observer.(AuthzObserver)
	for _, a := range d.Audits {
		args := []any{"policy", a, "pod", pd.w.Name, "src", c.addr, "src_identity", c.identity, "port", port}
		if req != nil {
			args = append(args, "method", req.method, "path", req.path)
		}
		p.log.Info("authorization audit", args...)
		if obs != nil {
			obs.Authorized(a, "audit")
		}
	}
	if denied != nil {
		p.log.Debug("denied by policy", "policy", denied.Policy, "pod", pd.w.Name, "src", c.addr, "src_identity", c.identity, "port", port)
		if obs != nil {
			obs.Authorized(denied.Policy, "deny")
		}
	}
	return denied
}

// policyRefused records c as denied by a policy.
func (t *tracker) policyRefused(c *Conn, err *PolicyDenied) {
	c = t.take(c)
	c.Verdict, c.Reason, c.Policy = admin.VerdictDenied, admin.ReasonPolicy, err.Policy
	t.end(c, 0, 0, err)
}

// asPolicyDenied finds a policy refusal in err.
func asPolicyDenied(err error) (*PolicyDenied, bool) {
	var pd *PolicyDenied
	ok := errors.As(err, &pd)
	return pd, ok
}

// admitRequest decides a request into pod pd from c, on port; a denied request
// is answered 403 and its record says which policy. r's path is normalised
// already (serveRequest).
func (p *Proxy) admitRequest(pd *pod, c caller, port uint16, r *http.Request, w http.ResponseWriter, rec *Conn) bool {
	d := p.admit(pd, c, port, p.requestOf(r))
	if d == nil {
		return true
	}
	rec.Verdict, rec.Reason, rec.Policy, rec.Error = admin.VerdictDenied, admin.ReasonPolicy, d.Policy, d.Error()
	meshAnswer(w, http.StatusForbidden, "RBAC: access denied")
	return false
}

func (p *Proxy) requestOf(r *http.Request) *authzRequest {
	return &authzRequest{method: r.Method, path: r.URL.EscapedPath(), host: requestHost(r.Host), header: r.Header,
		foldCase: p.pathOptions().CaseInsensitive}
}

// admitLocal decides a request the source pod's proxy sends to a pod of this
// node (no destination proxy will see it): a denial is a mesh answer, 403.
func (p *Proxy) admitLocal(from, to *pod, port uint16, r *http.Request) error {
	if d := p.admit(to, callerOf(from.w.Identity, from.w.IPs[0]), port, p.requestOf(r)); d != nil {
		return &meshError{status: http.StatusForbidden, reason: admin.ReasonPolicy, why: "RBAC: access denied", policy: d.Policy}
	}
	return nil
}
