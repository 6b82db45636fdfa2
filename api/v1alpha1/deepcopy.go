// Hand-written deep copies, which runtime.Object needs (informer caches hand out
// shared objects; callers copy before changing them). Keep them in step with
// types.go: a test fills every field and checks the copy shares no memory.

package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
)

func copySlice[T any](in []T) []T {
	if in == nil {
		return nil
	}
	return append(make([]T, 0, len(in)), in...)
}

func copyPtr[T any](in *T) *T {
	if in == nil {
		return nil
	}
	out := *in
	return &out
}

func copySelector(in *WorkloadSelector) *WorkloadSelector {
	if in == nil {
		return nil
	}
	out := &WorkloadSelector{}
	if in.MatchLabels != nil {
		out.MatchLabels = make(map[string]string, len(in.MatchLabels))
		for k, v := range in.MatchLabels {
			out.MatchLabels[k] = v
		}
	}
	return out
}

// DeepCopyInto copies in into out.
func (in *AuthorizationPolicySpec) DeepCopyInto(out *AuthorizationPolicySpec) {
	*out = *in
	out.Selector = copySelector(in.Selector)
	if in.Rules != nil {
		out.Rules = make([]AuthorizationRule, len(in.Rules))
		for i, r := range in.Rules {
			if r.From != nil {
				out.Rules[i].From = make([]Source, len(r.From))
				for j, s := range r.From {
					out.Rules[i].From[j] = Source{
						Identities: copySlice(s.Identities), NotIdentities: copySlice(s.NotIdentities),
						Namespaces: copySlice(s.Namespaces), NotNamespaces: copySlice(s.NotNamespaces),
						IPBlocks: copySlice(s.IPBlocks), NotIPBlocks: copySlice(s.NotIPBlocks),
					}
				}
			}
			if r.To != nil {
				out.Rules[i].To = make([]Operation, len(r.To))
				for j, o := range r.To {
					op := Operation{Ports: copySlice(o.Ports), NotPorts: copySlice(o.NotPorts), Methods: copySlice(o.Methods),
						Paths: copySlice(o.Paths), Hosts: copySlice(o.Hosts)}
					if o.Headers != nil {
						op.Headers = make([]HeaderMatch, len(o.Headers))
						for k, h := range o.Headers {
							op.Headers[k] = HeaderMatch{Name: h.Name, Values: copySlice(h.Values)}
						}
					}
					out.Rules[i].To[j] = op
				}
			}
		}
	}
}

// DeepCopyInto copies in into out.
func (in *AuthorizationPolicy) DeepCopyInto(out *AuthorizationPolicy) {
	out.TypeMeta = in.TypeMeta
	in.ObjectMeta.DeepCopyInto(&out.ObjectMeta)
	in.Spec.DeepCopyInto(&out.Spec)
}

// DeepCopy returns a copy of in that shares no memory with it.
func (in *AuthorizationPolicy) DeepCopy() *AuthorizationPolicy {
	if in == nil {
		return nil
	}
	out := &AuthorizationPolicy{}
	in.DeepCopyInto(out)
	return out
}

// DeepCopyObject implements runtime.Object.
func (in *AuthorizationPolicy) DeepCopyObject() runtime.Object { return in.DeepCopy() }

// DeepCopy returns a copy of in that shares no memory with it.
func (in *AuthorizationPolicyList) DeepCopy() *AuthorizationPolicyList {
	if in == nil {
		return nil
	}
	out := &AuthorizationPolicyList{TypeMeta: in.TypeMeta}
	in.ListMeta.DeepCopyInto(&out.ListMeta)
	if in.Items != nil {
		out.Items = make([]AuthorizationPolicy, len(in.Items))
		for i := range in.Items {
			in.Items[i].DeepCopyInto(&out.Items[i])
		}
	}
	return out
}

// DeepCopyObject implements runtime.Object.
func (in *AuthorizationPolicyList) DeepCopyObject() runtime.Object { return in.DeepCopy() }

// DeepCopyInto copies in into out.
func (in *PeerAuthentication) DeepCopyInto(out *PeerAuthentication) {
	out.TypeMeta = in.TypeMeta
	in.ObjectMeta.DeepCopyInto(&out.ObjectMeta)
	out.Spec = PeerAuthenticationSpec{Selector: copySelector(in.Spec.Selector), MTLS: in.Spec.MTLS}
	if in.Spec.PortLevelMTLS != nil {
		out.Spec.PortLevelMTLS = make(map[uint32]MutualTLS, len(in.Spec.PortLevelMTLS))
		for k, v := range in.Spec.PortLevelMTLS {
			out.Spec.PortLevelMTLS[k] = v
		}
	}
}

// DeepCopy returns a copy of in that shares no memory with it.
func (in *PeerAuthentication) DeepCopy() *PeerAuthentication {
	if in == nil {
		return nil
	}
	out := &PeerAuthentication{}
	in.DeepCopyInto(out)
	return out
}

// DeepCopyObject implements runtime.Object.
func (in *PeerAuthentication) DeepCopyObject() runtime.Object { return in.DeepCopy() }

// DeepCopy returns a copy of in that shares no memory with it.
func (in *PeerAuthenticationList) DeepCopy() *PeerAuthenticationList {
	if in == nil {
		return nil
	}
	out := &PeerAuthenticationList{TypeMeta: in.TypeMeta}
	in.ListMeta.DeepCopyInto(&out.ListMeta)
	if in.Items != nil {
		out.Items = make([]PeerAuthentication, len(in.Items))
		for i := range in.Items {
			in.Items[i].DeepCopyInto(&out.Items[i])
		}
	}
	return out
}

// DeepCopyObject implements runtime.Object.
func (in *PeerAuthenticationList) DeepCopyObject() runtime.Object { return in.DeepCopy() }

func copyDuration(in *metav1.Duration) *metav1.Duration { return copyPtr(in) }

// DeepCopyInto copies in into out.
func (in *TrafficPolicySpec) DeepCopyInto(out *TrafficPolicySpec) {
	*out = TrafficPolicySpec{
		TargetRefs:   copySlice(in.TargetRefs),
		LoadBalancer: copyPtr(in.LoadBalancer),
	}
	if t := in.Timeouts; t != nil {
		out.Timeouts = &Timeouts{Connect: copyDuration(t.Connect), Request: copyDuration(t.Request), Idle: copyDuration(t.Idle)}
	}
	if r := in.Retries; r != nil {
		out.Retries = &RetryPolicy{Attempts: r.Attempts, PerTryTimeout: copyDuration(r.PerTryTimeout), On: copySlice(r.On), Backoff: copyDuration(r.Backoff)}
	}
	if c := in.CircuitBreaker; c != nil {
		out.CircuitBreaker = &CircuitBreaker{
			MaxConnections:     copyPtr(c.MaxConnections),
			MaxPendingRequests: copyPtr(c.MaxPendingRequests),
			MaxRequests:        copyPtr(c.MaxRequests),
			MaxRetries:         copyPtr(c.MaxRetries),

			MaxRequestsPerConnection: copyPtr(c.MaxRequestsPerConnection),
		}
	}
	if o := in.OutlierDetection; o != nil {
		out.OutlierDetection = &OutlierDetection{
			ConsecutiveErrors: copyPtr(o.ConsecutiveErrors),

			ConsecutiveGatewayErrors: copyPtr(o.ConsecutiveGatewayErrors),
			Interval:                 copyDuration(o.Interval),
			BaseEjectionTime:         copyDuration(o.BaseEjectionTime),
			MaxEjectionPercent:       copyPtr(o.MaxEjectionPercent),
		}
	}
	if f := in.Fault; f != nil {
		out.Fault = &FaultInjection{Delay: copyPtr(f.Delay), Abort: copyPtr(f.Abort)}
	}
	if b := in.RetryBudget; b != nil {
		out.RetryBudget = &RetryBudget{Percent: b.Percent, MinRetriesPerSecond: copyPtr(b.MinRetriesPerSecond), TTL: copyDuration(b.TTL)}
	}
	if r := in.RateLimit; r != nil {
		out.RateLimit = &RateLimit{RequestsPerSecond: r.RequestsPerSecond, Burst: copyPtr(r.Burst)}
	}
}

// DeepCopyInto copies in into out.
func (in *TrafficPolicy) DeepCopyInto(out *TrafficPolicy) {
	out.TypeMeta = in.TypeMeta
	in.ObjectMeta.DeepCopyInto(&out.ObjectMeta)
	in.Spec.DeepCopyInto(&out.Spec)
}

// DeepCopy returns a copy of in that shares no memory with it.
func (in *TrafficPolicy) DeepCopy() *TrafficPolicy {
	if in == nil {
		return nil
	}
	out := &TrafficPolicy{}
	in.DeepCopyInto(out)
	return out
}

// DeepCopyObject implements runtime.Object.
func (in *TrafficPolicy) DeepCopyObject() runtime.Object { return in.DeepCopy() }

// DeepCopy returns a copy of in that shares no memory with it.
func (in *TrafficPolicyList) DeepCopy() *TrafficPolicyList {
	if in == nil {
		return nil
	}
	out := &TrafficPolicyList{TypeMeta: in.TypeMeta}
	in.ListMeta.DeepCopyInto(&out.ListMeta)
	if in.Items != nil {
		out.Items = make([]TrafficPolicy, len(in.Items))
		for i := range in.Items {
			in.Items[i].DeepCopyInto(&out.Items[i])
		}
	}
	return out
}

// DeepCopyObject implements runtime.Object.
func (in *TrafficPolicyList) DeepCopyObject() runtime.Object { return in.DeepCopy() }
