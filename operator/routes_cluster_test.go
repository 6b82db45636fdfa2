package operator_test

// Routes against a real kube-apiserver: Gateway API's CRDs from deploy/ applied
// after the operator started, an HTTPRoute on a Service compiled into every
// agent's NodeState, and its status written back as Gateway API asks.

import (
	"context"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/api/ferryv1"
	"github.com/ferrymesh/ferry/operator"
	"github.com/ferrymesh/ferry/operator/mesh"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/dynamic"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
	"sigs.k8s.io/yaml"
)

const clusterRoute = `
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: web, port: 80, weight: 90}, {name: api, port: 80, weight: 10}]
    timeouts: {request: 500ms}
    retry: {attempts: 2, codes: [503]}
`

func TestClusterModeRoutes(t *testing.T) {
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
	logs := &logBuffer{}
	sock := filepath.Join(t.TempDir(), "grpc.sock")
	op := startClusterOperator(t, ctx, operator.Config{
		Kubeconfig: c.operatorKubeconfig(t), Namespace: systemNS, GRPCAddr: "unix://" + sock, Identity: "op1",
		AgentServiceAccount: operator.DefaultAgentSA, CertTTL: time.Hour, LeaderElect: true, CRDPollInterval: 200 * time.Millisecond,
	}, logs)
	waitFor(t, 30*time.Second, "operator ready", op.Ready)
	if len(logs.lines("HTTPRoute and GRPCRoute not served by the API server")) != 1 {
		t.Errorf("the operator did not say the route CRDs are missing:\n%s", logs)
	}

	// Gateway API's CRDs as deploy/ installs them (server-side: they are too
	// large for client-side apply).
	if out, err := exec.CommandContext(ctx, c.Kubectl, "--kubeconfig", c.Kubeconfig, "apply", "--server-side", "-f", "../deploy/gateway-api/").CombinedOutput(); err != nil {
		t.Fatalf("kubectl apply -f deploy/gateway-api: %v\n%s", err, out)
	}
	if out, err := exec.CommandContext(ctx, c.Kubectl, "--kubeconfig", c.Kubeconfig, "wait", "--for=condition=Established", "--timeout=60s",
		"crd/httproutes.gateway.networking.k8s.io", "crd/grpcroutes.gateway.networking.k8s.io", "crd/referencegrants.gateway.networking.k8s.io").CombinedOutput(); err != nil {
		t.Fatalf("kubectl wait: %v\n%s", err, out)
	}
	waitFor(t, 30*time.Second, "the operator to watch routes", func() bool {
		return len(logs.lines("HTTPRoute and GRPCRoute served by the API server; watching it")) == 1
	})

	dyn, err := dynamic.NewForConfig(c.RestConfig)
	if err != nil {
		t.Fatal(err)
	}
	routes := dyn.Resource(mesh.HTTPRouteResource()).Namespace("shop")
	route := &unstructured.Unstructured{}
	if err := yaml.Unmarshal([]byte(clusterRoute), &route.Object); err != nil {
		t.Fatal(err)
	}
	err = wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
		_, err := routes.Create(ctx, route, metav1.CreateOptions{FieldValidation: "Strict"})
		return !apierrors.IsNotFound(err), err
	})
	if err != nil {
		t.Fatalf("create HTTPRoute: %v", err)
	}

	conn := dial(t, sock, c.bundleFile(t))
	stream := stateStream(t, bearer(ctx, c.token(t, systemNS, operator.DefaultAgentSA, "ferry-agent-node1", "ferry-operator")), conn, "node1")
	st := untilRoutes(t, stream, "node1", "route created", []uint32{90, 10})
	for _, s := range st.Services {
		if s.Name != "web" {
			continue
		}
		rule := s.RouteTables[0].Rules[0]
		if m := s.RouteTables[0].Matches[0]; m.Path.GetValue() != "/api" || rule.RequestTimeoutMs != 500 || rule.Retry.GetAttempts() != 2 ||
			!slices.Equal(rule.Retry.GetCodes(), []uint32{503}) || rule.Route != "HTTPRoute shop/split" {
			t.Fatalf("web's table: %v", s.RouteTables[0])
		}
	}

	// The status Gateway API asks for, from the controller ferry.io/mesh.
	status := func(what string, generation int64, accepted, resolved string) *unstructured.Unstructured {
		t.Helper()
		var u *unstructured.Unstructured
		var got []metav1.Condition
		waitFor(t, 30*time.Second, what, func() bool {
			u, err = routes.Get(ctx, "split", metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			var rs gatewayv1.RouteStatus
			if m, ok := u.Object["status"].(map[string]any); ok {
				if err := runtime.DefaultUnstructuredConverter.FromUnstructured(m, &rs); err != nil {
					t.Fatal(err)
				}
			}
			if len(rs.Parents) != 1 || rs.Parents[0].ControllerName != mesh.ControllerName || rs.Parents[0].ParentRef.Name != "web" {
				return false
			}
			got = rs.Parents[0].Conditions
			return slices.ContainsFunc(got, func(c metav1.Condition) bool {
				return c.Type == "Accepted" && c.Reason == accepted && c.ObservedGeneration == generation
			}) && slices.ContainsFunc(got, func(c metav1.Condition) bool {
				return c.Type == "ResolvedRefs" && c.Reason == resolved && c.ObservedGeneration == generation
			})
		})
		t.Logf("%s: %+v", what, got)
		return u
	}
	u := status("route accepted", 1, "Accepted", "ResolvedRefs")

	// A backend that does not exist: generation 2 is rejected, its status says
	// why, and agents keep generation 1.
	rules, _, _ := unstructured.NestedSlice(u.Object, "spec", "rules")
	rules[0].(map[string]any)["backendRefs"] = []any{
		map[string]any{"name": "web", "port": int64(80), "weight": int64(90)},
		map[string]any{"name": "nope", "port": int64(80), "weight": int64(10)},
	}
	if err := unstructured.SetNestedSlice(u.Object, rules, "spec", "rules"); err != nil {
		t.Fatal(err)
	}
	if _, err := routes.Update(ctx, u, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	u = status("bad backend rejected", 2, "BackendNotFound", "BackendNotFound")
	waitFor(t, 10*time.Second, "the rejection in the view", func() bool {
		s, _ := op.View().Current()
		return slices.ContainsFunc(s.ConfigStatus, func(cs *ferryv1.ConfigStatus) bool {
			return cs.Name == "shop/split" && cs.Generation == 2 && cs.InForceGeneration == 1
		})
	})
	s, _ := op.View().Current()
	for _, svc := range s.Services {
		if svc.Name == "web" && (len(svc.RouteTables) != 1 || svc.RouteTables[0].Rules[0].Backends[1].Service != "shop/api") {
			t.Fatalf("web's tables after a rejected generation: %v", svc.RouteTables)
		}
	}
	// Written once: the operator does not rewrite a status that says the same.
	rv := u.GetResourceVersion()
	time.Sleep(3 * time.Second)
	if u, err = routes.Get(ctx, "split", metav1.GetOptions{}); err != nil || u.GetResourceVersion() != rv {
		t.Fatalf("the route changed with nothing new to say (resourceVersion %s, was %s): %v", u.GetResourceVersion(), rv, err)
	}
}
