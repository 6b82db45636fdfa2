// This file holds the routing a Service's HTTPRoutes and GRPCRoutes compile to
// (ferryv1.RouteTable, checked by agent/state.go): which rule a request matches,
// where the rule sends it and what it changes on the way.

package proxy

import (
	"regexp"
	"time"
)

// RouteTable is the routing one set of clients sees on one Service port: the
// producer routes (ClientNamespace ""), or a namespace's consumer routes, which
// replace the producer routes for clients in that namespace (GAMMA).
type RouteTable struct {
	Port            uint16
	ClientNamespace string
	Rules           []RouteRule
	// Matches of every rule in precedence order; the first that matches a request
	// wins, and a request matching none is answered 404.
	Matches []RouteMatch
}

// MatchType is how a path or value is compared.
type MatchType string

// Match types, Gateway API's names.
const (
	MatchExact      MatchType = "Exact"
	MatchPathPrefix MatchType = "PathPrefix" // paths only, by whole segments
	MatchRegex      MatchType = "RegularExpression"
)

// RouteMatch is one match of a rule; each part that is set must match.
type RouteMatch struct {
	Rule    int // index in RouteTable.Rules
	Path    *StringMatch
	Headers []NamedMatch
	Query   []NamedMatch
	Method  string // "" any
}

// StringMatch matches a path or a value; Regex is compiled from Value (anchored)
// when Type is MatchRegex.
type StringMatch struct {
	Type  MatchType
	Value string
	Regex *regexp.Regexp
}

// NamedMatch matches a header (name in canonical form) or query parameter by value.
type NamedMatch struct {
	Name string
	StringMatch
}

// RouteRule is what happens to the requests a rule matches.
type RouteRule struct {
	Route    string // "HTTPRoute default/canary", for flows and metrics
	Index    int
	Backends []WeightedBackend
	Filters  []RouteFilter
	// RequestTimeout bounds the whole request, retries included; BackendTimeout
	// each try. 0: none.
	RequestTimeout time.Duration
	BackendTimeout time.Duration
	Retry          *Retry
}

// WeightedBackend is a Service port a share of a rule's requests go to.
type WeightedBackend struct {
	Service string // namespace/name
	Port    uint16
	Weight  uint32
}

// RouteFilter changes a request or its response; exactly one field is set.
type RouteFilter struct {
	RequestHeaders  *HeaderModifier
	ResponseHeaders *HeaderModifier
	Redirect        *Redirect
	URLRewrite      *URLRewrite
	Mirror          *Mirror
}

// HeaderModifier sets, adds and removes headers (names in canonical form).
type HeaderModifier struct {
	Set    []Header
	Add    []Header
	Remove []string
}

// Header is one header name and value.
type Header struct{ Name, Value string }

// Redirect answers with a redirect; zero fields keep the request's.
type Redirect struct {
	Scheme     string
	Hostname   string
	Path       *PathModifier
	Port       uint16
	StatusCode int // 301 or 302
}

// URLRewrite changes the request's host and path before it is sent on.
type URLRewrite struct {
	Hostname string
	Path     *PathModifier
}

// PathModifierType is how a redirect or rewrite changes the path.
type PathModifierType string

// Path modifiers, Gateway API's names.
const (
	ReplaceFullPath    PathModifierType = "ReplaceFullPath"
	ReplacePrefixMatch PathModifierType = "ReplacePrefixMatch"
)

// PathModifier replaces the whole path, or the prefix the rule's match matched.
type PathModifier struct {
	Type  PathModifierType
	Value string
}

// Mirror sends a copy of Percent of the requests to Backend; its responses are
// discarded.
type Mirror struct {
	Backend WeightedBackend
	Percent float64
}

// Retry tries a failed request again on another endpoint: connection failures and
// resets always, responses with one of Codes.
type Retry struct {
	Attempts int // tries after the first
	Codes    []int
	Backoff  time.Duration // base of the jittered exponential wait; 0: 25 ms
}
