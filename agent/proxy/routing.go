// This file routes the requests clients send to a Service port that has routes
// (routes.go): which rule a request matches, which Service port the rule's weighted
// backends send it to, and what the rule's filters change on the way there and
// back, mirrors included.

package proxy

import (
	"bytes"
	"context"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/ferrymesh/ferry/api/admin"
)

const (
	// maxMirrorBody is the largest request body a mirror gets a copy of: the copy
	// is kept in memory until the body has been read, so a larger request is not
	// mirrored at all.
	maxMirrorBody = 64 << 10
	// mirrorTimeout bounds a mirrored request that the rule gives no timeout, so a
	// slow mirror does not hold its copy and connection for long.
	mirrorTimeout = 10 * time.Second
)

// routeRequest finds where a request to a Service port goes: dest is the port the
// client dialled when the port has no routes for the client (rule nil), else the
// backend Service port the matched rule's weights picked. It answers the request
// itself (answered) when no rule matches (404), when the rule redirects, or when
// the rule has no backend to send it to (500).
//
// r is the proxy's own shallow copy of the client's request: the rule's filters
// give it a header and URL of its own before they change them. Everything is
// decided on one state, so a request keeps the rule and dest it started with when
// a new state replaces the tables.
func (p *Proxy) routeRequest(hc *httpConn, rw *responseWriter, r *http.Request, rec *Conn) (dest *vipPort, rule *RouteRule, answered bool) {
	ns, _, _ := strings.Cut(hc.pd.w.Name, "/")
	is4 := hc.rec.Service.Addr().Unmap().Is4()
	var mirrors []*vipPort
	p.mu.RLock()
	vp, _, _ := p.services.lookup(hc.rec.Service)
	var t *RouteTable
	if vp != nil {
		t = vp.table(ns)
	}
	if t == nil {
		p.mu.RUnlock()
		return vp, nil, false
	}
	m := t.match(r)
	if m == nil {
		p.mu.RUnlock()
		rec.Verdict, rec.Reason = admin.VerdictError, admin.ReasonNoRoute
		meshAnswer(rw, http.StatusNotFound, "no route")
		return nil, nil, true
	}
	rule = &t.Rules[m.Rule]
	if b, ok := pickBackend(rule.Backends); ok {
		dest = p.services.backend(b, is4)
	}
	for _, f := range rule.Filters {
		if f.Mirror != nil && rand.Float64()*100 < f.Mirror.Percent {
			if mv := p.services.backend(f.Mirror.Backend, is4); mv != nil {
				mirrors = append(mirrors, mv)
			}
		}
	}
	p.mu.RUnlock()

	rec.HTTP.Route, rec.HTTP.RouteRule = rule.Route, rule.Index
	if rd := applyFilters(rw, r, rule, m); rd != nil {
		rw.Header().Set("Location", location(r, rd, m, hc.rec.Service))
		rw.WriteHeader(rd.StatusCode)
		return nil, rule, true
	}
	if dest == nil {
		rec.Verdict, rec.Reason = admin.VerdictError, admin.ReasonNoRoute
		meshAnswer(rw, http.StatusInternalServerError, "no backend")
		return nil, rule, true
	}
	if len(mirrors) > 0 {
		p.mirror(hc.pd, r, mirrors, rule.RequestTimeout)
	}
	return dest, rule, false
}

// match returns the first of the table's matches that r meets; nil for none.
func (t *RouteTable) match(r *http.Request) *RouteMatch {
	var query url.Values // parsed once, if a match asks
	for i := range t.Matches {
		if m := &t.Matches[i]; m.matches(r, &query) {
			return m
		}
	}
	return nil
}

// matches reports whether r meets every part of m that is set. A header listed
// more than once is matched on its values joined by ", ", the one value RFC 9110
// (section 5.3) says they mean, as Gateway API asks; a query parameter given more
// than once, on its first value.
func (m *RouteMatch) matches(r *http.Request, query *url.Values) bool {
	if m.Method != "" && r.Method != m.Method {
		return false
	}
	if m.Path != nil && !m.Path.matchPath(r.URL.Path) {
		return false
	}
	for _, h := range m.Headers {
		var v string
		switch vs, ok := r.Header[h.Name]; {
		case h.Name == "Host": // the server moves it out of Header
			v = r.Host
		case !ok:
			return false
		case len(vs) == 1:
			v = vs[0]
		default:
			v = strings.Join(vs, ", ")
		}
		if !h.match(v) {
			return false
		}
	}
	if len(m.Query) > 0 && *query == nil {
		*query = r.URL.Query()
	}
	for _, q := range m.Query {
		vs, ok := (*query)[q.Name]
		if !ok || !q.match(vs[0]) {
			return false
		}
	}
	return true
}

// match compares a header or query value.
func (s *StringMatch) match(v string) bool {
	if s.Type == MatchRegex {
		return s.Regex.MatchString(v)
	}
	return v == s.Value
}

// matchPath compares a request's path (without its query). A prefix matches whole
// segments, and a trailing slash in it is not needed: "/a" and "/a/" both match
// "/a", "/a/" and "/a/b", never "/ab".
func (s *StringMatch) matchPath(path string) bool {
	switch s.Type {
	case MatchPathPrefix:
		prefix := strings.TrimSuffix(s.Value, "/")
		if !strings.HasPrefix(path, prefix) {
			return false
		}
		return len(path) == len(prefix) || path[len(prefix)] == '/'
	case MatchRegex:
		return s.Regex.MatchString(path)
	}
	return path == s.Value
}

// pickBackend draws one of a rule's backends in proportion to its weight; false
// when there is none to draw (no backends, or every weight 0).
func pickBackend(bs []WeightedBackend) (WeightedBackend, bool) {
	var total uint64
	for _, b := range bs {
		total += uint64(b.Weight)
	}
	if total == 0 {
		return WeightedBackend{}, false
	}
	n := rand.Uint64N(total)
	for _, b := range bs {
		if n < uint64(b.Weight) {
			return b, true
		}
		n -= uint64(b.Weight)
	}
	panic("unreachable: n is below the weights' sum")
}

// applyFilters changes r and the response rw will give as the rule's filters say,
// in their order, and returns the rule's redirect, if it has one. Mirrors are sent
// by routeRequest once the request is what the filters made it.
func applyFilters(rw *responseWriter, r *http.Request, rule *RouteRule, m *RouteMatch) *Redirect {
	var redirect *Redirect
	owned := false
	own := func() { // the client's request shares its header and URL with r
		if owned {
			return
		}
		owned = true
		r.Header = r.Header.Clone()
		if r.Header == nil {
			r.Header = http.Header{}
		}
		u := *r.URL
		r.URL = &u
	}
	for _, f := range rule.Filters {
		switch {
		case f.RequestHeaders != nil:
			own()
			f.RequestHeaders.apply(r.Header)
		case f.ResponseHeaders != nil:
			rw.modifiers = append(rw.modifiers, f.ResponseHeaders)
		case f.Redirect != nil:
			redirect = f.Redirect
		case f.URLRewrite != nil:
			own()
			if f.URLRewrite.Hostname != "" {
				r.Host = f.URLRewrite.Hostname
			}
			if pm := f.URLRewrite.Path; pm != nil {
				r.URL.Path, r.URL.RawPath = pm.apply(r.URL.Path, matchedPrefix(m)), ""
			}
		}
	}
	return redirect
}

// matchedPrefix is the path prefix a request matched, for ReplacePrefixMatch: the
// state's checks allow that modifier only on rules matched by prefixes, and a
// match without a path is the prefix "/".
func matchedPrefix(m *RouteMatch) string {
	if m.Path != nil && m.Path.Type == MatchPathPrefix {
		return m.Path.Value
	}
	return "/"
}

// apply sets, then adds, then removes headers (Gateway API does not order the
// three; this order lets a rule replace a header and drop another in one filter).
func (m *HeaderModifier) apply(h http.Header) {
	for _, s := range m.Set {
		h[s.Name] = []string{s.Value}
	}
	for _, a := range m.Add {
		h[a.Name] = append(h[a.Name], a.Value)
	}
	for _, name := range m.Remove {
		delete(h, name)
	}
}

// apply is the path m makes of path, which matched prefix. A prefix is replaced by
// whole segments as Gateway API's examples show: with prefix "/foo", "/foo/bar"
// becomes "/xyz/bar" for "/xyz" or "/xyz/", and "/bar" for "" or "/"; "/foo"
// becomes "/xyz", or "/" for "".
func (m *PathModifier) apply(path, prefix string) string {
	if m.Type == ReplaceFullPath {
		return m.Value
	}
	rest := strings.TrimPrefix(path, strings.TrimSuffix(prefix, "/"))
	if out := strings.TrimSuffix(m.Value, "/") + rest; out != "" {
		return out
	}
	return "/"
}

// location is where a redirect sends the client: the redirect's scheme, host,
// port and path, each the request's where the redirect leaves it out (the cluster
// IP the client dialled for a request without a Host). The port is the scheme's
// own when the redirect names a scheme, else the Service port the client dialled
// (a Gateway's listener port, in the mesh), and is left out of the URL when it is
// the scheme's default.
func location(r *http.Request, rd *Redirect, m *RouteMatch, service netip.AddrPort) string {
	scheme := rd.Scheme
	port := rd.Port
	if scheme == "" {
		scheme = "http" // the client spoke plaintext HTTP to the Service
		if port == 0 {
			port = service.Port()
		}
	} else if port == 0 {
		port = defaultPort(scheme)
	}
	host := rd.Hostname
	if host == "" {
		host = r.Host
		if h, _, err := net.SplitHostPort(r.Host); err == nil {
			host = h
		}
		host = strings.TrimSuffix(strings.TrimPrefix(host, "["), "]")
	}
	if host == "" {
		host = service.Addr().Unmap().String()
	}
	if port != defaultPort(scheme) {
		host = net.JoinHostPort(host, strconv.Itoa(int(port)))
	} else if strings.Contains(host, ":") {
		host = "[" + host + "]"
	}
	u := url.URL{Scheme: scheme, Host: host, Path: r.URL.Path, RawPath: r.URL.RawPath, RawQuery: r.URL.RawQuery}
	if rd.Path != nil {
		u.Path, u.RawPath = rd.Path.apply(r.URL.Path, matchedPrefix(m)), ""
	}
	return u.String()
}

func defaultPort(scheme string) uint16 {
	if scheme == "https" {
		return 443
	}
	return 80
}

// mirror sends a copy of r to an endpoint of each of the mirrors, in the
// background: its response is read and dropped, and whatever becomes of it never
// delays or fails the client's request. A request with a body is copied as the
// upstream reads it and mirrored once it has been read whole, if it is at most
// maxMirrorBody bytes; a larger one, a body the upstream does not read to its end,
// and an upgrade (a WebSocket) are not mirrored.
func (p *Proxy) mirror(pd *pod, r *http.Request, mirrors []*vipPort, timeout time.Duration) {
	if r.Header.Get("Upgrade") != "" || r.ContentLength > maxMirrorBody {
		return
	}
	copyOf := r.Clone(context.Background())
	send := func(body []byte) {
		for _, v := range mirrors {
			p.l7.background(func() { p.sendMirror(pd, copyOf, body, v, timeout) })
		}
	}
	if r.Body == nil || r.Body == http.NoBody || r.ContentLength == 0 { // 0: known empty, and ReverseProxy reads none
		send(nil)
		return
	}
	tb := &teeBody{ReadCloser: r.Body, done: send}
	if r.ContentLength > 0 {
		tb.buf = make([]byte, 0, r.ContentLength)
	}
	r.Body = tb
}

// sendMirror sends one mirrored copy of r, with body, to an endpoint of v.
func (p *Proxy) sendMirror(pd *pod, r *http.Request, body []byte, v *vipPort, timeout time.Duration) {
	ep, ok := v.balancer.pick(rand.Uint64(), nil)
	if !ok {
		return
	}
	if timeout <= 0 || timeout > mirrorTimeout {
		timeout = mirrorTimeout
	}
	ctx, cancel := context.WithTimeout(pd.ctx, timeout) // ends with the pod, too
	defer cancel()
	up := &upstream{pod: pd, ep: ep, h2: r.ProtoMajor == 2}
	out := r.Clone(context.WithValue(ctx, upstreamKey{}, up))
	out.RequestURI = ""
	out.URL.Scheme, out.URL.Host = "http", ep.addr.String()
	removeHopHeaders(out.Header)
	out.Body, out.ContentLength = http.NoBody, 0
	if len(body) > 0 {
		out.Body, out.ContentLength = io.NopCloser(bytes.NewReader(body)), int64(len(body))
	}
	res, err := upstreamTransport{}.RoundTrip(out) // a try, which counts itself on ep
	if err != nil {
		p.log.Debug("mirror failed", "pod", pd.w.Name, "service", v.service, "upstream", ep.addr, "error", err)
		return
	}
	_, _ = io.Copy(io.Discard, res.Body)
	res.Body.Close()
}

// removeHopHeaders drops what concerns the client's connection only (RFC 9110
// section 7.6.1) from a mirrored copy, as ReverseProxy does for the request itself.
func removeHopHeaders(h http.Header) {
	for _, v := range h["Connection"] {
		for _, name := range strings.Split(v, ",") {
			if name = strings.TrimSpace(name); name != "" {
				delete(h, http.CanonicalHeaderKey(name))
			}
		}
	}
	for _, name := range []string{"Connection", "Keep-Alive", "Proxy-Connection", "Proxy-Authenticate", "Proxy-Authorization", "Trailer", "Transfer-Encoding", "Upgrade"} {
		delete(h, name)
	}
	if te := h.Get("Te"); te != "" && !strings.EqualFold(strings.TrimSpace(te), "trailers") {
		delete(h, "Te")
	}
}

// teeBody keeps a copy of a request body as the upstream reads it, for mirrors,
// and calls done with it when the body ends within maxMirrorBody bytes. A longer
// body, or one closed before its end, is not copied further and done is not called.
type teeBody struct {
	io.ReadCloser
	mu    sync.Mutex
	buf   []byte
	ended bool // copied whole, or given up
	done  func(body []byte)
}

func (b *teeBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.mu.Lock()
	whole := false
	if !b.ended {
		if len(b.buf)+n > maxMirrorBody {
			b.ended, b.buf = true, nil
		} else {
			b.buf = append(b.buf, p[:n]...)
			b.ended, whole = err == io.EOF, err == io.EOF
		}
	}
	body := b.buf
	b.mu.Unlock()
	if whole {
		b.done(body)
	}
	return n, err
}

func (b *teeBody) Close() error {
	b.mu.Lock()
	b.ended, b.buf = true, nil
	b.mu.Unlock()
	return b.ReadCloser.Close()
}

// background runs f in a goroutine the HTTP server's stop waits for; after stop
// it does not run f.
func (h *l7) background(f func()) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.stopped {
		return
	}
	h.wg.Add(1)
	go func() {
		defer h.wg.Done()
		f()
	}()
}
