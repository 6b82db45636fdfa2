// This file holds what a TrafficPolicy compiles to (ferryv1.ServicePolicy, checked
// by agent/state.go): the limits, outlier detection, faults, retry budget and rate
// limit the proxy enforces on requests and connections to one Service, across the
// node.

package proxy

import "time"

// Policy is a Service's TrafficPolicy as the proxy enforces it. The zero value
// enforces nothing.
type Policy struct {
	Name string // namespace/name of the TrafficPolicy
	// HashHeader is the header RingHash hashes (canonical form); "" the client's IP.
	HashHeader string
	// Connection pool limits per destination Service across the node; 0: none.
	// Past one, new work is answered 503 at once (circuit open).
	MaxConnections           int
	MaxPendingRequests       int
	MaxRequests              int
	MaxRequestsPerConnection int
	Outlier                  *OutlierDetection
	Fault                    *Fault
	RetryBudget              *RetryBudget
	RateLimit                *RateLimit
	// ConnectTimeout and IdleTimeout towards endpoints; 0: the proxy's defaults.
	ConnectTimeout time.Duration
	IdleTimeout    time.Duration
	// RequestTimeout and Retry apply to requests no route rule sets them for.
	RequestTimeout time.Duration
	Retry          *Retry
}

// OutlierDetection ejects an endpoint after consecutive errors for BaseEjection
// times the number of its ejections, keeping at most MaxEjectionPercent of the
// endpoints out.
type OutlierDetection struct {
	Consecutive5xx           int // 5xx or connection failures; 0: not counted
	ConsecutiveGatewayErrors int // 502, 503, 504 or connection failures; 0: not counted
	Interval                 time.Duration
	BaseEjection             time.Duration
	MaxEjectionPercent       int
}

// Fault aborts or delays a share of requests (percent 0 to 100).
type Fault struct {
	AbortPercent float64
	AbortStatus  int
	DelayPercent float64
	Delay        time.Duration
}

// RetryBudget caps retries in the last TTL at Percent of the requests in it, plus
// MinPerSecond.
type RetryBudget struct {
	Percent      float64
	MinPerSecond int
	TTL          time.Duration
}

// RateLimit is a token bucket per destination workload: PerSecond refill, Burst
// at most; a request without a token is answered 429.
type RateLimit struct {
	PerSecond int
	Burst     int
}
