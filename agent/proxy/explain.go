// This file answers `ferry explain` for the proxy: what it would do with a
// connection or request from a source to a destination, from the tables it
// enforces now, and with the same functions (route lookup, route match,
// decideAuthz), so the answer is what enforcement does.

package proxy

import (
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"

	"github.com/ferrymesh/ferry/api/admin"
)

// Explain answers q. An unknown source pod or Service is an *admin.ExplainError.
func (p *Proxy) Explain(q admin.ExplainQuery) (admin.Explain, error) {
	ex := admin.Explain{Node: p.cfg.Node, Query: q, Route: admin.ExplainRoute{Rule: -1}}
	src, srcAddr, err := p.explainSource(q.Src)
	if err != nil {
		return ex, err
	}
	dst, err := p.explainDestination(q.Dst)
	if err != nil {
		return ex, err
	}
	enrolled := src.UID != ""
	ex.Source = admin.ExplainSource{Pod: src.Name, IP: srcAddr.String(), Node: src.Node, Identity: src.Identity, Enrolled: enrolled}
	ex.Destination.Addr = dst.String()

	var req *http.Request
	var pathErr error
	if q.Method != "" || q.Path != "" {
		if req, pathErr = p.explainRequest(q, dst); pathErr != nil && req == nil {
			return ex, pathErr
		}
	}

	p.mu.RLock()
	vp, service, isService := p.services.lookup(dst)
	var endpoints []netip.AddrPort
	switch w, isPod := p.byIP[dst.Addr().Unmap()]; {
	case isService:
		ex.Destination.Kind, ex.Destination.Service = "service", service
		ex.Route.Service, ex.Route.Port = service, dst.Port()
		endpoints = p.explainServiceRoute(&ex.Route, vp, src, enrolled, dst, req, pathErr)
	case isPod:
		ex.Destination.Kind, ex.Destination.Pod = "pod", w.Name
		endpoints = []netip.AddrPort{dst}
		ex.Route.Why = "a pod address: the connection goes to it, carried whole"
	default:
		ex.Destination.Kind = "outside"
		endpoints = []netip.AddrPort{dst}
		ex.Route.Why = "outside the mesh: sent unchanged, in plaintext"
	}
	type target struct {
		ep   admin.ExplainEndpoint
		addr netip.AddrPort
		uid  string
	}
	var targets []target
	for _, a := range endpoints {
		r := decide(a.Addr(), p.byIP, p.local)
		ep := admin.ExplainEndpoint{Addr: a.String(), Pod: r.Peer.Name, Node: r.Peer.Node, Identity: r.Peer.Identity, Security: r.Security}
		if !enrolled {
			ep.Security = admin.Plaintext // nothing captures the source: it dials on its own
		}
		targets = append(targets, target{ep: ep, addr: a, uid: r.Peer.UID})
	}
	p.mu.RUnlock()

	for _, t := range targets {
		ex.Route.Endpoints = append(ex.Route.Endpoints, t.ep)
		if t.uid == "" {
			continue // outside the mesh: no policy of Ferry's
		}
		d := admin.ExplainDecision{Endpoint: t.ep.Addr, Pod: t.ep.Pod, Node: t.ep.Node, DecidedBy: p.cfg.Node, Level: "connection"}
		c := callerOf("", srcAddr)
		if enrolled {
			c = callerOf(src.Identity, srcAddr)
			d.Caller = src.Identity
		}
		var ar *authzRequest
		if (ex.Route.L7 || q.Request && enrolled) && req != nil && pathErr == nil {
			d.Level, ar = "request", p.requestOf(req)
		}
		d.Verdict = explainVerdict(p.decideAuthz(t.uid, c, t.addr.Port(), ar))
		if ar != nil {
			d.Verdict.Path = ar.path
		}
		ex.Decisions = append(ex.Decisions, d)
	}
	return ex, nil
}

// explainServiceRoute fills rt for a connection or request to Service port vp
// (nil: the Service lacks the port) and returns the endpoints it may go to. The
// caller holds p.mu.
func (p *Proxy) explainServiceRoute(rt *admin.ExplainRoute, vp *vipPort, src Workload, enrolled bool, dst netip.AddrPort, req *http.Request, pathErr error) []netip.AddrPort {
	if !enrolled {
		rt.Why = "the source is not enrolled: nothing captures its connection, and nothing routes a cluster IP outside the mesh"
		return nil
	}
	if vp == nil {
		rt.Why = "the Service has no such port: the connection is refused"
		return nil
	}
	rt.Protocol = vp.protocol
	rt.L7 = req != nil && vp.protocol != admin.TCP
	eps := func(v *vipPort) []netip.AddrPort {
		var out []netip.AddrPort
		for _, e := range v.endpoints {
			out = append(out, e.addr)
		}
		return out
	}
	if !rt.L7 {
		rt.Why = "carried whole (L4): one of the Service's endpoints per connection"
		if len(vp.endpoints) == 0 {
			rt.Status, rt.Why = http.StatusServiceUnavailable, "no ready endpoint: the connection is refused"
		}
		return eps(vp)
	}
	if pathErr != nil {
		rt.Status, rt.Why = http.StatusBadRequest, "the proxy answers 400: "+pathErr.Error()
		return nil
	}
	ns, _, _ := strings.Cut(src.Name, "/")
	t := vp.table(ns)
	if t == nil {
		rt.Why = "each request to one of the Service's endpoints (no route attaches to the port)"
		return eps(vp)
	}
	m := t.match(req)
	if m == nil {
		rt.Status, rt.Why = http.StatusNotFound, "no route rule matches: the proxy answers 404"
		return nil
	}
	rule := &t.Rules[m.Rule]
	rt.Route, rt.Rule = rule.Route, rule.Index
	var out []netip.AddrPort
	var names []string
	for _, b := range rule.Backends {
		if b.Weight == 0 {
			continue
		}
		names = append(names, b.Service+":"+strconv.Itoa(int(b.Port)))
		if bv := p.services.backend(b, dst.Addr().Unmap().Is4()); bv != nil {
			out = append(out, eps(bv)...)
		}
	}
	rt.Why = fmt.Sprintf("rule %d of route %s sends it to %s", rule.Index, rule.Route, strings.Join(names, ", "))
	return out
}

// explainSource finds the source: a workload by name or IP, or an address
// outside the mesh (Workload zero).
func (p *Proxy) explainSource(s string) (Workload, netip.Addr, error) {
	if ip, err := netip.ParseAddr(s); err == nil {
		w, _ := p.workloadAt(ip.Unmap())
		return w, ip.Unmap(), nil
	}
	if !strings.Contains(s, "/") {
		return Workload{}, netip.Addr{}, &admin.ExplainError{Why: fmt.Sprintf("source %q: give a pod as namespace/name, or an IP", s)}
	}
	p.mu.RLock()
	defer p.mu.RUnlock()
	for _, w := range p.byIP {
		if w.Name == s {
			return w, w.IPs[0].Unmap(), nil
		}
	}
	return Workload{}, netip.Addr{}, &admin.ExplainError{Why: fmt.Sprintf("source %s: no such pod in the mesh (a pod that is not enrolled is given by its IP)", s)}
}

// explainDestination reads host:port, host an IP or a Service's DNS name.
func (p *Proxy) explainDestination(s string) (netip.AddrPort, error) {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return netip.AddrPort{}, &admin.ExplainError{Why: fmt.Sprintf("destination %q: want host:port", s)}
	}
	n, err := strconv.ParseUint(port, 10, 16)
	if err != nil || n == 0 {
		return netip.AddrPort{}, &admin.ExplainError{Why: fmt.Sprintf("destination %q: port %q is not a port number", s, port)}
	}
	if ip, err := netip.ParseAddr(host); err == nil {
		return netip.AddrPortFrom(ip.Unmap(), uint16(n)), nil
	}
	name := strings.TrimSuffix(strings.TrimSuffix(strings.ToLower(host), "."), ".cluster.local")
	name = strings.TrimSuffix(name, ".svc")
	svc, ns, ok := strings.Cut(name, ".")
	if !ok || strings.Contains(ns, ".") {
		return netip.AddrPort{}, &admin.ExplainError{Why: fmt.Sprintf("destination %q: want an IP or a Service's name.namespace[.svc.cluster.local]", host)}
	}
	p.mu.RLock()
	defer p.mu.RUnlock()
	var vips []netip.Addr
	for vip, n := range p.services.vips {
		if n == ns+"/"+svc {
			vips = append(vips, vip)
		}
	}
	if len(vips) == 0 {
		return netip.AddrPort{}, &admin.ExplainError{Why: fmt.Sprintf("destination %s: no Service %s/%s with a cluster IP in the mesh", host, ns, svc)}
	}
	slices.SortFunc(vips, func(a, b netip.Addr) int { return a.Compare(b) }) // IPv4 first
	return netip.AddrPortFrom(vips[0], uint16(n)), nil
}

// explainRequest is the request q describes, its path normalised as serveRequest
// does; with a path the mesh refuses, the request unnormalised and the error.
func (p *Proxy) explainRequest(q admin.ExplainQuery, dst netip.AddrPort) (*http.Request, error) {
	method := q.Method
	if method == "" {
		method = http.MethodGet
	}
	path := q.Path
	if path == "" {
		path = "/"
	}
	u, err := url.ParseRequestURI(path)
	if err != nil || !strings.HasPrefix(path, "/") {
		return nil, &admin.ExplainError{Why: fmt.Sprintf("path %q: want an absolute path, as a request line carries it", path)}
	}
	host := q.Dst
	if h, _, err := net.SplitHostPort(q.Dst); err == nil {
		host = h
	}
	r := &http.Request{Method: strings.ToUpper(method), URL: u, RequestURI: path, Host: host, Header: http.Header{}, Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1}
	if err := normalizeRequest(r, p.pathOptions().EscapedSlashes); err != nil {
		return r, err
	}
	return r, nil
}

// explainVerdict says d in words.
func explainVerdict(d AuthzDecision) admin.ExplainVerdict {
	v := admin.ExplainVerdict{Allowed: d.Denied == nil, Policy: d.Policy, Action: string(d.Action), Rule: d.Rule, Audits: d.Audits}
	switch {
	case d.Policy == "":
		v.Why = "no policy decides: allowed"
	case d.Denied != nil && d.Denied.Allow:
		v.Why = fmt.Sprintf("allow policies protect the pod and none matches (%s is the first): denied", d.Policy)
	case d.Denied != nil:
		v.Why = fmt.Sprintf("rule %d of deny policy %s matches: denied", d.Rule, d.Policy)
	default:
		v.Why = fmt.Sprintf("rule %d of allow policy %s matches: allowed", d.Rule, d.Policy)
	}
	return v
}
