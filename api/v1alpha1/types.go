// Package v1alpha1 holds the Go types of Ferry's custom resources (group
// ferry.io, version v1alpha1): AuthorizationPolicy, PeerAuthentication and
// TrafficPolicy. Their CustomResourceDefinitions are in deploy/crds; a test there
// checks that every field here is accepted by the schema.
package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// Group and Version of Ferry's API.
const (
	Group   = "ferry.io"
	Version = "v1alpha1"
)

// Enrollment label: a namespace with MeshLabel=MeshEnabled is in the mesh; a pod
// in it with MeshLabel=MeshDisabled opts out.
const (
	MeshLabel    = "ferry.io/mesh"
	MeshEnabled  = "enabled"
	MeshDisabled = "disabled"
)

// GroupVersion returns ferry.io/v1alpha1.
func GroupVersion() schema.GroupVersion {
	return schema.GroupVersion{Group: Group, Version: Version}
}

// AddToScheme registers the types of this package in s, for typed clients and
// informers.
func AddToScheme(s *runtime.Scheme) error {
	gv := GroupVersion()
	s.AddKnownTypes(gv,
		&AuthorizationPolicy{}, &AuthorizationPolicyList{},
		&PeerAuthentication{}, &PeerAuthenticationList{},
		&TrafficPolicy{}, &TrafficPolicyList{},
	)
	metav1.AddToGroupVersion(s, gv)
	return nil
}

// WorkloadSelector picks the pods of a policy's namespace it applies to. Empty
// or absent: every pod of the namespace; in the operator's namespace, every pod
// of the mesh.
type WorkloadSelector struct {
	// MatchLabels are pod labels that must all be present with these values.
	MatchLabels map[string]string `json:"matchLabels,omitempty"`
}

// AuthorizationAction is what an AuthorizationPolicy does with matching
// connections and requests.
type AuthorizationAction string

// Authorization actions. Deny policies are checked first; if any Allow policy
// selects a workload, what matches none of them is denied, so an Allow policy
// with no rules is a default deny. Audit policies decide nothing: a match is
// logged and counted.
//
// Mesh-wide default deny: an Allow policy with no rules in the operator's
// namespace (ferry-system), whose empty selector picks every workload of the
// mesh, denies everything no other Allow policy allows.
const (
	ActionAllow AuthorizationAction = "Allow"
	ActionDeny  AuthorizationAction = "Deny"
	ActionAudit AuthorizationAction = "Audit"
)

// AuthorizationPolicy allows or denies connections and requests to the selected
// workloads by the caller's identity, namespace and address, and the port, HTTP
// method, path, host and headers. The destination node's proxy enforces it.
type AuthorizationPolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec AuthorizationPolicySpec `json:"spec"`
}

// AuthorizationPolicySpec is the desired behaviour of an AuthorizationPolicy.
type AuthorizationPolicySpec struct {
	// Selector picks the workloads the policy protects.
	Selector *WorkloadSelector `json:"selector,omitempty"`
	// Action is Allow (the default), Deny or Audit.
	Action AuthorizationAction `json:"action,omitempty"`
	// Rules match a connection or request when any one of them matches.
	Rules []AuthorizationRule `json:"rules,omitempty"`
}

// AuthorizationRule matches when every one of its non-empty parts matches.
type AuthorizationRule struct {
	// From matches the caller: any one of the sources.
	From []Source `json:"from,omitempty"`
	// To matches the destination and request: any one of the operations.
	To []Operation `json:"to,omitempty"`
}

// Source is a set of callers. Within a source, every non-empty list must match:
// a positive list when one of its values matches, a not-list when none does.
// Identities and namespaces come from the caller's mTLS certificate, so a
// plaintext caller matches no identity or namespace (and every not-form).
type Source struct {
	// Identities are SPIFFE IDs (spiffe://<trust-domain>/ns/<ns>/sa/<sa>); a
	// leading or trailing "*" matches any prefix or suffix, "*" alone any
	// authenticated caller.
	Identities    []string `json:"identities,omitempty"`
	NotIdentities []string `json:"notIdentities,omitempty"`
	// Namespaces of the callers.
	Namespaces    []string `json:"namespaces,omitempty"`
	NotNamespaces []string `json:"notNamespaces,omitempty"`
	// IPBlocks are the caller's addresses, as CIDRs or single addresses.
	IPBlocks    []string `json:"ipBlocks,omitempty"`
	NotIPBlocks []string `json:"notIPBlocks,omitempty"`
}

// Operation is a set of destinations and requests. Methods, Paths, Hosts and
// Headers need HTTP: on a plain TCP connection an Allow rule using them never
// matches, and a Deny rule matches when its other parts do (Istio's rule).
type Operation struct {
	// Ports of the destination workload.
	Ports    []int32 `json:"ports,omitempty"`
	NotPorts []int32 `json:"notPorts,omitempty"`
	// Methods are HTTP methods (GET, POST, ...).
	Methods []string `json:"methods,omitempty"`
	// Paths are compared with the request's normalised path; a trailing "*"
	// matches any suffix.
	Paths []string `json:"paths,omitempty"`
	// Hosts are compared with the request's Host, case-insensitively and without
	// its port; a leading "*" matches any prefix.
	Hosts []string `json:"hosts,omitempty"`
	// Headers must all be present with one of their values.
	Headers []HeaderMatch `json:"headers,omitempty"`
}

// HeaderMatch matches an HTTP header by name (case-insensitive) and value.
type HeaderMatch struct {
	// Name of the header.
	Name string `json:"name"`
	// Values: any one matches exactly. Empty: the header must be present.
	Values []string `json:"values,omitempty"`
}

// AuthorizationPolicyList is a list of AuthorizationPolicy.
type AuthorizationPolicyList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`

	Items []AuthorizationPolicy `json:"items"`
}

// MTLSMode says whether the selected workloads accept plaintext.
type MTLSMode string

// mTLS modes.
const (
	// MTLSPermissive accepts mTLS from mesh peers and plaintext from others.
	MTLSPermissive MTLSMode = "Permissive"
	// MTLSStrict accepts only mTLS; plaintext is refused (in the kernel).
	MTLSStrict MTLSMode = "Strict"
)

// PeerAuthentication sets the mTLS mode of the selected workloads. The most
// specific one decides a pod's mode: one whose selector picks the pod, else its
// namespace's without a selector, else the mesh-wide one (in the operator's
// namespace, without a selector); a mode left empty is taken from the next less
// specific one, and the mesh's default is Permissive. Among two equally specific
// ones the oldest wins, as in Istio.
type PeerAuthentication struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec PeerAuthenticationSpec `json:"spec"`
}

// PeerAuthenticationSpec is the desired mTLS mode.
type PeerAuthenticationSpec struct {
	// Selector picks the workloads the mode applies to.
	Selector *WorkloadSelector `json:"selector,omitempty"`
	// MTLS is the mode.
	MTLS MutualTLS `json:"mtls"`
	// PortLevelMTLS overrides the mode for some container ports of the selected
	// pods (by port number, as the pod listens); it needs a selector.
	PortLevelMTLS map[uint32]MutualTLS `json:"portLevelMtls,omitempty"`
}

// MutualTLS holds the mTLS mode.
type MutualTLS struct {
	// Mode is Permissive or Strict; empty takes the mode of the next less
	// specific PeerAuthentication (Permissive when there is none).
	Mode MTLSMode `json:"mode,omitempty"`
}

// PeerAuthenticationList is a list of PeerAuthentication.
type PeerAuthenticationList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`

	Items []PeerAuthentication `json:"items"`
}

// TrafficPolicy sets how the proxy calls a Service: load balancing, timeouts,
// retries, circuit breaking, outlier detection, fault injection, a retry budget and
// a rate limit.
type TrafficPolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	Spec TrafficPolicySpec `json:"spec"`
}

// TrafficPolicySpec is the desired behaviour towards the target Services.
type TrafficPolicySpec struct {
	// TargetRefs are the Services (in the policy's namespace) it applies to.
	TargetRefs []PolicyTargetReference `json:"targetRefs"`
	// LoadBalancer picks the endpoint of each connection or request.
	LoadBalancer *LoadBalancer `json:"loadBalancer,omitempty"`
	// Timeouts bound connects, requests and idle connections.
	Timeouts *Timeouts `json:"timeouts,omitempty"`
	// Retries of failed requests.
	Retries *RetryPolicy `json:"retries,omitempty"`
	// CircuitBreaker limits concurrent work towards the Service.
	CircuitBreaker *CircuitBreaker `json:"circuitBreaker,omitempty"`
	// OutlierDetection ejects failing endpoints for a while.
	OutlierDetection *OutlierDetection `json:"outlierDetection,omitempty"`
	// Fault injects delays and aborts into HTTP requests, for testing.
	Fault *FaultInjection `json:"fault,omitempty"`
	// RetryBudget caps retries (of this policy and of routes) at a share of the
	// requests, so that an outage is not amplified.
	RetryBudget *RetryBudget `json:"retryBudget,omitempty"`
	// RateLimit bounds the requests each endpoint of the Service is sent.
	RateLimit *RateLimit `json:"rateLimit,omitempty"`
}

// PolicyTargetReference names the object a policy attaches to, as Gateway API
// policies do.
type PolicyTargetReference struct {
	// Group of the target; "" (core) for a Service.
	Group string `json:"group,omitempty"`
	// Kind of the target: Service.
	Kind string `json:"kind"`
	// Name of the target.
	Name string `json:"name"`
}

// LoadBalancerType is a load-balancing algorithm.
type LoadBalancerType string

// Load-balancing algorithms.
const (
	// LoadBalancerP2CEWMA picks the better of two random endpoints by
	// latency (EWMA) and outstanding requests; the default.
	LoadBalancerP2CEWMA      LoadBalancerType = "P2CEWMA"
	LoadBalancerRoundRobin   LoadBalancerType = "RoundRobin"
	LoadBalancerRandom       LoadBalancerType = "Random"
	LoadBalancerLeastRequest LoadBalancerType = "LeastRequest"
	// LoadBalancerRingHash keeps a key on one endpoint (consistent hashing).
	LoadBalancerRingHash LoadBalancerType = "RingHash"
)

// LoadBalancer selects a load-balancing algorithm.
type LoadBalancer struct {
	// Type is the algorithm; P2CEWMA when empty.
	Type LoadBalancerType `json:"type,omitempty"`
	// HashHeader is the HTTP header RingHash hashes; without it, the client's
	// address.
	HashHeader string `json:"hashHeader,omitempty"`
}

// Timeouts towards a Service.
type Timeouts struct {
	// Connect bounds the TCP and TLS set-up to an endpoint.
	Connect *metav1.Duration `json:"connect,omitempty"`
	// Request bounds a whole HTTP request, retries included.
	Request *metav1.Duration `json:"request,omitempty"`
	// Idle closes connections with no traffic for this long.
	Idle *metav1.Duration `json:"idle,omitempty"`
}

// RetryPolicy retries failed HTTP requests.
type RetryPolicy struct {
	// Attempts is the most retries after the first try.
	Attempts int32 `json:"attempts"`
	// PerTryTimeout bounds each try.
	PerTryTimeout *metav1.Duration `json:"perTryTimeout,omitempty"`
	// On lists the failures that are retried: connect-failure, reset, 5xx,
	// gateway-error, retriable-4xx. Empty: connect-failure, reset and
	// gateway-error.
	On []string `json:"on,omitempty"`
	// Backoff is the base of the jittered exponential wait between tries.
	Backoff *metav1.Duration `json:"backoff,omitempty"`
}

// CircuitBreaker limits concurrent work towards a Service; past a limit, new
// work fails at once instead of queueing.
type CircuitBreaker struct {
	// MaxConnections to all endpoints together.
	MaxConnections *int32 `json:"maxConnections,omitempty"`
	// MaxPendingRequests waiting for a connection.
	MaxPendingRequests *int32 `json:"maxPendingRequests,omitempty"`
	// MaxRequests in flight.
	MaxRequests *int32 `json:"maxRequests,omitempty"`
	// MaxRequestsPerConnection to an endpoint; the connection is closed after.
	MaxRequestsPerConnection *int32 `json:"maxRequestsPerConnection,omitempty"`
	// MaxRetries in flight. The proxy bounds retries with spec.retryBudget
	// instead; a policy setting this is rejected.
	MaxRetries *int32 `json:"maxRetries,omitempty"`
}

// OutlierDetection ejects endpoints that keep failing.
type OutlierDetection struct {
	// ConsecutiveErrors (connect failures, 5xx) that eject an endpoint.
	ConsecutiveErrors *int32 `json:"consecutiveErrors,omitempty"`
	// ConsecutiveGatewayErrors (connect failures, 502, 503, 504) that eject an
	// endpoint.
	ConsecutiveGatewayErrors *int32 `json:"consecutiveGatewayErrors,omitempty"`
	// Interval between ejection sweeps.
	Interval *metav1.Duration `json:"interval,omitempty"`
	// BaseEjectionTime, multiplied by the number of ejections so far.
	BaseEjectionTime *metav1.Duration `json:"baseEjectionTime,omitempty"`
	// MaxEjectionPercent of the endpoints that may be ejected at once.
	MaxEjectionPercent *int32 `json:"maxEjectionPercent,omitempty"`
}

// FaultInjection delays or aborts a share of HTTP requests.
type FaultInjection struct {
	// Delay holds requests back before sending them on.
	Delay *FaultDelay `json:"delay,omitempty"`
	// Abort answers requests with an error status without sending them on.
	Abort *FaultAbort `json:"abort,omitempty"`
}

// FaultDelay delays a share of requests.
type FaultDelay struct {
	// Percent of requests delayed, 0 to 100.
	Percent int32 `json:"percent"`
	// Duration of the delay.
	Duration metav1.Duration `json:"duration"`
}

// FaultAbort aborts a share of requests.
type FaultAbort struct {
	// Percent of requests aborted, 0 to 100.
	Percent int32 `json:"percent"`
	// HTTPStatus answered, 200 to 599.
	HTTPStatus int32 `json:"httpStatus"`
}

// RetryBudget lets retries be at most Percent of the requests of the last TTL,
// plus MinRetriesPerSecond (Linkerd's retry budgets).
type RetryBudget struct {
	// Percent of requests that may be retries, 0 to 100.
	Percent int32 `json:"percent"`
	// MinRetriesPerSecond are allowed whatever the share, so that a Service with
	// few requests can retry at all.
	MinRetriesPerSecond *int32 `json:"minRetriesPerSecond,omitempty"`
	// TTL is the window requests and retries are counted over; 10s when unset.
	TTL *metav1.Duration `json:"ttl,omitempty"`
}

// RateLimit is a token bucket per endpoint of the Service: RequestsPerSecond
// tokens a second, Burst at most; a request without a token is answered 429.
type RateLimit struct {
	// RequestsPerSecond is the refill rate.
	RequestsPerSecond int32 `json:"requestsPerSecond"`
	// Burst is the bucket size; RequestsPerSecond when unset.
	Burst *int32 `json:"burst,omitempty"`
}

// TrafficPolicyList is a list of TrafficPolicy.
type TrafficPolicyList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`

	Items []TrafficPolicy `json:"items"`
}
