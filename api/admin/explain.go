package admin

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
)

// ExplainQuery is what GET /explain is asked: what would happen to a connection
// (or, with Method and Path, an HTTP request) from Src to Dst.
type ExplainQuery struct {
	// Src is the source pod, "namespace/name" or an IP (an IP that is no mesh
	// workload is a client outside the mesh, in plaintext).
	Src string `json:"src"`
	// Dst is host:port, the host a pod IP, a Service cluster IP or a Service's
	// DNS name (name.namespace[.svc[.cluster.local]]).
	Dst string `json:"dst"`
	// Method and Path, when set, are an HTTP request on the connection.
	Method string `json:"method,omitempty"`
	Path   string `json:"path,omitempty"`
	// Request asks for the request's decision even where Dst is a pod: what the
	// destination's agent decides of a request the source's proxy carried at L7.
	Request bool `json:"request,omitempty"`
}

// Values is q as the query parameters of GET /explain.
func (q ExplainQuery) Values() url.Values {
	v := url.Values{"src": {q.Src}, "dst": {q.Dst}}
	if q.Method != "" || q.Path != "" {
		v.Set("method", q.Method)
		v.Set("path", q.Path)
	}
	if q.Request {
		v.Set("request", "1")
	}
	return v
}

// Explain is what GET /explain returns: one agent's answer, from its state now.
// The source's agent knows the capture and the route; each destination pod's
// agent decides its authorization (DecidedBy says which agent answered).
type Explain struct {
	Node         string             `json:"node"`
	StateVersion uint64             `json:"state_version"`
	Query        ExplainQuery       `json:"query"`
	Source       ExplainSource      `json:"source"`
	Destination  ExplainDestination `json:"destination"`
	// Capture is nil when the source is not on this agent's node.
	Capture   *ExplainCapture   `json:"capture,omitempty"`
	Route     ExplainRoute      `json:"route"`
	Decisions []ExplainDecision `json:"decisions"`
}

// ExplainSource is the source as the mesh knows it.
type ExplainSource struct {
	Pod  string `json:"pod,omitempty"` // "namespace/name"; "" outside the mesh
	IP   string `json:"ip"`
	Node string `json:"node,omitempty"`
	// Identity is what the source presents: its SPIFFE ID (its certificate on a
	// tunnel, known to the node's proxy on the same node); "" in plaintext.
	Identity string `json:"identity,omitempty"`
	Enrolled bool   `json:"enrolled"`
}

// ExplainDestination is what Dst names.
type ExplainDestination struct {
	Addr string `json:"addr"` // IP:port, the DNS name resolved
	// Kind: "service" (a cluster IP), "pod" (a mesh workload) or "outside".
	Kind    string `json:"kind"`
	Service string `json:"service,omitempty"`
	Pod     string `json:"pod,omitempty"`
}

// ExplainCapture is whether the source's connection is captured, from the pinned
// maps of the source's node.
type ExplainCapture struct {
	// NetnsCookie is the source pod's network namespace, as the agent enrolled it;
	// InEnrolledNetns says the cookie is in the enrolled_netns map.
	NetnsCookie     uint64   `json:"netns_cookie,omitempty"`
	InEnrolledNetns bool     `json:"in_enrolled_netns"`
	ExcludedPorts   []uint16 `json:"excluded_ports"`
	// PortCaptured: the destination port is neither a mesh port nor excluded,
	// and the destination not loopback.
	PortCaptured bool `json:"port_captured"`
	// Captured: the connection goes to the node proxy.
	Captured bool   `json:"captured"`
	Why      string `json:"why"`
	// Error says why the maps could not be read.
	Error string `json:"error,omitempty"`
}

// ExplainRoute is where the source's proxy sends the connection or request.
type ExplainRoute struct {
	// Service and Port: the Service port dialled, when Dst is one.
	Service string `json:"service,omitempty"`
	Port    uint16 `json:"port,omitempty"`
	// Protocol is what the port declares ("" when it is detected).
	Protocol Protocol `json:"protocol,omitempty"`
	// L7: the source's proxy carries each request on its own (an HTTP request to
	// a Service port that is not TCP); else the connection is carried whole.
	L7 bool `json:"l7"`
	// Route and Rule are the route and its rule the request matched (Rule -1:
	// none, or no routes).
	Route     string            `json:"route,omitempty"`
	Rule      int               `json:"rule"`
	Endpoints []ExplainEndpoint `json:"endpoints"`
	// Status, when not 0, is the answer the source's proxy gives itself (404 no
	// route, 400 a refused path; 503 no endpoint); Why says it in words.
	Status int    `json:"status,omitempty"`
	Why    string `json:"why"`
}

// ExplainEndpoint is a pod (or an address outside the mesh) the route may send to.
type ExplainEndpoint struct {
	Addr     string   `json:"addr"`
	Pod      string   `json:"pod,omitempty"`
	Node     string   `json:"node,omitempty"`
	Identity string   `json:"identity,omitempty"` // what the destination presents on the tunnel
	Security Security `json:"security"`
}

// ExplainDecision is the authorization decision of an endpoint's policies, as
// enforcement makes it (the same function).
type ExplainDecision struct {
	Endpoint string `json:"endpoint"`
	Pod      string `json:"pod,omitempty"`
	Node     string `json:"node,omitempty"`
	// DecidedBy is the node whose agent decided; the destination's agent is the
	// one that enforces.
	DecidedBy string `json:"decided_by"`
	// MTLSMode is the destination's PeerAuthentication mode on the port
	// ("Permissive" when none).
	MTLSMode string `json:"mtls_mode"`
	// Caller is who the destination sees: the source's identity, or "" in
	// plaintext (only rules without identities and namespaces can match it).
	Caller string `json:"caller,omitempty"`
	// Level is "connection" (L4: HTTP conditions of a Deny count as matched,
	// of an Allow as not) or "request" (each request, on its normalised path).
	Level   string         `json:"level"`
	Verdict ExplainVerdict `json:"verdict"`
}

// ExplainVerdict is one decision and what decided it.
type ExplainVerdict struct {
	Allowed bool `json:"allowed"`
	// Policy, Action and Rule: the deciding policy (namespace/name), its action
	// and the index of its matching rule (-1: no rule matched, as when no Allow
	// matches and the first Allow is named).
	Policy string   `json:"policy,omitempty"`
	Action string   `json:"action,omitempty"`
	Rule   int      `json:"rule"`
	Audits []string `json:"audits,omitempty"`
	// Path is the normalised path the rules saw (requests only).
	Path string `json:"path,omitempty"`
	Why  string `json:"why"`
}

// ExplainError is a question an agent cannot answer (an unknown pod or Service):
// GET /explain's 404, with the reason as its body.
type ExplainError struct{ Why string }

func (e *ExplainError) Error() string { return e.Why }

// Explain asks the agent what it would do with q.
func (c *Client) Explain(ctx context.Context, q ExplainQuery) (Explain, error) {
	var ex Explain
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://agent/explain?"+q.Values().Encode(), nil)
	if err != nil {
		return ex, fmt.Errorf("agent admin API /explain: %w", err)
	}
	resp, err := c.do(req)
	if err != nil {
		return ex, err
	}
	defer resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusOK:
	case http.StatusNotFound, http.StatusBadRequest:
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return ex, &ExplainError{Why: string(trimNL(b))}
	default:
		return ex, fmt.Errorf("agent admin API /explain: %s", resp.Status)
	}
	if err := json.NewDecoder(resp.Body).Decode(&ex); err != nil {
		return ex, fmt.Errorf("agent admin API /explain: %w", err)
	}
	return ex, nil
}

func trimNL(b []byte) []byte {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == '\r') {
		b = b[:len(b)-1]
	}
	return b
}
