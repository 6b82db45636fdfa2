package operator_test

// TrafficPolicy against a real kube-apiserver: the operator starts on a cluster
// without Ferry's CRDs, picks them up once they are applied (deploy/crds), and
// streams each Service's load balancer as the policies say.

import (
	"context"
	"log/slog"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/api/v1alpha1"
	"github.com/ferrymesh/ferry/operator"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/dynamic"
)

func TestClusterModeTrafficPolicy(t *testing.T) {
	c := startCluster(t, "node1")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if _, err := c.CreateNamespace(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop", Labels: map[string]string{"ferry.io/mesh": "enabled"}}}); err != nil {
		t.Fatal(err)
	}
	c.pod(t, "shop", "web", "node1", "default", "10.102.1.10", map[string]string{"app": "web"})
	c.pod(t, "shop", "api", "node1", "default", "10.102.1.11", map[string]string{"app": "api"})
	for _, name := range []string{"web", "api"} {
		_, err := c.client.CoreV1().Services("shop").Create(ctx, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec:       corev1.ServiceSpec{Selector: map[string]string{"app": name}, Ports: []corev1.ServicePort{{Name: "http", Port: 80}}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
	}

	// No CRDs yet: the operator starts and serves the Services with defaults.
	kubeconfig := c.operatorKubeconfig(t)
	logs := &logBuffer{}
	sock := filepath.Join(t.TempDir(), "grpc.sock")
	op := startClusterOperator(t, ctx, operator.Config{
		Kubeconfig: kubeconfig, Namespace: systemNS, GRPCAddr: "unix://" + sock, Identity: "op1",
		AgentServiceAccount: operator.DefaultAgentSA, CertTTL: time.Hour, LeaderElect: true, CRDPollInterval: 200 * time.Millisecond,
	}, logs)
	waitFor(t, 30*time.Second, "operator ready", op.Ready)
	if len(logs.lines("TrafficPolicy not served by the API server")) != 1 {
		t.Errorf("the operator did not say the CRD is missing:\n%s", logs)
	}
	conn := dial(t, sock, c.bundleFile(t))
	stream := stateStream(t, bearer(ctx, c.token(t, systemNS, operator.DefaultAgentSA, "ferry-agent-node1", "ferry-operator")), conn, "node1")
	until := func(what string, want map[string]string) {
		t.Helper()
		untilLoadBalancers(t, stream, "node1", what, want)
	}
	until("no CRD", map[string]string{"web": "", "api": ""})

	// The CRDs as a user applies them; the operator finds them on its own.
	if out, err := exec.CommandContext(ctx, c.Kubectl, "--kubeconfig", c.Kubeconfig, "apply", "--server-side", "-f", "../deploy/crds/").CombinedOutput(); err != nil {
		t.Fatalf("kubectl apply -f deploy/crds: %v\n%s", err, out)
	}
	if out, err := exec.CommandContext(ctx, c.Kubectl, "--kubeconfig", c.Kubeconfig, "wait", "--for=condition=Established", "--timeout=60s", "crd/trafficpolicies.ferry.io").CombinedOutput(); err != nil {
		t.Fatalf("kubectl wait: %v\n%s", err, out)
	}
	waitFor(t, 30*time.Second, "the operator to watch TrafficPolicies", func() bool {
		return len(logs.lines("TrafficPolicy served by the API server; watching it")) == 1
	})
	dyn, err := dynamic.NewForConfig(c.RestConfig)
	if err != nil {
		t.Fatal(err)
	}
	policies := dyn.Resource(v1alpha1.GroupVersion().WithResource("trafficpolicies")).Namespace("shop")
	create := func(tp *v1alpha1.TrafficPolicy) {
		t.Helper()
		m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(tp)
		if err != nil {
			t.Fatal(err)
		}
		// Discovery of a new CRD may lag its Established condition by a moment.
		err = wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
			_, err := policies.Create(ctx, &unstructured.Unstructured{Object: m}, metav1.CreateOptions{FieldValidation: "Strict"})
			return !apierrors.IsNotFound(err), err
		})
		if err != nil {
			t.Fatalf("create TrafficPolicy %s: %v", tp.Name, err)
		}
	}
	create(trafficPolicy("web-lb", v1alpha1.LoadBalancerRoundRobin, "web"))
	until("web-lb created", map[string]string{"web": "RoundRobin", "api": ""})

	// A newer policy on web and api: it gets api, web stays with the older one.
	// creationTimestamp counts whole seconds; start the next one so the names,
	// which sort the other way, do not decide.
	time.Sleep(time.Until(time.Now().Truncate(time.Second).Add(time.Second)))
	create(trafficPolicy("aa-newer", v1alpha1.LoadBalancerRandom, "web", "api"))
	until("aa-newer created", map[string]string{"web": "RoundRobin", "api": "Random"})
	waitFor(t, 10*time.Second, "the conflict logged", func() bool {
		return len(logs.lines("level=WARN", "policy=shop/aa-newer", "service=shop/web", "applied=shop/web-lb")) == 1
	})

	// A replica started now has the policies in its first snapshot.
	op2 := startClusterOperator(t, ctx, operator.Config{
		Kubeconfig: kubeconfig, Namespace: systemNS, GRPCAddr: "unix://" + filepath.Join(t.TempDir(), "grpc.sock"), Identity: "op2",
		AgentServiceAccount: operator.DefaultAgentSA, CertTTL: time.Hour, LeaderElect: true,
	}, &logBuffer{})
	waitFor(t, 30*time.Second, "second replica's first snapshot", func() bool { s, _ := op2.View().Current(); return s != nil })
	first, _ := op2.View().Current()
	got := map[string]string{}
	for _, s := range first.Services {
		got[s.Name] = s.LoadBalancer
	}
	if want := map[string]string{"web": "RoundRobin", "api": "Random"}; !maps.Equal(got, want) {
		t.Errorf("second replica's first snapshot: load balancers %v, want %v", got, want)
	}

	// A hash header without RingHash passes the CRD's schema but not the
	// operator's checks: web-lb's generation 2 is rejected whole, and its
	// generation 1 stays in force.
	u, err := policies.Get(ctx, "web-lb", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := unstructured.SetNestedField(u.Object, "x-user", "spec", "loadBalancer", "hashHeader"); err != nil {
		t.Fatal(err)
	}
	if _, err := policies.Update(ctx, u, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the rejection logged", func() bool {
		return len(logs.lines("level=ERROR", "traffic policy rejected; its last good generation stays in force", "policy=shop/web-lb",
			"field=spec.loadBalancer.hashHeader", "value=x-user", "in_force_generation=1")) == 1
	})
	until("web-lb's generation 2 rejected", map[string]string{"web": "RoundRobin", "api": "Random"})
	if err := policies.Delete(ctx, "aa-newer", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	until("aa-newer deleted", map[string]string{"web": "RoundRobin", "api": ""})
}

func trafficPolicy(name string, lb v1alpha1.LoadBalancerType, services ...string) *v1alpha1.TrafficPolicy {
	tp := &v1alpha1.TrafficPolicy{
		TypeMeta:   metav1.TypeMeta{APIVersion: v1alpha1.GroupVersion().String(), Kind: "TrafficPolicy"},
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "shop"},
		Spec:       v1alpha1.TrafficPolicySpec{LoadBalancer: &v1alpha1.LoadBalancer{Type: lb}},
	}
	for _, s := range services {
		tp.Spec.TargetRefs = append(tp.Spec.TargetRefs, v1alpha1.PolicyTargetReference{Kind: "Service", Name: s})
	}
	return tp
}

// startClusterOperator runs an operator in this process until the test ends,
// logging to logs (and to stderr when the test fails).
func startClusterOperator(t *testing.T, ctx context.Context, cfg operator.Config, logs *logBuffer) *operator.Operator {
	t.Helper()
	op, err := operator.New(cfg, slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelInfo})))
	if err != nil {
		t.Fatal(err)
	}
	if err := op.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		op.Stop(context.Background())
		if t.Failed() {
			os.Stderr.WriteString("log of operator " + cfg.Identity + ":\n" + logs.String())
		}
	})
	return op
}

// logBuffer collects an operator's log lines from its goroutines.
type logBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// lines are the logged lines that contain all of parts.
func (l *logBuffer) lines(parts ...string) []string {
	var out []string
	for _, line := range strings.Split(l.String(), "\n") {
		if line != "" && !slices.ContainsFunc(parts, func(p string) bool { return !strings.Contains(line, p) }) {
			out = append(out, line)
		}
	}
	return out
}
