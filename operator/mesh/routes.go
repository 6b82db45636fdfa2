package mesh

// HTTPRoutes and GRPCRoutes in the mesh view (GAMMA): a route whose parentRefs name
// a Service is compiled into that Service's route tables, one per Service port and
// set of clients. A route that cannot be applied whole is rejected whole, and the
// last generation of it that compiled stays in force. Like TrafficPolicies, routes
// come from dynamic informers, so cluster and local mode read them the same way.

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/ferrymesh/ferry/api/ferryv1"
	"golang.org/x/net/http/httpguts"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/tools/cache"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
	gatewayv1beta1 "sigs.k8s.io/gateway-api/apis/v1beta1"
)

// ControllerName is the controllerName Ferry writes in the status of the routes it
// applies (Gateway API's RouteParentStatus).
const ControllerName = "ferry.io/mesh"

// FileAnnotation is set by local mode on the routes and policies it reads: the
// manifest file, relative to the folder, for ConfigStatus and log lines.
const FileAnnotation = "local.ferry.io/file"

// Kinds of configuration reported in ConfigStatus.
const (
	KindHTTPRoute     = "HTTPRoute"
	KindGRPCRoute     = "GRPCRoute"
	KindTrafficPolicy = "TrafficPolicy"
)

// Condition types and the reasons Ferry sets, Gateway API's names.
const (
	CondAccepted     = string(gatewayv1.RouteConditionAccepted)
	CondResolvedRefs = string(gatewayv1.RouteConditionResolvedRefs)

	reasonAccepted          = string(gatewayv1.RouteReasonAccepted)
	reasonResolvedRefs      = string(gatewayv1.RouteReasonResolvedRefs)
	reasonNoMatchingParent  = string(gatewayv1.RouteReasonNoMatchingParent)
	reasonUnsupportedValue  = string(gatewayv1.RouteReasonUnsupportedValue)
	reasonIncompatible      = string(gatewayv1.RouteReasonIncompatibleFilters)
	reasonBackendNotFound   = string(gatewayv1.RouteReasonBackendNotFound)
	reasonRefNotPermitted   = string(gatewayv1.RouteReasonRefNotPermitted)
	reasonInvalidKind       = string(gatewayv1.RouteReasonInvalidKind)
	reasonPolicyInvalid     = "Invalid"
	reasonPolicyConflicted  = "Conflicted"
	defaultRetryAttempts    = 1
	maxRetryAttempts        = 10 // as the agent and TrafficPolicy's retries
	defaultRedirectStatus   = 302
	defaultMirrorPercentage = 100
)

// HTTPRouteResource is where HTTPRoutes are served (gateway.networking.k8s.io/v1).
func HTTPRouteResource() schema.GroupVersionResource {
	return gatewayv1.SchemeGroupVersion.WithResource("httproutes")
}

// GRPCRouteResource is where GRPCRoutes are served (gateway.networking.k8s.io/v1).
func GRPCRouteResource() schema.GroupVersionResource {
	return gatewayv1.SchemeGroupVersion.WithResource("grpcroutes")
}

// ReferenceGrantResource is where ReferenceGrants are served
// (gateway.networking.k8s.io/v1beta1, the version every Gateway API release since
// v0.6 serves).
func ReferenceGrantResource() schema.GroupVersionResource {
	return gatewayv1beta1.SchemeGroupVersion.WithResource("referencegrants")
}

// WatchRoutes makes the view read HTTPRoutes and GRPCRoutes from factory's
// informers; start the factory after. As WatchTrafficPolicies, it may be called
// after Run once the CRDs are served.
func (v *View) WatchRoutes(factory dynamicinformer.DynamicSharedInformerFactory) error {
	httpRoutes, err := v.watch(factory, HTTPRouteResource())
	if err != nil {
		return err
	}
	grpcRoutes, err := v.watch(factory, GRPCRouteResource())
	if err != nil {
		return err
	}
	v.mu.Lock()
	v.httpRoutes, v.grpcRoutes = httpRoutes, grpcRoutes
	v.mu.Unlock()
	v.markDirty()
	return nil
}

// WatchReferenceGrants makes the view read ReferenceGrants, which let a route send
// to a Service in another namespace; without them such a route is rejected.
func (v *View) WatchReferenceGrants(factory dynamicinformer.DynamicSharedInformerFactory) error {
	grants, err := v.watch(factory, ReferenceGrantResource())
	if err != nil {
		return err
	}
	v.mu.Lock()
	v.grants = grants
	v.mu.Unlock()
	v.markDirty()
	return nil
}

func (v *View) watch(factory dynamicinformer.DynamicSharedInformerFactory, gvr schema.GroupVersionResource) (cache.GenericLister, error) {
	inf := factory.ForResource(gvr)
	if _, err := inf.Informer().AddEventHandler(v.handler()); err != nil {
		return nil, fmt.Errorf("mesh view: %s: %w", gvr.Resource, err)
	}
	v.mu.Lock()
	if !v.running {
		v.synced = append(v.synced, inf.Informer().HasSynced)
	}
	v.mu.Unlock()
	return inf.Lister(), nil
}

// configKey identifies a route or policy across rebuilds.
type configKey struct {
	kind, namespace, name string
}

func (k configKey) String() string { return k.kind + " " + k.namespace + "/" + k.name }

// routeSpec is an HTTPRoute or a GRPCRoute in one form: GRPCRoute matches are
// already path matches.
type routeSpec struct {
	key        configKey
	generation int64
	created    time.Time
	file       string
	parents    []gatewayv1.ParentReference
	rules      []ruleSpec
}

type ruleSpec struct {
	// matches are nil for a rule that matches every request.
	matches  []matchSpec
	filters  []gatewayv1.HTTPRouteFilter
	backends []gatewayv1.HTTPBackendRef
	timeouts *gatewayv1.HTTPRouteTimeouts
	retry    *gatewayv1.HTTPRouteRetry
	// sessionPersistence is set: the proxy has no sessions to keep.
	sessionPersistence bool
	// field is where the rule is ("spec.rules[2]"), for messages.
	field string
}

type matchSpec struct {
	path    *gatewayv1.HTTPPathMatch
	headers []gatewayv1.HTTPHeaderMatch
	query   []gatewayv1.HTTPQueryParamMatch
	method  *gatewayv1.HTTPMethod
	// pathField is where the path match came from: "path" for HTTPRoute, "method"
	// for GRPCRoute.
	pathField string
	field     string
}

// httpRouteSpec is r's routing in the common form.
func httpRouteSpec(r *gatewayv1.HTTPRoute) *routeSpec {
	rs := newRouteSpec(KindHTTPRoute, r.ObjectMeta, r.Spec.ParentRefs)
	for i, rule := range r.Spec.Rules {
		f := fmt.Sprintf("spec.rules[%d]", i)
		out := ruleSpec{filters: rule.Filters, backends: rule.BackendRefs, timeouts: rule.Timeouts, retry: rule.Retry, field: f,
			sessionPersistence: rule.SessionPersistence != nil}
		for j, m := range rule.Matches {
			out.matches = append(out.matches, matchSpec{path: m.Path, headers: m.Headers, query: m.QueryParams, method: m.Method,
				pathField: "path", field: fmt.Sprintf("%s.matches[%d]", f, j)})
		}
		if len(out.matches) == 0 {
			// Gateway API: a rule without matches matches every path.
			out.matches = []matchSpec{{path: prefixMatch("/"), pathField: "path", field: f}}
		}
		rs.rules = append(rs.rules, out)
	}
	return rs
}

// grpcRouteSpec is r's routing in the common form: a method match becomes a
// match on the request path /<service>/<method>.
func grpcRouteSpec(r *gatewayv1.GRPCRoute) (*routeSpec, *configError) {
	rs := newRouteSpec(KindGRPCRoute, r.ObjectMeta, r.Spec.ParentRefs)
	for i, rule := range r.Spec.Rules {
		f := fmt.Sprintf("spec.rules[%d]", i)
		out := ruleSpec{field: f, sessionPersistence: rule.SessionPersistence != nil}
		for j, flt := range rule.Filters {
			hf, err := grpcFilter(flt, fmt.Sprintf("%s.filters[%d]", f, j))
			if err != nil {
				return nil, err
			}
			out.filters = append(out.filters, hf)
		}
		for j, b := range rule.BackendRefs {
			hb := gatewayv1.HTTPBackendRef{BackendRef: b.BackendRef}
			if len(b.Filters) > 0 {
				return nil, unsupported(fmt.Sprintf("%s.backendRefs[%d].filters", f, j), "filters on a backendRef are not supported; set them on the rule")
			}
			out.backends = append(out.backends, hb)
		}
		for j, m := range rule.Matches {
			mf := fmt.Sprintf("%s.matches[%d]", f, j)
			path, err := grpcPath(m.Method, mf+".method")
			if err != nil {
				return nil, err
			}
			ms := matchSpec{path: path, pathField: "method", field: mf}
			for _, h := range m.Headers {
				ms.headers = append(ms.headers, gatewayv1.HTTPHeaderMatch{Type: (*gatewayv1.HeaderMatchType)(h.Type), Name: gatewayv1.HTTPHeaderName(h.Name), Value: h.Value})
			}
			out.matches = append(out.matches, ms)
		}
		if len(out.matches) == 0 {
			out.matches = []matchSpec{{field: f}}
		}
		rs.rules = append(rs.rules, out)
	}
	return rs, nil
}

func newRouteSpec(kind string, m metav1.ObjectMeta, parents []gatewayv1.ParentReference) *routeSpec {
	return &routeSpec{
		key:        configKey{kind: kind, namespace: m.Namespace, name: m.Name},
		generation: m.Generation,
		created:    m.CreationTimestamp.Time,
		file:       m.Annotations[FileAnnotation],
		parents:    parents,
	}
}

func prefixMatch(p string) *gatewayv1.HTTPPathMatch {
	t := gatewayv1.PathMatchPathPrefix
	return &gatewayv1.HTTPPathMatch{Type: &t, Value: &p}
}

// grpcPath is the path match a GRPCRoute method match stands for: gRPC sends
// /<package.Service>/<Method>. nil matches every request.
func grpcPath(m *gatewayv1.GRPCMethodMatch, field string) (*gatewayv1.HTTPPathMatch, *configError) {
	if m == nil {
		return nil, nil
	}
	svc, method := deref(m.Service), deref(m.Method)
	if svc == "" && method == "" {
		return nil, unsupported(field, "one of service and method is required")
	}
	typ := gatewayv1.PathMatchRegularExpression
	switch cmp.Or(deref((*string)(m.Type)), string(gatewayv1.GRPCMethodMatchExact)) {
	case string(gatewayv1.GRPCMethodMatchExact):
		for _, part := range []struct{ name, value string }{{"service", svc}, {"method", method}} {
			if strings.Contains(part.value, "/") {
				return nil, unsupported(field+"."+part.name, fmt.Sprintf("%q: must not contain /", part.value))
			}
		}
		if svc != "" && method != "" {
			typ = gatewayv1.PathMatchExact
			p := "/" + svc + "/" + method
			return &gatewayv1.HTTPPathMatch{Type: &typ, Value: &p}, nil
		}
		svc, method = regexp.QuoteMeta(svc), regexp.QuoteMeta(method)
	case string(gatewayv1.GRPCMethodMatchRegularExpression):
		for _, part := range []struct{ name, value string }{{"service", svc}, {"method", method}} {
			if _, err := regexp.Compile(part.value); err != nil {
				return nil, unsupported(field+"."+part.name, "invalid regular expression: "+err.Error())
			}
		}
	default:
		return nil, unsupported(field+".type", fmt.Sprintf("%q: not Exact or RegularExpression", deref((*string)(m.Type))))
	}
	p := "/" + cmp.Or(groupRE(svc), "[^/]+") + "/" + cmp.Or(groupRE(method), "[^/]+")
	return &gatewayv1.HTTPPathMatch{Type: &typ, Value: &p}, nil
}

// groupRE keeps an alternation inside its part of the path.
func groupRE(re string) string {
	if re == "" {
		return ""
	}
	return "(?:" + re + ")"
}

// grpcFilter is a GRPCRoute filter as the HTTPRoute filter that does the same.
func grpcFilter(f gatewayv1.GRPCRouteFilter, field string) (gatewayv1.HTTPRouteFilter, *configError) {
	switch f.Type {
	case gatewayv1.GRPCRouteFilterRequestHeaderModifier:
		return gatewayv1.HTTPRouteFilter{Type: gatewayv1.HTTPRouteFilterRequestHeaderModifier, RequestHeaderModifier: f.RequestHeaderModifier}, nil
	case gatewayv1.GRPCRouteFilterResponseHeaderModifier:
		return gatewayv1.HTTPRouteFilter{Type: gatewayv1.HTTPRouteFilterResponseHeaderModifier, ResponseHeaderModifier: f.ResponseHeaderModifier}, nil
	case gatewayv1.GRPCRouteFilterRequestMirror:
		return gatewayv1.HTTPRouteFilter{Type: gatewayv1.HTTPRouteFilterRequestMirror, RequestMirror: f.RequestMirror}, nil
	}
	return gatewayv1.HTTPRouteFilter{}, unsupported(field+".type", fmt.Sprintf("%q: not a filter Ferry implements (RequestHeaderModifier, ResponseHeaderModifier, RequestMirror)", f.Type))
}

// configError is why a route or policy is rejected: the condition that says so
// and the field at fault.
type configError struct {
	cond   string // CondAccepted or CondResolvedRefs
	reason string
	field  string
	msg    string
}

func (e *configError) Error() string { return e.field + ": " + e.msg }

func unsupported(field, msg string) *configError {
	return &configError{cond: CondAccepted, reason: reasonUnsupportedValue, field: field, msg: msg}
}

// routeEnv is what a route is checked against: the mesh's Services and the
// ReferenceGrants.
type routeEnv struct {
	services map[string]*ferryv1.Service // namespace/name
	grants   []*gatewayv1beta1.ReferenceGrant
}

// target is a Service port a route attaches to.
type target struct {
	service *ferryv1.Service
	port    uint32
}

// compiledRoute is a route that compiled: its rules and matches, ready to go into
// the tables of its targets.
type compiledRoute struct {
	spec    *routeSpec
	targets []target
	rules   []*ferryv1.RouteRule
	// matches[i] are rule i's matches (RouteMatch.rule is set per table).
	matches [][]*ferryv1.RouteMatch
}

// compileRoute checks rs against env and compiles it, or says why it cannot be
// applied.
func compileRoute(rs *routeSpec, env *routeEnv) (*compiledRoute, *configError) {
	cr := &compiledRoute{spec: rs}
	targets, err := routeTargets(rs, env)
	if err != nil {
		return nil, err
	}
	cr.targets = targets
	for _, rule := range rs.rules {
		if rule.sessionPersistence {
			return nil, unsupported(rule.field+".sessionPersistence", "not implemented by the proxy")
		}
		fr := &ferryv1.RouteRule{Route: rs.key.String(), Index: uint32(len(cr.rules))}
		matches, err := compileMatches(rule)
		if err != nil {
			return nil, err
		}
		if err := compileFilters(rs, rule, env, fr); err != nil {
			return nil, err
		}
		if err := compileBackends(rs, rule, env, fr); err != nil {
			return nil, err
		}
		if err := compileTimeouts(rule, fr); err != nil {
			return nil, err
		}
		if err := compileRetry(rule, fr); err != nil {
			return nil, err
		}
		cr.rules = append(cr.rules, fr)
		cr.matches = append(cr.matches, matches)
	}
	return cr, nil
}

// ServiceParent says whether a parentRef names a Service (GAMMA) rather than a
// Gateway. The API server defaults an unset group to Gateway API's; local mode
// has no defaulting, so there an unset group with kind Service is a Service too.
func ServiceParent(p gatewayv1.ParentReference) bool {
	return p.Kind != nil && *p.Kind == "Service" && (p.Group == nil || *p.Group == "" || *p.Group == "core")
}

// servesMesh says whether a route has a Service among its parents, so that Ferry
// is the controller to apply it and report on it.
func servesMesh(parents []gatewayv1.ParentReference) bool {
	return slices.ContainsFunc(parents, ServiceParent)
}

func routeTargets(rs *routeSpec, env *routeEnv) ([]target, *configError) {
	var out []target
	for i, p := range rs.parents {
		if !ServiceParent(p) {
			continue // a Gateway's; another controller's business
		}
		field := fmt.Sprintf("spec.parentRefs[%d]", i)
		ns := cmp.Or(string(deref(p.Namespace)), rs.key.namespace)
		svc := env.services[ns+"/"+string(p.Name)]
		if svc == nil {
			return nil, &configError{cond: CondAccepted, reason: reasonNoMatchingParent, field: field + ".name",
				msg: fmt.Sprintf("Service %s/%s is not in the mesh (it does not exist, selects no pods or its namespace is not enrolled)", ns, p.Name)}
		}
		var matched bool
		for _, sp := range svc.Ports {
			if p.Port != nil && uint32(*p.Port) != sp.Port {
				continue
			}
			if p.SectionName != nil && string(*p.SectionName) != sp.Name {
				continue
			}
			matched = true
			if !slices.ContainsFunc(out, func(t target) bool { return t.service == svc && t.port == sp.Port }) {
				out = append(out, target{service: svc, port: sp.Port})
			}
		}
		if !matched {
			f, val := field+".port", fmt.Sprint(deref(p.Port))
			if p.SectionName != nil {
				f, val = field+".sectionName", string(*p.SectionName)
			}
			return nil, &configError{cond: CondAccepted, reason: reasonNoMatchingParent, field: f,
				msg: fmt.Sprintf("Service %s/%s has no port %s", ns, p.Name, val)}
		}
	}
	return out, nil
}

func compileMatches(rule ruleSpec) ([]*ferryv1.RouteMatch, *configError) {
	var out []*ferryv1.RouteMatch
	for _, m := range rule.matches {
		fm := &ferryv1.RouteMatch{}
		if m.path != nil {
			sm, err := pathMatch(m.path, m.field+"."+m.pathField)
			if err != nil {
				return nil, err
			}
			fm.Path = sm
		}
		if m.method != nil {
			if !knownMethod(string(*m.method)) {
				return nil, unsupported(m.field+".method", fmt.Sprintf("%q: not an HTTP method", *m.method))
			}
			fm.Method = string(*m.method)
		}
		for i, h := range m.headers {
			field := fmt.Sprintf("%s.headers[%d]", m.field, i)
			if h.Name != "" && !httpguts.ValidHeaderFieldName(string(h.Name)) {
				return nil, unsupported(field+".name", fmt.Sprintf("%q: not a header name", h.Name))
			}
			nm, err := namedMatch(string(h.Name), (*string)(h.Type), h.Value, field)
			if err != nil {
				return nil, err
			}
			fm.Headers = append(fm.Headers, nm)
		}
		for i, q := range m.query {
			nm, err := namedMatch(string(q.Name), (*string)(q.Type), q.Value, fmt.Sprintf("%s.queryParams[%d]", m.field, i))
			if err != nil {
				return nil, err
			}
			fm.QueryParams = append(fm.QueryParams, nm)
		}
		out = append(out, fm)
	}
	return out, nil
}

func pathMatch(p *gatewayv1.HTTPPathMatch, field string) (*ferryv1.StringMatch, *configError) {
	typ := cmp.Or(deref((*string)(p.Type)), string(gatewayv1.PathMatchPathPrefix))
	value := cmp.Or(deref(p.Value), "/")
	switch typ {
	case string(gatewayv1.PathMatchExact), string(gatewayv1.PathMatchPathPrefix):
		if !strings.HasPrefix(value, "/") {
			return nil, unsupported(field+".value", fmt.Sprintf("%q: a path starts with /", value))
		}
	case string(gatewayv1.PathMatchRegularExpression):
		if _, err := regexp.Compile(value); err != nil {
			return nil, unsupported(field+".value", "invalid regular expression: "+err.Error())
		}
	default:
		return nil, unsupported(field+".type", fmt.Sprintf("%q: not Exact, PathPrefix or RegularExpression", typ))
	}
	return &ferryv1.StringMatch{Type: typ, Value: value}, nil
}

func namedMatch(name string, typ *string, value, field string) (*ferryv1.NamedMatch, *configError) {
	if name == "" {
		return nil, unsupported(field+".name", "required")
	}
	t := cmp.Or(deref(typ), string(gatewayv1.HeaderMatchExact))
	switch t {
	case string(gatewayv1.HeaderMatchExact):
	case string(gatewayv1.HeaderMatchRegularExpression):
		if _, err := regexp.Compile(value); err != nil {
			return nil, unsupported(field+".value", "invalid regular expression: "+err.Error())
		}
	default:
		return nil, unsupported(field+".type", fmt.Sprintf("%q: not Exact or RegularExpression", t))
	}
	return &ferryv1.NamedMatch{Name: name, Type: t, Value: value}, nil
}

func knownMethod(m string) bool {
	switch gatewayv1.HTTPMethod(m) {
	case gatewayv1.HTTPMethodGet, gatewayv1.HTTPMethodHead, gatewayv1.HTTPMethodPost, gatewayv1.HTTPMethodPut, gatewayv1.HTTPMethodDelete,
		gatewayv1.HTTPMethodConnect, gatewayv1.HTTPMethodOptions, gatewayv1.HTTPMethodTrace, gatewayv1.HTTPMethodPatch:
		return true
	}
	return false
}

func compileFilters(rs *routeSpec, rule ruleSpec, env *routeEnv, fr *ferryv1.RouteRule) *configError {
	var redirect, rewrite bool
	seen := map[gatewayv1.HTTPRouteFilterType]bool{}
	for i, f := range rule.filters {
		field := fmt.Sprintf("%s.filters[%d]", rule.field, i)
		// Gateway API: each filter at most once in a rule, but for mirrors.
		if seen[f.Type] && f.Type != gatewayv1.HTTPRouteFilterRequestMirror {
			return unsupported(field+".type", fmt.Sprintf("a second %s filter in the rule", f.Type))
		}
		seen[f.Type] = true
		var out *ferryv1.RouteFilter
		var err *configError
		switch f.Type {
		case gatewayv1.HTTPRouteFilterRequestHeaderModifier:
			var hm *ferryv1.HeaderModifier
			hm, err = headerModifier(f.RequestHeaderModifier, field+".requestHeaderModifier")
			out = &ferryv1.RouteFilter{Filter: &ferryv1.RouteFilter_RequestHeaders{RequestHeaders: hm}}
		case gatewayv1.HTTPRouteFilterResponseHeaderModifier:
			var hm *ferryv1.HeaderModifier
			hm, err = headerModifier(f.ResponseHeaderModifier, field+".responseHeaderModifier")
			out = &ferryv1.RouteFilter{Filter: &ferryv1.RouteFilter_ResponseHeaders{ResponseHeaders: hm}}
		case gatewayv1.HTTPRouteFilterRequestRedirect:
			redirect = true
			var r *ferryv1.Redirect
			r, err = redirectFilter(f.RequestRedirect, rule, field+".requestRedirect")
			out = &ferryv1.RouteFilter{Filter: &ferryv1.RouteFilter_Redirect{Redirect: r}}
		case gatewayv1.HTTPRouteFilterURLRewrite:
			rewrite = true
			var r *ferryv1.URLRewrite
			r, err = rewriteFilter(f.URLRewrite, rule, field+".urlRewrite")
			out = &ferryv1.RouteFilter{Filter: &ferryv1.RouteFilter_UrlRewrite{UrlRewrite: r}}
		case gatewayv1.HTTPRouteFilterRequestMirror:
			var m *ferryv1.Mirror
			m, err = mirrorFilter(rs, f.RequestMirror, env, field+".requestMirror")
			out = &ferryv1.RouteFilter{Filter: &ferryv1.RouteFilter_Mirror{Mirror: m}}
		default:
			err = unsupported(field+".type", fmt.Sprintf("%q: not a filter Ferry implements (RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect, URLRewrite, RequestMirror)", f.Type))
		}
		if err != nil {
			return err
		}
		fr.Filters = append(fr.Filters, out)
	}
	if redirect && rewrite {
		return &configError{cond: CondAccepted, reason: reasonIncompatible, field: rule.field + ".filters", msg: "RequestRedirect and URLRewrite cannot be used together"}
	}
	return nil
}

func headerModifier(h *gatewayv1.HTTPHeaderFilter, field string) (*ferryv1.HeaderModifier, *configError) {
	if h == nil {
		return nil, unsupported(field, "required by the filter's type")
	}
	out := &ferryv1.HeaderModifier{}
	headers := func(list []gatewayv1.HTTPHeader, field string) ([]*ferryv1.Header, *configError) {
		var hs []*ferryv1.Header
		for i, x := range list {
			if !httpguts.ValidHeaderFieldName(string(x.Name)) {
				return nil, unsupported(fmt.Sprintf("%s[%d].name", field, i), fmt.Sprintf("%q: not a header name", x.Name))
			}
			if !httpguts.ValidHeaderFieldValue(x.Value) {
				return nil, unsupported(fmt.Sprintf("%s[%d].value", field, i), fmt.Sprintf("%q: not a header value", x.Value))
			}
			hs = append(hs, &ferryv1.Header{Name: string(x.Name), Value: x.Value})
		}
		return hs, nil
	}
	var err *configError
	if out.Set, err = headers(h.Set, field+".set"); err != nil {
		return nil, err
	}
	if out.Add, err = headers(h.Add, field+".add"); err != nil {
		return nil, err
	}
	for i, r := range h.Remove {
		if !httpguts.ValidHeaderFieldName(r) {
			return nil, unsupported(fmt.Sprintf("%s.remove[%d]", field, i), fmt.Sprintf("%q: not a header name", r))
		}
	}
	out.Remove = slices.Clone(h.Remove)
	return out, nil
}

// hostnameValue checks a redirect's or rewrite's hostname: a host, without port,
// path or user.
func hostnameValue(h, field string) *configError {
	if h != "" && (strings.ContainsAny(h, "/:?#@ ") || !httpguts.ValidHostHeader(h)) {
		return unsupported(field, fmt.Sprintf("%q: not a host name", h))
	}
	return nil
}

func redirectFilter(r *gatewayv1.HTTPRequestRedirectFilter, rule ruleSpec, field string) (*ferryv1.Redirect, *configError) {
	if r == nil {
		return nil, unsupported(field, "required by the filter's type")
	}
	out := &ferryv1.Redirect{Scheme: deref(r.Scheme), Hostname: string(deref(r.Hostname)), StatusCode: defaultRedirectStatus}
	if err := hostnameValue(out.Hostname, field+".hostname"); err != nil {
		return nil, err
	}
	switch out.Scheme {
	case "", "http", "https":
	default:
		return nil, unsupported(field+".scheme", fmt.Sprintf("%q: not http or https", out.Scheme))
	}
	if r.Port != nil {
		if *r.Port < 1 || *r.Port > 65535 {
			return nil, unsupported(field+".port", fmt.Sprintf("%d: not a port", *r.Port))
		}
		out.Port = uint32(*r.Port)
	}
	if r.StatusCode != nil {
		if *r.StatusCode != 301 && *r.StatusCode != 302 {
			return nil, unsupported(field+".statusCode", fmt.Sprintf("%d: not 301 or 302", *r.StatusCode))
		}
		out.StatusCode = uint32(*r.StatusCode)
	}
	pm, err := pathModifier(r.Path, rule, field+".path")
	if err != nil {
		return nil, err
	}
	out.Path = pm
	return out, nil
}

func rewriteFilter(r *gatewayv1.HTTPURLRewriteFilter, rule ruleSpec, field string) (*ferryv1.URLRewrite, *configError) {
	if r == nil {
		return nil, unsupported(field, "required by the filter's type")
	}
	if err := hostnameValue(string(deref(r.Hostname)), field+".hostname"); err != nil {
		return nil, err
	}
	pm, err := pathModifier(r.Path, rule, field+".path")
	if err != nil {
		return nil, err
	}
	return &ferryv1.URLRewrite{Hostname: string(deref(r.Hostname)), Path: pm}, nil
}

// pathModifier checks a redirect's or rewrite's path change. ReplacePrefixMatch
// replaces what a PathPrefix match matched, so every match of the rule must be one.
func pathModifier(p *gatewayv1.HTTPPathModifier, rule ruleSpec, field string) (*ferryv1.PathModifier, *configError) {
	if p == nil {
		return nil, nil
	}
	switch p.Type {
	case gatewayv1.FullPathHTTPPathModifier:
		if p.ReplaceFullPath == nil {
			return nil, unsupported(field+".replaceFullPath", "required by type ReplaceFullPath")
		}
		if !strings.HasPrefix(*p.ReplaceFullPath, "/") {
			return nil, unsupported(field+".replaceFullPath", fmt.Sprintf("%q: a path starts with /", *p.ReplaceFullPath))
		}
		return &ferryv1.PathModifier{Type: string(p.Type), Value: *p.ReplaceFullPath}, nil
	case gatewayv1.PrefixMatchHTTPPathModifier:
		if p.ReplacePrefixMatch == nil {
			return nil, unsupported(field+".replacePrefixMatch", "required by type ReplacePrefixMatch")
		}
		if v := *p.ReplacePrefixMatch; v != "" && !strings.HasPrefix(v, "/") {
			return nil, unsupported(field+".replacePrefixMatch", fmt.Sprintf("%q: a path starts with / (or is empty)", v))
		}
		for _, m := range rule.matches {
			if m.path == nil || cmp.Or(deref((*string)(m.path.Type)), string(gatewayv1.PathMatchPathPrefix)) != string(gatewayv1.PathMatchPathPrefix) {
				return nil, unsupported(field+".type", fmt.Sprintf("ReplacePrefixMatch needs a PathPrefix path match, and %s has none", m.field))
			}
		}
		return &ferryv1.PathModifier{Type: string(p.Type), Value: *p.ReplacePrefixMatch}, nil
	}
	return nil, unsupported(field+".type", fmt.Sprintf("%q: not ReplaceFullPath or ReplacePrefixMatch", p.Type))
}

func mirrorFilter(rs *routeSpec, m *gatewayv1.HTTPRequestMirrorFilter, env *routeEnv, field string) (*ferryv1.Mirror, *configError) {
	if m == nil {
		return nil, unsupported(field, "required by the filter's type")
	}
	b, err := backendRef(rs, m.BackendRef, 1, env, field+".backendRef")
	if err != nil {
		return nil, err
	}
	out := &ferryv1.Mirror{Backend: b, Percent: defaultMirrorPercentage}
	switch {
	case m.Percent != nil && m.Fraction != nil:
		return nil, unsupported(field, "percent and fraction cannot both be set")
	case m.Percent != nil:
		if *m.Percent < 0 || *m.Percent > 100 {
			return nil, unsupported(field+".percent", fmt.Sprintf("%d: not 0 to 100", *m.Percent))
		}
		out.Percent = float64(*m.Percent)
	case m.Fraction != nil:
		den := int32(100)
		if m.Fraction.Denominator != nil {
			den = *m.Fraction.Denominator
		}
		if den < 1 || m.Fraction.Numerator < 0 || m.Fraction.Numerator > den {
			return nil, unsupported(field+".fraction", fmt.Sprintf("%d/%d: the numerator is 0 to the denominator, which is at least 1", m.Fraction.Numerator, den))
		}
		out.Percent = 100 * float64(m.Fraction.Numerator) / float64(den)
	}
	return out, nil
}

func compileBackends(rs *routeSpec, rule ruleSpec, env *routeEnv, fr *ferryv1.RouteRule) *configError {
	var total uint64
	for i, b := range rule.backends {
		field := fmt.Sprintf("%s.backendRefs[%d]", rule.field, i)
		if len(b.Filters) > 0 {
			return unsupported(field+".filters", "filters on a backendRef are not supported; set them on the rule")
		}
		weight := int32(1)
		if b.Weight != nil {
			weight = *b.Weight
		}
		if weight < 0 || weight > 1000000 {
			return unsupported(field+".weight", fmt.Sprintf("%d: not 0 to 1000000", weight))
		}
		wb, err := backendRef(rs, b.BackendObjectReference, uint32(weight), env, field)
		if err != nil {
			return err
		}
		total += uint64(weight)
		fr.Backends = append(fr.Backends, wb)
	}
	if len(rule.backends) > 0 && total == 0 {
		return unsupported(rule.field+".backendRefs", "every weight is 0, so the rule would send nothing anywhere")
	}
	return nil
}

// backendRef resolves a reference to a Service port of the mesh: another
// namespace's only where a ReferenceGrant there allows it.
func backendRef(rs *routeSpec, ref gatewayv1.BackendObjectReference, weight uint32, env *routeEnv, field string) (*ferryv1.WeightedBackend, *configError) {
	group, kind := string(deref(ref.Group)), cmp.Or(string(deref(ref.Kind)), "Service")
	if (group != "" && group != "core") || kind != "Service" {
		return nil, &configError{cond: CondResolvedRefs, reason: reasonInvalidKind, field: field + ".kind",
			msg: fmt.Sprintf("%s %s: only Services (group \"\", kind Service) can be backends", cmp.Or(group, "core"), kind)}
	}
	ns := cmp.Or(string(deref(ref.Namespace)), rs.key.namespace)
	name := ns + "/" + string(ref.Name)
	if ns != rs.key.namespace && !granted(env.grants, rs.key, ns, string(ref.Name)) {
		return nil, &configError{cond: CondResolvedRefs, reason: reasonRefNotPermitted, field: field + ".namespace",
			msg: fmt.Sprintf("no ReferenceGrant in namespace %s lets %ss of %s refer to Service %s", ns, rs.key.kind, rs.key.namespace, ref.Name)}
	}
	svc := env.services[name]
	if svc == nil {
		return nil, &configError{cond: CondResolvedRefs, reason: reasonBackendNotFound, field: field + ".name",
			msg: fmt.Sprintf("Service %s is not in the mesh (it does not exist, selects no pods or its namespace is not enrolled)", name)}
	}
	if ref.Port == nil {
		return nil, &configError{cond: CondResolvedRefs, reason: reasonBackendNotFound, field: field + ".port", msg: "required for a Service"}
	}
	if !slices.ContainsFunc(svc.Ports, func(p *ferryv1.ServicePort) bool { return p.Port == uint32(*ref.Port) }) {
		return nil, &configError{cond: CondResolvedRefs, reason: reasonBackendNotFound, field: field + ".port",
			msg: fmt.Sprintf("Service %s has no port %d", name, *ref.Port)}
	}
	return &ferryv1.WeightedBackend{Service: name, Port: uint32(*ref.Port), Weight: weight}, nil
}

// granted says whether a ReferenceGrant in namespace ns lets routes of from's kind
// in from's namespace refer to Service name.
func granted(grants []*gatewayv1beta1.ReferenceGrant, from configKey, ns, name string) bool {
	for _, g := range grants {
		if g.Namespace != ns {
			continue
		}
		fromOK := slices.ContainsFunc(g.Spec.From, func(f gatewayv1.ReferenceGrantFrom) bool {
			return f.Group == gatewayv1.GroupName && string(f.Kind) == from.kind && string(f.Namespace) == from.namespace
		})
		toOK := slices.ContainsFunc(g.Spec.To, func(t gatewayv1.ReferenceGrantTo) bool {
			return (t.Group == "" || t.Group == "core") && t.Kind == "Service" && (t.Name == nil || string(*t.Name) == name)
		})
		if fromOK && toOK {
			return true
		}
	}
	return false
}

func compileTimeouts(rule ruleSpec, fr *ferryv1.RouteRule) *configError {
	t := rule.timeouts
	if t == nil {
		return nil
	}
	field := rule.field + ".timeouts"
	req, err := durationMS(t.Request, field+".request")
	if err != nil {
		return err
	}
	backend, err := durationMS(t.BackendRequest, field+".backendRequest")
	if err != nil {
		return err
	}
	if req > 0 && backend > req {
		return unsupported(field+".backendRequest", "longer than timeouts.request, which bounds every try")
	}
	fr.RequestTimeoutMs, fr.BackendRequestTimeoutMs = req, backend
	return nil
}

// gatewayDuration is Gateway API's duration form (GEP-2257): up to four
// number-unit pairs, units h, m, s and ms.
var gatewayDuration = regexp.MustCompile(`^([0-9]{1,5}(h|m|s|ms)){1,4}$`)

// durationMS parses a Gateway API duration to milliseconds; absent and 0 are 0
// (no timeout).
func durationMS(d *gatewayv1.Duration, field string) (uint32, *configError) {
	if d == nil {
		return 0, nil
	}
	if !gatewayDuration.MatchString(string(*d)) {
		return 0, unsupported(field, fmt.Sprintf("%q: not a Gateway API duration such as 500ms or 1m30s", *d))
	}
	v, err := time.ParseDuration(string(*d))
	if err != nil {
		return 0, unsupported(field, fmt.Sprintf("%q: %v", *d, err))
	}
	ms := v.Milliseconds()
	if ms > math.MaxUint32 {
		return 0, unsupported(field, fmt.Sprintf("%q: too long", *d))
	}
	if v > 0 && ms == 0 {
		ms = 1
	}
	return uint32(ms), nil
}

func compileRetry(rule ruleSpec, fr *ferryv1.RouteRule) *configError {
	r := rule.retry
	if r == nil {
		return nil
	}
	field := rule.field + ".retry"
	out := &ferryv1.RouteRetry{Attempts: defaultRetryAttempts}
	if r.Attempts != nil {
		if *r.Attempts < 0 || *r.Attempts > maxRetryAttempts {
			return unsupported(field+".attempts", fmt.Sprintf("%d: not 0 to %d", *r.Attempts, maxRetryAttempts))
		}
		out.Attempts = uint32(*r.Attempts)
	}
	for i, c := range r.Codes {
		if c < 400 || c > 599 {
			return unsupported(fmt.Sprintf("%s.codes[%d]", field, i), fmt.Sprintf("%d: not 400 to 599", c))
		}
		out.Codes = append(out.Codes, uint32(c))
	}
	backoff, err := durationMS(r.Backoff, field+".backoff")
	if err != nil {
		return err
	}
	out.BackoffMs = backoff
	fr.Retry = out
	return nil
}

// tableKey is one route table: a Service port and the clients it is for.
type tableKey struct {
	service         string // namespace/name
	port            uint32
	clientNamespace string
}

// placedMatch is a match in a table with what orders it.
type placedMatch struct {
	m     *ferryv1.RouteMatch
	route *routeSpec
	rule  int // index in the route's rules
	index int // index in the rule's matches
}

// routeTables builds the tables of every Service from the routes in force, in
// Gateway API's precedence.
func routeTables(routes []*compiledRoute) map[tableKey]*ferryv1.RouteTable {
	slices.SortFunc(routes, func(a, b *compiledRoute) int { return olderRoute(a.spec, b.spec) })
	tables := map[tableKey]*ferryv1.RouteTable{}
	placed := map[tableKey][]placedMatch{}
	for _, cr := range routes {
		for _, t := range cr.targets {
			k := tableKey{service: t.service.Namespace + "/" + t.service.Name, port: t.port}
			if cr.spec.key.namespace != t.service.Namespace {
				k.clientNamespace = cr.spec.key.namespace
			}
			tab := tables[k]
			if tab == nil {
				tab = &ferryv1.RouteTable{Port: k.port, ClientNamespace: k.clientNamespace}
				tables[k] = tab
			}
			for i, rule := range cr.rules {
				idx := uint32(len(tab.Rules))
				tab.Rules = append(tab.Rules, rule)
				for j, m := range cr.matches[i] {
					c := &ferryv1.RouteMatch{Rule: idx, Path: m.Path, Headers: m.Headers, QueryParams: m.QueryParams, Method: m.Method}
					placed[k] = append(placed[k], placedMatch{m: c, route: cr.spec, rule: i, index: j})
				}
			}
		}
	}
	for k, ms := range placed {
		slices.SortStableFunc(ms, comparePlaced)
		for _, pm := range ms {
			tables[k].Matches = append(tables[k].Matches, pm.m)
		}
	}
	return tables
}

// comparePlaced orders matches as Gateway API's HTTPRoute precedence: an exact
// path, then the longest prefix, then a method, the most headers, the most query
// parameters, then the oldest route, its namespace/name, rule and match order.
// Regular expressions, whose precedence Gateway API leaves to implementations,
// come after exact paths and before prefixes, longest first, as do GRPCRoute
// matches compiled to them.
func comparePlaced(a, b placedMatch) int {
	ra, la := pathRank(a.m.Path)
	rb, lb := pathRank(b.m.Path)
	return cmp.Or(
		cmp.Compare(ra, rb),
		cmp.Compare(lb, la),
		cmp.Compare(boolRank(a.m.Method != ""), boolRank(b.m.Method != "")),
		cmp.Compare(len(b.m.Headers), len(a.m.Headers)),
		cmp.Compare(len(b.m.QueryParams), len(a.m.QueryParams)),
		olderRoute(a.route, b.route),
		cmp.Compare(a.rule, b.rule),
		cmp.Compare(a.index, b.index),
	)
}

func pathRank(p *ferryv1.StringMatch) (int, int) {
	if p == nil {
		return 2, 1 // Gateway API's default path match: PathPrefix "/"
	}
	switch p.Type {
	case string(gatewayv1.PathMatchExact):
		return 0, len(p.Value)
	case string(gatewayv1.PathMatchRegularExpression):
		return 1, len(p.Value)
	}
	return 2, len(p.Value)
}

func boolRank(b bool) int {
	if b {
		return 0
	}
	return 1
}

// olderRoute orders routes by creation, then namespace/name (then kind, so the
// order is total).
func olderRoute(a, b *routeSpec) int {
	return cmp.Or(a.created.Compare(b.created),
		strings.Compare(a.key.namespace+"/"+a.key.name, b.key.namespace+"/"+b.key.name),
		strings.Compare(a.key.kind, b.key.kind))
}

// lastGood is the last generation of a route or policy that compiled.
type lastGood[T any] struct {
	generation int64
	spec       T
}

// routeOutcome is what became of one route in a rebuild.
type routeOutcome struct {
	spec     *routeSpec // the current generation
	err      *configError
	inForce  *compiledRoute
	inForceG int64 // generation in force when it is not the current one
}

// routes compiles every route attached to a Service of svcs and sets the
// Services' route tables. It returns each route's status and what to log.
func (v *View) routes(svcs []*ferryv1.Service) ([]*ferryv1.ConfigStatus, []routeNote, error) {
	v.mu.Lock()
	httpRoutes, grpcRoutes, grantLister := v.httpRoutes, v.grpcRoutes, v.grants
	v.mu.Unlock()
	if httpRoutes == nil && grpcRoutes == nil {
		return nil, nil, nil
	}
	env := &routeEnv{services: make(map[string]*ferryv1.Service, len(svcs))}
	for _, s := range svcs {
		env.services[s.Namespace+"/"+s.Name] = s
	}
	if grantLister != nil {
		objs, err := grantLister.List(labels.Everything())
		if err != nil {
			return nil, nil, fmt.Errorf("list reference grants: %w", err)
		}
		for _, o := range objs {
			g := &gatewayv1beta1.ReferenceGrant{}
			if u, ok := o.(*unstructured.Unstructured); ok && runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, g) == nil {
				env.grants = append(env.grants, g)
			}
		}
	}
	var outcomes []*routeOutcome
	seen := map[configKey]bool{}
	for _, l := range []struct {
		lister cache.GenericLister
		kind   string
	}{{httpRoutes, KindHTTPRoute}, {grpcRoutes, KindGRPCRoute}} {
		if l.lister == nil {
			continue
		}
		objs, err := l.lister.List(labels.Everything())
		if err != nil {
			return nil, nil, fmt.Errorf("list %ss: %w", l.kind, err)
		}
		for _, o := range objs {
			u, ok := o.(*unstructured.Unstructured)
			if !ok {
				continue
			}
			oc := v.routeOutcome(l.kind, u, env)
			if oc == nil {
				continue
			}
			seen[oc.spec.key] = true
			outcomes = append(outcomes, oc)
		}
	}
	for k := range v.goodRoutes {
		if !seen[k] {
			delete(v.goodRoutes, k)
		}
	}
	var inForce []*compiledRoute
	var statuses []*ferryv1.ConfigStatus
	var notes []routeNote
	for _, oc := range outcomes {
		if oc.inForce != nil {
			inForce = append(inForce, oc.inForce)
		}
		cs := oc.status()
		statuses = append(statuses, cs)
		n := routeNote{route: oc.spec.key.String(), file: oc.spec.file, generation: oc.spec.generation, targets: strings.Join(cs.Targets, ",")}
		if e := oc.err; e != nil {
			n.field, n.reason, n.err, n.inForce = e.field, e.reason, e.msg, -1
			if oc.inForce != nil {
				n.inForce = oc.inForceG
			}
		}
		notes = append(notes, n)
	}
	tables := routeTables(inForce)
	for _, s := range svcs {
		name := s.Namespace + "/" + s.Name
		for k, t := range tables {
			if k.service == name {
				s.RouteTables = append(s.RouteTables, t)
			}
		}
		slices.SortFunc(s.RouteTables, func(a, b *ferryv1.RouteTable) int {
			return cmp.Or(cmp.Compare(a.Port, b.Port), strings.Compare(a.ClientNamespace, b.ClientNamespace))
		})
	}
	return statuses, notes, nil
}

// routeNote is what a user should hear about a route: that it applies, or why
// not and what stays in force.
type routeNote struct {
	route      string // "HTTPRoute namespace/name"
	file       string
	generation int64
	targets    string
	field      string // rejected: the offending field
	reason     string
	err        string
	inForce    int64 // rejected: the generation in force, -1 for none
}

// logRoutes logs the notes not logged by the previous rebuild, as logNotes.
func (v *View) logRoutes(notes []routeNote) {
	seen := make(map[routeNote]bool, len(notes))
	for _, n := range notes {
		seen[n] = true
		if v.loggedRoutes[n] {
			continue
		}
		switch {
		case n.err == "":
			v.log.Info("route applied", "route", n.route, "file", n.file, "generation", n.generation, "services", n.targets)
		case n.inForce >= 0:
			v.log.Error("route rejected; its last good generation stays in force", "route", n.route, "file", n.file, "generation", n.generation,
				"field", n.field, "reason", n.reason, "error", n.err, "in_force_generation", n.inForce)
		default:
			v.log.Error("route rejected; nothing of it applies", "route", n.route, "file", n.file, "generation", n.generation,
				"field", n.field, "reason", n.reason, "error", n.err)
		}
	}
	v.loggedRoutes = seen
}

// routeOutcome compiles one route object, falling back to its last good
// generation; nil when the route has no Service parent (it is a Gateway's).
func (v *View) routeOutcome(kind string, u *unstructured.Unstructured, env *routeEnv) *routeOutcome {
	var common struct {
		Spec gatewayv1.CommonRouteSpec `json:"spec"`
	}
	// The parents first, so a route of a Gateway is never judged here, whatever
	// the rest of it says.
	if err := decodeRoute(u, &common); err != nil || !servesMesh(common.Spec.ParentRefs) {
		return nil
	}
	var rs *routeSpec
	var cerr *configError
	switch kind {
	case KindHTTPRoute:
		r := &gatewayv1.HTTPRoute{}
		if cerr = decodeRoute(u, r); cerr == nil {
			rs = httpRouteSpec(r)
		}
	case KindGRPCRoute:
		r := &gatewayv1.GRPCRoute{}
		if cerr = decodeRoute(u, r); cerr == nil {
			rs, cerr = grpcRouteSpec(r)
		}
	}
	if rs == nil {
		rs = newRouteSpec(kind, metaOf(u), common.Spec.ParentRefs)
	}
	oc := &routeOutcome{spec: rs, err: cerr}
	if cerr == nil {
		var cr *compiledRoute
		if cr, oc.err = compileRoute(rs, env); oc.err == nil {
			oc.inForce = cr
			v.goodRoutes[rs.key] = lastGood[*routeSpec]{generation: rs.generation, spec: rs}
			return oc
		}
	}
	if good, ok := v.goodRoutes[rs.key]; ok {
		// The last good generation may itself no longer compile (its backend
		// went away): then nothing of the route applies.
		if cr, err := compileRoute(good.spec, env); err == nil {
			oc.inForce, oc.inForceG = cr, good.generation
		}
	}
	return oc
}

// decodeRoute decodes a route through JSON, whose errors name the field (a
// cluster's schema has checked the types already; local mode's manifests were
// decoded strictly when read).
func decodeRoute(u *unstructured.Unstructured, into any) *configError {
	data, err := json.Marshal(u.Object)
	if err == nil {
		err = json.Unmarshal(data, into)
	}
	if err != nil {
		field := "spec"
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) && te.Field != "" {
			field = te.Field
		}
		return unsupported(field, err.Error())
	}
	return nil
}

func metaOf(u *unstructured.Unstructured) metav1.ObjectMeta {
	return metav1.ObjectMeta{Namespace: u.GetNamespace(), Name: u.GetName(), Generation: u.GetGeneration(),
		CreationTimestamp: u.GetCreationTimestamp(), Annotations: u.GetAnnotations()}
}

// status is the route's ConfigStatus.
func (oc *routeOutcome) status() *ferryv1.ConfigStatus {
	rs := oc.spec
	cs := &ferryv1.ConfigStatus{Kind: rs.key.kind, Name: rs.key.namespace + "/" + rs.key.name, File: rs.file, Generation: uint64(max(rs.generation, 0))}
	for _, p := range rs.parents {
		if ServiceParent(p) {
			t := cmp.Or(string(deref(p.Namespace)), rs.key.namespace) + "/" + string(p.Name)
			if !slices.Contains(cs.Targets, t) {
				cs.Targets = append(cs.Targets, t)
			}
		}
	}
	slices.Sort(cs.Targets)
	accepted := &ferryv1.Condition{Type: CondAccepted, Status: true, Reason: reasonAccepted, Message: "applied"}
	resolved := &ferryv1.Condition{Type: CondResolvedRefs, Status: true, Reason: reasonResolvedRefs, Message: "every reference resolved"}
	if e := oc.err; e != nil {
		msg := e.Error() + "; " + inForceText(oc.inForce != nil, oc.inForceG)
		// A route Ferry does not apply is not Accepted, whatever the cause; a
		// reference it cannot resolve is also said in ResolvedRefs.
		accepted.Status, accepted.Reason, accepted.Message = false, e.reason, msg
		if e.cond == CondResolvedRefs {
			resolved.Status, resolved.Reason, resolved.Message = false, e.reason, msg
		}
		if oc.inForce != nil {
			cs.InForceGeneration = uint64(max(oc.inForceG, 0))
		}
	}
	cs.Conditions = []*ferryv1.Condition{accepted, resolved}
	return cs
}

func inForceText(kept bool, generation int64) string {
	if kept {
		return fmt.Sprintf("generation %d stays in force", generation)
	}
	return "nothing of it applies"
}

func deref[T any](p *T) T {
	var zero T
	if p == nil {
		return zero
	}
	return *p
}
