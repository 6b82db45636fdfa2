package mesh

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/api/ferryv1"
	"github.com/ferrymesh/ferry/api/v1alpha1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
)

// logBuffer collects the view's log lines as a user reads them.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// lines returns the lines logged so far that contain every one of parts.
func (b *logBuffer) lines(parts ...string) []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []string
	for _, l := range strings.Split(b.buf.String(), "\n") {
		ok := l != ""
		for _, p := range parts {
			ok = ok && strings.Contains(l, p)
		}
		if ok {
			out = append(out, l)
		}
	}
	return out
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// shop is an enrolled namespace with pods web-1 and api-1 and Services web and api.
func shop() []runtime.Object {
	pod := func(name, app string) *corev1.Pod {
		return &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "shop", UID: types.UID("uid-" + name), Labels: map[string]string{"app": app}},
			Spec:       corev1.PodSpec{NodeName: "node1"},
			Status:     corev1.PodStatus{Phase: corev1.PodRunning, PodIP: map[string]string{"web": "10.1.1.10", "api": "10.1.1.11"}[app]},
		}
	}
	svc := func(name string) *corev1.Service {
		return &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "shop"},
			Spec:       corev1.ServiceSpec{Selector: map[string]string{"app": name}, Ports: []corev1.ServicePort{{Name: "http", Port: 80}}},
		}
	}
	return []runtime.Object{
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop", Labels: map[string]string{v1alpha1.MeshLabel: v1alpha1.MeshEnabled}}},
		pod("web-1", "web"), pod("api-1", "api"), svc("web"), svc("api"),
	}
}

var epoch = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

// policy is a TrafficPolicy created at epoch plus created that targets services with lb.
func policy(name string, created time.Duration, lb v1alpha1.LoadBalancerType, services ...string) *v1alpha1.TrafficPolicy {
	tp := &v1alpha1.TrafficPolicy{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "shop", CreationTimestamp: metav1.NewTime(epoch.Add(created))}}
	for _, s := range services {
		tp.Spec.TargetRefs = append(tp.Spec.TargetRefs, v1alpha1.PolicyTargetReference{Kind: "Service", Name: s})
	}
	if lb != "" {
		tp.Spec.LoadBalancer = &v1alpha1.LoadBalancer{Type: lb}
	}
	return tp
}

// balancers is each Service's load balancer in the current snapshot.
func balancers(t *testing.T, v *View) map[string]string {
	t.Helper()
	s, _ := v.Current()
	if s == nil {
		t.Fatal("no snapshot")
	}
	out := map[string]string{}
	for _, svc := range s.Services {
		out[svc.Namespace+"/"+svc.Name] = svc.LoadBalancer
	}
	return out
}

func newLog() (*logBuffer, *slog.Logger) {
	b := &logBuffer{}
	return b, slog.New(slog.NewTextHandler(b, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

func TestTrafficPolicyLoadBalancer(t *testing.T) {
	for _, lb := range []v1alpha1.LoadBalancerType{v1alpha1.LoadBalancerRoundRobin, v1alpha1.LoadBalancerRandom, v1alpha1.LoadBalancerLeastRequest, v1alpha1.LoadBalancerP2CEWMA} {
		t.Run(string(lb), func(t *testing.T) {
			logs, log := newLog()
			v := startViewLog(t, log, append(shop(), policy("web-lb", 0, lb, "web"))...)
			v.rebuild()
			got := balancers(t, v.View)
			if got["shop/web"] != string(lb) || got["shop/api"] != "" {
				t.Fatalf("load balancers %v; want web %s, api the default", got, lb)
			}
			if len(logs.lines("traffic policy applied", "policy=shop/web-lb", "service=shop/web", "load_balancer="+string(lb))) != 1 {
				t.Fatalf("log does not say the policy applies:\n%s", logs)
			}
		})
	}
}

func TestTrafficPolicyWithoutLoadBalancer(t *testing.T) {
	// A policy that sets only other fields leaves the default, and a policy
	// naming a Service twice or several Services sets each once.
	noLB := policy("timeouts", 0, "", "web")
	both := policy("both", time.Second, v1alpha1.LoadBalancerRandom, "api", "api")
	v := startView(t, append(shop(), noLB, both)...)
	v.rebuild()
	if got := balancers(t, v); got["shop/web"] != "" || got["shop/api"] != "Random" {
		t.Fatalf("load balancers %v; want web default, api Random", got)
	}
}

func TestTrafficPolicyConflict(t *testing.T) {
	logs, log := newLog()
	older := policy("zz-older", 0, v1alpha1.LoadBalancerRandom, "web")
	newer := policy("aa-newer", time.Minute, v1alpha1.LoadBalancerLeastRequest, "web", "api")
	// Same creation time: the name decides.
	tieA := policy("tie-a", time.Hour, v1alpha1.LoadBalancerRoundRobin, "api2")
	tieB := policy("tie-b", time.Hour, v1alpha1.LoadBalancerRandom, "api2")
	objs := append(shop(), older, newer, tieA, tieB, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "api2", Namespace: "shop"},
		Spec:       corev1.ServiceSpec{Selector: map[string]string{"app": "api"}, Ports: []corev1.ServicePort{{Port: 81}}},
	})
	v := startViewLog(t, log, objs...)
	v.rebuild()
	got := balancers(t, v.View)
	// The newer policy still applies where it has no rival.
	if got["shop/web"] != "Random" || got["shop/api"] != "LeastRequest" || got["shop/api2"] != "RoundRobin" {
		t.Fatalf("load balancers %v; want web Random (oldest), api LeastRequest (alone), api2 RoundRobin (tie-a by name)", got)
	}
	if len(logs.lines("level=WARN", "policy=shop/aa-newer", "service=shop/web", "applied=shop/zz-older")) != 1 {
		t.Errorf("no warning naming the newer policy on web:\n%s", logs)
	}
	if len(logs.lines("level=WARN", "policy=shop/tie-b", "service=shop/api2", "applied=shop/tie-a")) != 1 {
		t.Errorf("no warning naming tie-b on api2:\n%s", logs)
	}
	if n := len(logs.lines("level=WARN")); n != 2 {
		t.Errorf("%d warnings, want 2:\n%s", n, logs)
	}
	// Another rebuild (a pod event) says nothing new.
	before := logs.String()
	v.rebuild()
	if logs.String() != before {
		t.Errorf("a rebuild with the same policies logged again:\n%s", strings.TrimPrefix(logs.String(), before))
	}
}

func TestTrafficPolicyRejected(t *testing.T) {
	logs, log := newLog()
	ring := policy("ring", 0, "Maglev", "web", "api")
	// An older policy that is rejected does not shadow a newer good one.
	good := policy("good", time.Minute, v1alpha1.LoadBalancerRoundRobin, "api")
	// A bad target rejects the whole policy, its good target too.
	badRef := policy("bad-ref", time.Hour, v1alpha1.LoadBalancerRandom, "web")
	badRef.Spec.TargetRefs = append(badRef.Spec.TargetRefs, v1alpha1.PolicyTargetReference{Group: "apps", Kind: "Deployment", Name: "web"})
	v := startViewLog(t, log, append(shop(), ring, good, badRef)...)
	v.rebuild()
	got := balancers(t, v.View)
	if got["shop/web"] != "" || got["shop/api"] != "RoundRobin" {
		t.Fatalf("load balancers %v; want web default (both its policies rejected), api RoundRobin", got)
	}
	if len(logs.lines("level=ERROR", "traffic policy rejected", "policy=shop/ring", "field=spec.loadBalancer.type", "value=Maglev", "not implemented by the proxy")) != 1 {
		t.Errorf("no error naming policy ring and its field:\n%s", logs)
	}
	if len(logs.lines("level=ERROR", "policy=shop/bad-ref", "field=spec.targetRefs[1].group", "value=apps")) != 1 {
		t.Errorf("no error naming policy bad-ref and its field:\n%s", logs)
	}
	if len(logs.lines("policy=shop/ring", "applied")) != 0 || len(logs.lines("policy=shop/bad-ref", "applied")) != 0 {
		t.Errorf("a rejected policy is said to apply:\n%s", logs)
	}
}

// Policies are watched: creating, changing and deleting one changes the snapshot
// the agents get, with no other event.
func TestTrafficPolicyWatched(t *testing.T) {
	v := startViewLog(t, slog.New(slog.DiscardHandler), shop()...)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go v.Run(ctx)
	res := v.policies.Resource(TrafficPolicyResource()).Namespace("shop")
	wait := func(what, want string) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			if s, _ := v.Current(); s != nil && balancers(t, v.View)["shop/web"] == want {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: web's load balancer is %q, want %q", what, balancers(t, v.View)["shop/web"], want)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	wait("no policy", "")
	created, err := res.Create(ctx, unstructuredPolicy(t, policy("web-lb", 0, v1alpha1.LoadBalancerRoundRobin, "web")), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	wait("policy created", "RoundRobin")
	update := func(lb string) {
		t.Helper()
		if err := unstructured.SetNestedField(created.Object, lb, "spec", "loadBalancer", "type"); err != nil {
			t.Fatal(err)
		}
		if created, err = res.Update(ctx, created, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	update("LeastRequest")
	wait("policy changed", "LeastRequest")
	// Changed to a type the proxy lacks: rejected whole, the last good
	// generation stays in force.
	update("Maglev")
	time.Sleep(100 * time.Millisecond)
	wait("policy changed to Maglev", "LeastRequest")
	update("Random")
	wait("policy fixed", "Random")
	if err := res.Delete(ctx, "web-lb", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	wait("policy deleted", "")
}

func TestTrafficPolicyCompiled(t *testing.T) {
	v := routeView(t, `
apiVersion: ferry.io/v1alpha1
kind: TrafficPolicy
metadata: {name: web-policy, namespace: shop, generation: 2}
spec:
  targetRefs: [{kind: Service, name: web}]
  loadBalancer: {type: RingHash, hashHeader: x-user}
  timeouts: {connect: 1s, request: 3s, idle: 1m}
  retries: {attempts: 2, "on": [gateway-error, retriable-4xx], backoff: 30ms}
  circuitBreaker: {maxConnections: 100, maxPendingRequests: 10, maxRequests: 50, maxRequestsPerConnection: 20}
  outlierDetection: {consecutiveErrors: 5, consecutiveGatewayErrors: 3, interval: 1s, baseEjectionTime: 30s, maxEjectionPercent: 50}
  fault:
    abort: {percent: 10, httpStatus: 503}
    delay: {percent: 50, duration: 100ms}
  retryBudget: {percent: 20, minRetriesPerSecond: 10}
  rateLimit: {requestsPerSecond: 100}
`)
	web := service(t, v.View, "shop/web")
	if web.LoadBalancer != "RingHash" {
		t.Errorf("load balancer %q, want RingHash", web.LoadBalancer)
	}
	wantProto(t, "web's policy", web.Policy, &ferryv1.ServicePolicy{
		Name: "shop/web-policy", HashHeader: "x-user",
		MaxConnections: 100, MaxPendingRequests: 10, MaxRequests: 50, MaxRequestsPerConnection: 20,
		OutlierDetection: &ferryv1.OutlierDetection{Consecutive_5Xx: 5, ConsecutiveGatewayErrors: 3, IntervalMs: 1000, BaseEjectionMs: 30000, MaxEjectionPercent: 50},
		Fault:            &ferryv1.Fault{AbortPercent: 10, AbortStatus: 503, DelayPercent: 50, DelayMs: 100},
		RetryBudget:      &ferryv1.RetryBudget{Percent: 20, MinRetriesPerSecond: 10, TtlMs: 10000},
		RateLimit:        &ferryv1.RateLimit{RequestsPerSecond: 100, Burst: 100},
		ConnectTimeoutMs: 1000, IdleTimeoutMs: 60000, RequestTimeoutMs: 3000,
		Retry: &ferryv1.RouteRetry{Attempts: 2, Codes: []uint32{409, 502, 503, 504}, BackoffMs: 30},
	})
	if service(t, v.View, "shop/api").Policy != nil {
		t.Error("api has a policy")
	}
	wantProto(t, "status", configStatus(t, v.View, "TrafficPolicy shop/web-policy"), &ferryv1.ConfigStatus{
		Kind: "TrafficPolicy", Name: "shop/web-policy", Generation: 2, Targets: []string{"shop/web"},
		Conditions: []*ferryv1.Condition{{Type: "Accepted", Status: true, Reason: "Accepted", Message: "applied to shop/web"}},
	})
}

func TestTrafficPolicyValues(t *testing.T) {
	for _, tc := range []struct{ spec, field string }{
		{"fault: {abort: {percent: 101, httpStatus: 503}}", "spec.fault.abort.percent"},
		{"fault: {abort: {percent: 10, httpStatus: 600}}", "spec.fault.abort.httpStatus"},
		{"fault: {delay: {percent: -1, duration: 1s}}", "spec.fault.delay.percent"},
		{"retries: {attempts: -1}", "spec.retries.attempts"},
		{"retries: {attempts: 1, perTryTimeout: 1s}", "spec.retries.perTryTimeout"},
		{`retries: {attempts: 1, "on": [sometimes]}`, "spec.retries.on[0]"},
		{"circuitBreaker: {maxPendingRequests: -5}", "spec.circuitBreaker.maxPendingRequests"},
		{"circuitBreaker: {maxRetries: 3}", "spec.circuitBreaker.maxRetries"},
		{"outlierDetection: {consecutiveErrors: 5, maxEjectionPercent: 150}", "spec.outlierDetection.maxEjectionPercent"},
		{"retryBudget: {percent: 120}", "spec.retryBudget.percent"},
		{"retryBudget: {percent: 20, ttl: 0s}", "spec.retryBudget.ttl"},
		{"rateLimit: {requestsPerSecond: 0}", "spec.rateLimit.requestsPerSecond"},
		{"rateLimit: {requestsPerSecond: 10, burst: 0}", "spec.rateLimit.burst"},
		{"loadBalancer: {type: Random, hashHeader: x-user}", "spec.loadBalancer.hashHeader"},
		{"timeouts: {connect: -1s}", "spec.timeouts.connect"},
		{"timeouts: {idle: 25h}", "spec.timeouts.idle"},
		{"outlierDetection: {interval: 1s}", "spec.outlierDetection"},
		{"fault: {delay: {percent: 10, duration: 0s}}", "spec.fault.delay.duration"},
		{"loadBalancer: {type: RingHash, hashHeader: \"x y\"}", "spec.loadBalancer.hashHeader"},
	} {
		t.Run(tc.field, func(t *testing.T) {
			logs, log := newLog()
			v := startViewLog(t, log, append(routeMesh(), fromYAML(t, `
apiVersion: ferry.io/v1alpha1
kind: TrafficPolicy
metadata: {name: bad, namespace: shop}
spec:
  targetRefs: [{kind: Service, name: web}]
  `+tc.spec)...)...)
			v.rebuild()
			if p := service(t, v.View, "shop/web").Policy; p != nil {
				t.Fatalf("a rejected policy applies: %v", p)
			}
			c := condition(configStatus(t, v.View, "TrafficPolicy shop/bad"), "Accepted")
			if c.Status || c.Reason != "Invalid" || !strings.HasPrefix(c.Message, tc.field+": ") {
				t.Fatalf("condition %v; want Invalid naming %s", c, tc.field)
			}
			if len(logs.lines("level=ERROR", "policy=shop/bad", "field="+tc.field)) != 1 {
				t.Fatalf("no log line naming the field:\n%s", logs)
			}
		})
	}
}

// A rejected generation of a policy leaves the last good one in force, in
// conflicts too.
func TestTrafficPolicyLastGoodKept(t *testing.T) {
	logs, log := newLog()
	doc := func(gen, lb string) *unstructured.Unstructured {
		return fromYAML(t, `
apiVersion: ferry.io/v1alpha1
kind: TrafficPolicy
metadata: {name: web-lb, namespace: shop, generation: `+gen+`, creationTimestamp: "2026-01-01T00:00:00Z", annotations: {local.ferry.io/file: policies.yaml}}
spec:
  targetRefs: [{kind: Service, name: web}]
  loadBalancer: {type: `+lb+`}
`)[0].(*unstructured.Unstructured)
	}
	newer := policy("newer", 24*time.Hour, v1alpha1.LoadBalancerRandom, "web")
	v := startViewLog(t, log, append(routeMesh(), doc("1", "RoundRobin"), newer)...)
	v.rebuild()
	if lb := service(t, v.View, "shop/web").LoadBalancer; lb != "RoundRobin" {
		t.Fatalf("load balancer %q, want RoundRobin", lb)
	}
	if _, err := v.policies.Resource(TrafficPolicyResource()).Namespace("shop").Update(context.Background(), doc("2", "Maglev"), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "generation 2 seen", func() bool {
		v.rebuild()
		return configStatus(t, v.View, "TrafficPolicy shop/web-lb").Generation == 2
	})
	if lb := service(t, v.View, "shop/web").LoadBalancer; lb != "RoundRobin" {
		t.Fatalf("load balancer %q after a bad generation, want RoundRobin (generation 1, still older than policy newer)", lb)
	}
	cs := configStatus(t, v.View, "TrafficPolicy shop/web-lb")
	if c := condition(cs, "Accepted"); cs.InForceGeneration != 1 || c.Status || c.Reason != "Invalid" || cs.File != "policies.yaml" ||
		!strings.Contains(c.Message, `spec.loadBalancer.type: "Maglev": not implemented`) {
		t.Fatalf("status %v", cs)
	}
	if c := condition(configStatus(t, v.View, "TrafficPolicy shop/newer"), "Accepted"); c.Status || c.Reason != "Conflicted" {
		t.Fatalf("newer's condition %v; want Conflicted", c)
	}
	if len(logs.lines("level=ERROR", "last good generation stays in force", "policy=shop/web-lb", "file=policies.yaml", "field=spec.loadBalancer.type", "in_force_generation=1")) != 1 {
		t.Fatalf("no log line:\n%s", logs)
	}
}
