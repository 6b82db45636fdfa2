package agent

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net/http"
	"net/netip"
	"os"
	"time"

	"github.com/ferrymesh/ferry/agent/proxy"
	"github.com/ferrymesh/ferry/api/ferryv1"
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

// workloads converts the state's workloads to the proxy's form, checking every
// field the data path relies on; a bad entry makes the whole state invalid rather
// than half-applied.
func workloads(st *ferryv1.NodeState) ([]proxy.Workload, error) {
	out := make([]proxy.Workload, 0, len(st.GetWorkloads()))
	seen := map[netip.Addr]string{}
	for i, w := range st.GetWorkloads() {
		name := w.GetNamespace() + "/" + w.GetName()
		if w.GetUid() == "" || w.GetName() == "" || w.GetNamespace() == "" || w.GetNode() == "" || w.GetIdentity() == "" {
			return nil, fmt.Errorf("workloads[%d] (%s): uid, name, namespace, node and identity are required", i, name)
		}
		pw := proxy.Workload{UID: w.GetUid(), Name: name, Identity: w.GetIdentity(), Node: w.GetNode()}
		for _, s := range w.GetIps() {
			ip, err := netip.ParseAddr(s)
			if err != nil {
				return nil, fmt.Errorf("workloads[%d] (%s): ip %q: %w", i, name, s, err)
			}
			ip = ip.Unmap()
			if other, dup := seen[ip]; dup {
				return nil, fmt.Errorf("workloads[%d] (%s): ip %s already belongs to %s", i, name, ip, other)
			}
			seen[ip] = name
			pw.IPs = append(pw.IPs, ip)
		}
		if len(pw.IPs) == 0 {
			return nil, fmt.Errorf("workloads[%d] (%s): no ip", i, name)
		}
		out = append(out, pw)
	}
	return out, nil
}

// services converts the state's Services to the proxy's form: cluster IPs, ports,
// and every backend with its readiness and pod ports. A malformed entry makes the
// whole state invalid, as for workloads.
func services(st *ferryv1.NodeState) ([]proxy.Service, error) {
	out := make([]proxy.Service, 0, len(st.GetServices()))
	for i, sv := range st.GetServices() {
		name := sv.GetNamespace() + "/" + sv.GetName()
		ps := proxy.Service{Name: name, LoadBalancer: proxy.LoadBalancer(sv.GetLoadBalancer())}
		if !ps.LoadBalancer.Known() {
			return nil, fmt.Errorf("services[%d] (%s): load balancer %q is not one this agent has", i, name, ps.LoadBalancer)
		}
		for _, text := range sv.GetClusterIps() {
			ip, err := netip.ParseAddr(text)
			if err != nil {
				return nil, fmt.Errorf("services[%d] (%s): cluster ip %q: %w", i, name, text, err)
			}
			ps.VIPs = append(ps.VIPs, ip.Unmap())
		}
		for j, p := range sv.GetPorts() {
			if p.GetPort() == 0 || p.GetPort() > 65535 {
				return nil, fmt.Errorf("services[%d] (%s): ports[%d]: port %d out of range", i, name, j, p.GetPort())
			}
			ps.Ports = append(ps.Ports, proxy.ServicePort{Port: uint16(p.GetPort()), Name: p.GetName(), AppProtocol: p.GetAppProtocol()})
		}
		for j, b := range sv.GetBackends() {
			pb := proxy.Backend{Ready: b.GetReady()}
			for _, text := range b.GetIps() {
				ip, err := netip.ParseAddr(text)
				if err != nil {
					return nil, fmt.Errorf("services[%d] (%s): backends[%d]: ip %q: %w", i, name, j, text, err)
				}
				pb.IPs = append(pb.IPs, ip.Unmap())
			}
			if len(b.GetPorts()) != len(ps.Ports) {
				return nil, fmt.Errorf("services[%d] (%s): backends[%d]: %d ports for the service's %d", i, name, j, len(b.GetPorts()), len(ps.Ports))
			}
			for _, port := range b.GetPorts() {
				if port > 65535 {
					return nil, fmt.Errorf("services[%d] (%s): backends[%d]: port %d out of range", i, name, j, port)
				}
				pb.Ports = append(pb.Ports, uint16(port))
			}
			ps.Backends = append(ps.Backends, pb)
		}
		if sv.GetPolicy() != nil {
			pol, err := servicePolicy(sv.GetPolicy())
			if err != nil {
				return nil, fmt.Errorf("services[%d] (%s): policy %q: %w", i, name, sv.GetPolicy().GetName(), err)
			}
			ps.Policy = pol
		}
		out = append(out, ps)
	}
	return out, nil
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
		if pol.Retry, err = policyRetry("retry", r); err != nil {
			return proxy.Policy{}, err
		}
	}
	return pol, nil
}

// policyRetry converts the retries of requests no route rule covers.
func policyRetry(field string, r *ferryv1.RouteRetry) (*proxy.Retry, error) {
	if r.GetAttempts() > maxRetryAttempts {
		return nil, fmt.Errorf("%s.attempts %d is over %d", field, r.GetAttempts(), maxRetryAttempts)
	}
	pr := &proxy.Retry{Attempts: int(r.GetAttempts())}
	for j, c := range r.GetCodes() {
		if c < 400 || c > 599 {
			return nil, fmt.Errorf("%s.codes[%d]: %d is not an error status (400 to 599)", field, j, c)
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
