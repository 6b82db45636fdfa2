// Package admin is the contract of the agent's admin API, served over a unix socket
// on every node: the JSON documents its endpoints return and a client for them. It
// imports no agent package, so the CLI and the tests read an agent without linking
// the agent (model: cilium's pkg/client, which depends only on API models).
package admin

import (
	"net/netip"
	"time"
)

// Status is what GET /status returns.
type Status struct {
	Node          string        `json:"node"`
	StateVersion  uint64        `json:"state_version"`
	StateAge      string        `json:"state_age"`
	Goroutines    int           `json:"goroutines"`
	OpenFDs       int           `json:"open_fds"`
	LiveConns     int           `json:"live_connections"`
	TunnelConns   int           `json:"tunnel_connections"`
	TunnelStreams int           `json:"tunnel_streams"`
	FastPath      bool          `json:"fast_path"`
	Pods          []StatusPod   `json:"pods"`
	Uptime        time.Duration `json:"uptime_ns"`
	// Certificates held from the operator (operator mode only).
	Certificates []HeldCert `json:"certificates,omitempty"`
	// Dropped are the entries of the applied state the agent left out as
	// malformed, each saying which and why; the rest of the state applied.
	Dropped []string `json:"dropped,omitempty"`
}

// StatusPod is one enrolled pod in Status.
type StatusPod struct {
	Name        string `json:"name"`
	IP          string `json:"ip"`
	Identity    string `json:"identity"`
	NetnsCookie uint64 `json:"netns_cookie"`
}

// HeldCert is one certificate the agent holds from the operator, with when it renews.
type HeldCert struct {
	Identity string    `json:"identity"`
	Serial   string    `json:"serial"`
	Issued   time.Time `json:"issued"`
	NotAfter time.Time `json:"notAfter"`
	RenewAt  time.Time `json:"renewAt"`
}

// Connections is what GET /connections returns.
type Connections struct {
	Live  []Conn `json:"live"`
	Ended []Conn `json:"ended"`
}

// Workload is one mesh workload in GET /workloads: every workload of the state, with
// whether this node runs it and whether it is enrolled here.
type Workload struct {
	Name      string   `json:"name"`
	Namespace string   `json:"namespace"`
	Node      string   `json:"node"`
	IPs       []string `json:"ips"`
	Identity  string   `json:"identity"`
	// MTLS is the PeerAuthentication mode: "Permissive" or "Strict", then any
	// per-port overrides ("Strict, 8081 Permissive").
	MTLS string `json:"mtls"`
	// Local: scheduled on this agent's node. Enrolled: captured by this agent now.
	Local       bool   `json:"local"`
	Enrolled    bool   `json:"enrolled"`
	NetnsCookie uint64 `json:"netns_cookie,omitempty"`
	// Error says why a local workload is not enrolled yet.
	Error string `json:"error,omitempty"`
}

// Workloads is what GET /workloads returns.
type Workloads struct {
	StateVersion uint64     `json:"state_version"`
	StateAge     string     `json:"state_age"`
	Workloads    []Workload `json:"workloads"`
}

// CertInfo describes one certificate in GET /certs.
type CertInfo struct {
	// Identity is the SPIFFE ID (workload certificates) or the subject (CAs).
	Identity  string    `json:"identity"`
	Serial    string    `json:"serial"`
	Issuer    string    `json:"issuer"`
	NotBefore time.Time `json:"not_before"`
	NotAfter  time.Time `json:"not_after"`
	// Error is set when the agent holds no usable certificate for the identity.
	Error string `json:"error,omitempty"`
}

// Certs is what GET /certs returns: the local workloads' certificates and the CAs
// the agent trusts.
type Certs struct {
	StateVersion uint64     `json:"state_version"`
	StateAge     string     `json:"state_age"`
	Workloads    []CertInfo `json:"workloads"`
	TrustBundle  []CertInfo `json:"trust_bundle"`
}

// AgentConfig is what GET /config returns: how the agent runs.
type AgentConfig struct {
	Node           string   `json:"node"`
	StatePath      string   `json:"state_path"`
	StateVersion   uint64   `json:"state_version"`
	StateAge       string   `json:"state_age"`
	TrustDomain    string   `json:"trust_domain"`
	AdminSocket    string   `json:"admin_socket"`
	ObserverSocket string   `json:"observer_socket,omitempty"`
	ObserverAddr   string   `json:"observer_addr,omitempty"`
	MetricsAddr    string   `json:"metrics_addr,omitempty"`
	FlowCapacity   int      `json:"flow_capacity"`
	PinDir         string   `json:"bpf_pin_dir"`
	Cgroup         string   `json:"cgroup"`
	Mark           uint32   `json:"mark"`
	FastPath       bool     `json:"fast_path"`
	MaxPods        int      `json:"max_pods"`
	ExcludedPorts  []uint32 `json:"excluded_ports"`
}

// Conn is one proxied connection, live or recently ended: the node proxy's record
// of it, which GET /connections returns and flows and metrics are made from.
type Conn struct {
	ID        uint64         `json:"id"`
	Direction Direction      `json:"direction"`
	Pod       string         `json:"pod"`
	Src       netip.AddrPort `json:"src"`
	Dst       netip.AddrPort `json:"dst"`
	// Service is the Service address (cluster IP and port) the client dialled, when
	// it dialled one; Dst is then the endpoint the proxy chose.
	Service     netip.AddrPort `json:"service,omitzero"`
	SrcIdentity string         `json:"src_identity,omitempty"`
	DstIdentity string         `json:"dst_identity,omitempty"`
	Security    Security       `json:"security"`
	// PeerSerial, on an inbound tunnel stream, is the serial number (hex) of the
	// certificate the source presented: after a rotation new connections show
	// the new one.
	PeerSerial string `json:"peer_serial,omitempty"`
	// CertNotAfter is when the certificate of this agent's pod on the connection
	// expires (the source pod's outbound, the destination pod's inbound), read
	// when the record was made; zero when the pod had none.
	CertNotAfter time.Time `json:"cert_not_after,omitzero"`
	// CertExpiring is set when that certificate had less than CertExpiringShare
	// of its lifetime left then (CertExpiring, the rule ferry check uses): its
	// renewal is overdue and the pod's connections are refused from CertNotAfter.
	CertExpiring bool `json:"cert_expiring,omitempty"`
	// SrcPod and DstPod name the mesh workloads ("namespace/name") at either end,
	// when the address is one; SrcNode and DstNode the nodes they run on.
	SrcPod  string `json:"src_pod,omitempty"`
	DstPod  string `json:"dst_pod,omitempty"`
	SrcNode string `json:"src_node,omitempty"`
	DstNode string `json:"dst_node,omitempty"`
	// SrcWorkload and DstWorkload name those pods' workloads ("namespace/name":
	// a Deployment's, a Job's, ... or the pod's when nothing controls it), which
	// metrics count by, as Istio's do.
	SrcWorkload string    `json:"src_workload,omitempty"`
	DstWorkload string    `json:"dst_workload,omitempty"`
	Start       time.Time `json:"start"`
	End         time.Time `json:"end,omitzero"`
	BytesSent   int64     `json:"bytes_sent"`
	BytesRecv   int64     `json:"bytes_received"`
	// Verdict, Reason and Status say how an ended connection came out; empty while
	// it is live.
	Verdict Verdict `json:"verdict,omitempty"`
	Reason  Reason  `json:"reason,omitempty"`
	// Status is the tunnel's answer to the CONNECT (200, or e.g. 403, 502, 504); 0
	// when the connection did not go through a tunnel or never got an answer.
	Status int `json:"status,omitempty"`
	// Error is the error that ended the connection, as text for people to read;
	// decide nothing on it (Verdict and Reason are the values).
	Error string `json:"error,omitempty"`
	// Protocol is what the proxy understood the bytes to be; "" is TCP.
	Protocol Protocol `json:"protocol,omitempty"`
	// HTTP is set on a request record (Observer.Request): one HTTP request or gRPC
	// call the proxy carried at L7. Start and End then bound the request, Dst is the
	// endpoint chosen for it, and BytesSent and BytesRecv count the request's and the
	// response's body bytes.
	HTTP *HTTP `json:"http,omitempty"`
	// Policy is the AuthorizationPolicy (namespace/name) that denied it (Reason
	// ReasonPolicy): the Deny that matched, or an Allow none of which matched.
	Policy string `json:"policy,omitempty"`
	// Budget is the per-pod budget that refused it (Reason ReasonPodBudget):
	// outbound_connections, inbound_connections, pending_requests or buffer_memory.
	Budget string `json:"budget,omitempty"`
}

// Protocol is what a connection's bytes were understood to be.
type Protocol string

const (
	// TCP: an opaque byte stream (declared, or nothing else detected).
	TCP Protocol = "tcp"
	// HTTP1: HTTP/1.x, proxied per request.
	HTTP1 Protocol = "http"
	// HTTP2: HTTP/2 without TLS (h2c, prior knowledge), proxied per stream.
	HTTP2 Protocol = "http2"
	// GRPC: HTTP/2 whose requests are gRPC calls (Content-Type application/grpc).
	GRPC Protocol = "grpc"
)

// HTTP is what the proxy saw of one request and its response.
type HTTP struct {
	Method    string `json:"method"`
	Authority string `json:"authority"`
	Path      string `json:"path"`
	// Proto is the request's protocol version: "HTTP/1.1", "HTTP/2.0".
	Proto string `json:"proto"`
	// Status is the response's status code; 0 when no response came (Reason says why).
	// A status the mesh answered itself (503 for no endpoint, 502 for an endpoint that
	// failed) comes with a Reason.
	Status int `json:"status,omitempty"`
	// GRPCStatus is the call's grpc-status (from the trailers, or the headers of a
	// trailers-only response), for gRPC; "" otherwise.
	GRPCStatus string `json:"grpc_status,omitempty"`
	// Route is the route rule that carried the request ("HTTPRoute default/canary"
	// and RouteRule its index in spec.rules); "" when the Service has no routes.
	Route     string `json:"route,omitempty"`
	RouteRule int    `json:"route_rule,omitempty"`
	// Retries is how many times the request was tried again after its first try.
	Retries int `json:"retries,omitempty"`
	// FaultDelay is how long a TrafficPolicy's fault injection held the request
	// before sending it on; 0 when it was not delayed. The latency alone cannot tell
	// a delayed request from a slow endpoint.
	FaultDelay time.Duration `json:"fault_delay,omitempty"`
	// TraceID is the W3C trace id of the request's traceparent, or the B3 trace id,
	// when it carried one.
	TraceID string `json:"trace_id,omitempty"`
}

// Security says how a proxied connection was carried.
type Security string

const (
	// MTLS: through the mutual-TLS tunnel between nodes.
	MTLS Security = "mtls"
	// SameNode: both ends on this node; the agent delivered it without leaving the
	// host, and knows both identities from the listeners it owns.
	SameNode Security = "same-node"
	// Plaintext: a destination or source outside the mesh.
	Plaintext Security = "plaintext"
)

// Direction says which side of the agent a connection entered.
type Direction string

const (
	// Outbound: an enrolled pod on this node made the connection.
	Outbound Direction = "outbound"
	// Inbound: the connection is to an enrolled pod on this node.
	Inbound Direction = "inbound"
)

// Verdict says what the mesh did with a connection.
type Verdict string

const (
	// VerdictForwarded: carried to its destination; it may still have ended with an
	// error later (Reason says which).
	VerdictForwarded Verdict = "forwarded"
	// VerdictDenied: refused by the mesh, e.g. the destination's tunnel answered 403.
	VerdictDenied Verdict = "denied"
	// VerdictError: the mesh tried and failed: the destination refused, timed out or
	// could not be reached.
	VerdictError Verdict = "error"
)

// Reason says why a connection was not carried, or why it ended badly.
type Reason string

const (
	// ReasonNone: a clean end.
	ReasonNone Reason = ""
	// ReasonRefused: the destination refused the connection (nothing listens there),
	// on this node or behind the tunnel.
	ReasonRefused Reason = "refused"
	// ReasonTimeout: the destination did not answer in time.
	ReasonTimeout Reason = "timeout"
	// ReasonUnreachable: no route to the destination.
	ReasonUnreachable Reason = "unreachable"
	// ReasonForbidden: the destination's tunnel refused the stream (403).
	ReasonForbidden Reason = "forbidden"
	// ReasonTunnel: the tunnel failed otherwise: its handshake, a malformed or
	// refused CONNECT, a destination agent shutting down.
	ReasonTunnel Reason = "tunnel"
	// ReasonReset: a peer reset the connection while it was carried.
	ReasonReset Reason = "reset"
	// ReasonCanceled: the agent stopped, or the pod left, before it could be carried.
	ReasonCanceled Reason = "canceled"
	// ReasonNoEndpoints: the connection was to a Service with no ready endpoint for
	// its port (or to a port the Service does not have).
	ReasonNoEndpoints Reason = "no_endpoints"
	// ReasonFault: a TrafficPolicy's fault injection answered the request.
	ReasonFault Reason = "fault"
	// ReasonCircuitOpen: a TrafficPolicy's connection pool limit was reached
	// (connections, pending or concurrent requests); the mesh answered 503 at once.
	ReasonCircuitOpen Reason = "circuit_open"
	// ReasonRateLimited: a TrafficPolicy's rate limit answered 429.
	ReasonRateLimited Reason = "rate_limited"
	// ReasonNoRoute: the Service has routes and none matched the request (404), or
	// the matching rule has no backend (500).
	ReasonNoRoute Reason = "no_route"
	// ReasonPolicy: an AuthorizationPolicy denied it at the destination
	// (Conn.Policy names it).
	ReasonPolicy Reason = "policy_denied"
	// ReasonPodBudget: the source pod (or source identity, inbound) was over one of
	// its budgets in the shared node proxy (Conn.Budget says which); refused at once.
	ReasonPodBudget Reason = "pod_budget"
	// ReasonPanic: the proxy's handler of the connection or request panicked; it was
	// recovered and the connection closed, and the agent kept running.
	ReasonPanic Reason = "proxy_panic"
	// ReasonStrictMTLS: the kernel refused a plaintext connection to a pod port
	// under PeerAuthentication STRICT (a flow of its own: no proxy saw it).
	ReasonStrictMTLS Reason = "strict_mtls"
	// ReasonCertExpired: the pod's own certificate had expired (the operator was
	// away past its life); the agent refuses rather than present it.
	ReasonCertExpired Reason = "certificate_expired"
	// ReasonOther: any other error (Conn.Error has the text).
	ReasonOther Reason = "error"
)
