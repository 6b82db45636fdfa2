package deploy_test

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/api/v1alpha1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Objects of Ferry's CRDs with every field set to a valid value, to check the
// schemas against the Go types.

func typeMeta(kind string) metav1.TypeMeta {
	return metav1.TypeMeta{APIVersion: v1alpha1.GroupVersion().String(), Kind: kind}
}

func fullAuthorizationPolicy() *v1alpha1.AuthorizationPolicy {
	return &v1alpha1.AuthorizationPolicy{
		TypeMeta:   typeMeta("AuthorizationPolicy"),
		ObjectMeta: metav1.ObjectMeta{Name: "cart-readers", Namespace: "shop"},
		Spec: v1alpha1.AuthorizationPolicySpec{
			Selector: &v1alpha1.WorkloadSelector{MatchLabels: map[string]string{"app": "cart"}},
			Action:   v1alpha1.ActionAllow,
			Rules: []v1alpha1.AuthorizationRule{{
				From: []v1alpha1.Source{{
					Identities:    []string{"spiffe://cluster.local/ns/shop/sa/frontend"},
					NotIdentities: []string{"*/sa/batch"},
					Namespaces:    []string{"shop"},
					NotNamespaces: []string{"test"},
					IPBlocks:      []string{"10.0.0.0/8"},
					NotIPBlocks:   []string{"10.9.0.0/16"},
				}},
				To: []v1alpha1.Operation{{
					Ports:    []int32{8080},
					NotPorts: []int32{9090},
					Methods:  []string{"GET"},
					Paths:    []string{"/cart/*"},
					Hosts:    []string{"*.shop.svc.cluster.local"},
					Headers:  []v1alpha1.HeaderMatch{{Name: "x-tenant", Values: []string{"a", "b"}}},
				}},
			}},
		},
	}
}

func fullPeerAuthentication() *v1alpha1.PeerAuthentication {
	return &v1alpha1.PeerAuthentication{
		TypeMeta:   typeMeta("PeerAuthentication"),
		ObjectMeta: metav1.ObjectMeta{Name: "strict", Namespace: "shop"},
		Spec: v1alpha1.PeerAuthenticationSpec{
			Selector:      &v1alpha1.WorkloadSelector{MatchLabels: map[string]string{"app": "cart"}},
			MTLS:          v1alpha1.MutualTLS{Mode: v1alpha1.MTLSStrict},
			PortLevelMTLS: map[uint32]v1alpha1.MutualTLS{9100: {Mode: v1alpha1.MTLSPermissive}},
		},
	}
}

func fullTrafficPolicy() *v1alpha1.TrafficPolicy {
	d := func(s string) *metav1.Duration {
		v, err := time.ParseDuration(s)
		if err != nil {
			panic(err)
		}
		return &metav1.Duration{Duration: v}
	}
	n := func(v int32) *int32 { return &v }
	return &v1alpha1.TrafficPolicy{
		TypeMeta:   typeMeta("TrafficPolicy"),
		ObjectMeta: metav1.ObjectMeta{Name: "cart", Namespace: "shop"},
		Spec: v1alpha1.TrafficPolicySpec{
			TargetRefs:   []v1alpha1.PolicyTargetReference{{Group: "", Kind: "Service", Name: "cart"}},
			LoadBalancer: &v1alpha1.LoadBalancer{Type: v1alpha1.LoadBalancerRingHash, HashHeader: "x-user"},
			Timeouts:     &v1alpha1.Timeouts{Connect: d("250ms"), Request: d("5s"), Idle: d("1h30m")},
			Retries: &v1alpha1.RetryPolicy{
				Attempts: 3, PerTryTimeout: d("1s"), On: []string{"connect-failure", "5xx"}, Backoff: d("25ms"),
			},
			CircuitBreaker: &v1alpha1.CircuitBreaker{
				MaxConnections: n(1000), MaxPendingRequests: n(100), MaxRequests: n(1000), MaxRequestsPerConnection: n(100), MaxRetries: n(3),
			},
			OutlierDetection: &v1alpha1.OutlierDetection{
				ConsecutiveErrors: n(5), ConsecutiveGatewayErrors: n(3), Interval: d("10s"), BaseEjectionTime: d("30s"), MaxEjectionPercent: n(50),
			},
			Fault: &v1alpha1.FaultInjection{
				Delay: &v1alpha1.FaultDelay{Percent: 10, Duration: *d("100ms")},
				Abort: &v1alpha1.FaultAbort{Percent: 1, HTTPStatus: 503},
			},
			RetryBudget: &v1alpha1.RetryBudget{Percent: 20, MinRetriesPerSecond: n(10), TTL: d("10s")},
			RateLimit:   &v1alpha1.RateLimit{RequestsPerSecond: 100, Burst: n(200)},
		},
	}
}

func equalJSON(t *testing.T, a, b any) bool {
	t.Helper()
	ja, err := json.Marshal(a)
	if err != nil {
		t.Fatal(err)
	}
	jb, err := json.Marshal(b)
	if err != nil {
		t.Fatal(err)
	}
	return string(ja) == string(jb)
}
