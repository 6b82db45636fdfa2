package mesh

import (
	"context"
	"fmt"
	"github.com/ferrymesh/ferry/api/v1alpha1"
	"log/slog"
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes/fake"
)

// scaleObjects is 1,000 pods in 5 enrolled namespaces on 10 nodes and 200 services
// selecting them.
func scaleObjects() []runtime.Object {
	var objs []runtime.Object
	for n := range 5 {
		objs = append(objs, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("ns%d", n), Labels: map[string]string{v1alpha1.MeshLabel: v1alpha1.MeshEnabled}}})
	}
	for i := range 1000 {
		objs = append(objs, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("p%d", i), Namespace: fmt.Sprintf("ns%d", i%5), UID: types.UID(fmt.Sprint("uid-", i)),
				Labels: map[string]string{"app": fmt.Sprintf("s%d", (i/5)%40)}},
			Spec:   corev1.PodSpec{NodeName: fmt.Sprintf("node%d", i%10), ServiceAccountName: "sa"},
			Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: fmt.Sprintf("10.102.%d.%d", i/250, i%250+2)},
		})
	}
	for i := range 200 {
		objs = append(objs, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("s%d", i/5), Namespace: fmt.Sprintf("ns%d", i%5)},
			Spec:       corev1.ServiceSpec{Selector: map[string]string{"app": fmt.Sprintf("s%d", i/5)}, Ports: []corev1.ServicePort{{Port: 80}}},
		})
	}
	return objs
}

func startView(tb testing.TB, objs ...runtime.Object) *View {
	tb.Helper()
	return startViewLog(tb, slog.New(slog.DiscardHandler), objs...).View
}

// testView is a view over in-memory clients: core objects in a fake clientset,
// TrafficPolicies in a fake dynamic client, as local mode holds them.
type testView struct {
	*View
	policies dynamic.Interface
	core     *fake.Clientset
}

func startViewLog(tb testing.TB, log *slog.Logger, objs ...runtime.Object) testView {
	tb.Helper()
	var core, policies []runtime.Object
	for _, o := range objs {
		switch o := o.(type) {
		case *v1alpha1.TrafficPolicy:
			policies = append(policies, unstructuredPolicy(tb, o))
		case *unstructured.Unstructured:
			policies = append(policies, o)
		default:
			core = append(core, o)
		}
	}
	coreClient := fake.NewClientset(core...)
	factory := informers.NewSharedInformerFactory(coreClient, 0)
	dyn := dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(),
		map[schema.GroupVersionResource]string{
			TrafficPolicyResource(): "TrafficPolicyList", HTTPRouteResource(): "HTTPRouteList",
			GRPCRouteResource(): "GRPCRouteList", ReferenceGrantResource(): "ReferenceGrantList",
			AuthorizationPolicyResource(): "AuthorizationPolicyList", PeerAuthenticationResource(): "PeerAuthenticationList",
		}, policies...)
	dynFactory := dynamicinformer.NewDynamicSharedInformerFactory(dyn, 0)
	v, err := NewView(factory, "cluster.local", log)
	if err != nil {
		tb.Fatal(err)
	}
	if err := v.WatchTrafficPolicies(dynFactory); err != nil {
		tb.Fatal(err)
	}
	if err := v.WatchRoutes(dynFactory); err != nil {
		tb.Fatal(err)
	}
	if err := v.WatchReferenceGrants(dynFactory); err != nil {
		tb.Fatal(err)
	}
	if err := v.WatchAuthorizationPolicies(dynFactory, "ferry-system"); err != nil {
		tb.Fatal(err)
	}
	if err := v.WatchPeerAuthentications(dynFactory, "ferry-system"); err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	tb.Cleanup(func() { cancel(); factory.Shutdown(); dynFactory.Shutdown() })
	factory.Start(ctx.Done())
	dynFactory.Start(ctx.Done())
	factory.WaitForCacheSync(ctx.Done())
	dynFactory.WaitForCacheSync(ctx.Done())
	return testView{View: v, policies: dyn, core: coreClient}
}

func unstructuredPolicy(tb testing.TB, tp *v1alpha1.TrafficPolicy) *unstructured.Unstructured {
	tb.Helper()
	c := tp.DeepCopy()
	c.APIVersion, c.Kind = v1alpha1.GroupVersion().String(), "TrafficPolicy"
	m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(c)
	if err != nil {
		tb.Fatal(err)
	}
	return &unstructured.Unstructured{Object: m}
}

func TestViewScale(t *testing.T) {
	v := startView(t, scaleObjects()...)
	v.rebuild()
	s, _ := v.Current()
	if len(s.Workloads) != 1000 || len(s.Services) != 200 {
		t.Fatalf("%d workloads, %d services", len(s.Workloads), len(s.Services))
	}
	for _, svc := range s.Services {
		if len(svc.Endpoints) != 5 {
			t.Fatalf("service %s/%s has %d endpoints, want 5", svc.Namespace, svc.Name, len(svc.Endpoints))
		}
	}
	if !v.HasPod("node3", "ns3", "sa") || v.HasPod("node3", "ns3", "other") {
		t.Fatal("HasPod")
	}
}

// BenchmarkViewRebuild is the cost of one rebuild of the mesh view with 1,000 pods
// and 200 services, paid once per batch of Kubernetes changes.
func BenchmarkViewRebuild(b *testing.B) {
	v := startView(b, scaleObjects()...)
	b.ReportAllocs()
	for b.Loop() {
		v.rebuild()
	}
}

func TestViewBackends(t *testing.T) {
	ready := []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}
	notReady := []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionFalse}}
	pod := func(name string, labels map[string]string, node, ip string, conds []corev1.PodCondition, ports ...corev1.ContainerPort) *corev1.Pod {
		return &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "shop", UID: types.UID("uid-" + name), Labels: labels},
			Spec:       corev1.PodSpec{NodeName: node, Containers: []corev1.Container{{Name: "app", Ports: ports}}},
			Status:     corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, Conditions: conds},
		}
	}
	web := map[string]string{"app": "web"}
	out := map[string]string{"app": "web", v1alpha1.MeshLabel: v1alpha1.MeshDisabled}
	v := startView(t,
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop", Labels: map[string]string{v1alpha1.MeshLabel: v1alpha1.MeshEnabled}}},
		pod("web-1", web, "node1", "10.1.1.10", ready, corev1.ContainerPort{Name: "http", ContainerPort: 8080}),
		pod("web-2", web, "node2", "10.1.2.10", notReady, corev1.ContainerPort{Name: "http", ContainerPort: 8081}),
		pod("web-3", out, "node2", "10.1.2.11", ready), // outside the mesh, no port named http
		pod("web-4", web, "", "", nil), // not scheduled
		pod("other", map[string]string{"app": "db"}, "node1", "10.1.1.11", ready),
		&corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "shop"},
			Spec: corev1.ServiceSpec{Selector: web, ClusterIP: "10.96.0.50", ClusterIPs: []string{"10.96.0.50"}, Ports: []corev1.ServicePort{
				{Name: "http", Port: 80, TargetPort: intstr.FromString("http")},
				{Name: "admin", Port: 9000},
				{Name: "metrics", Port: 81, TargetPort: intstr.FromInt32(9090)},
			}},
		},
	)
	v.rebuild()
	s, _ := v.Current()
	if len(s.Services) != 1 {
		t.Fatalf("services: %v", s.Services)
	}
	got := s.Services[0].Backends
	type want struct {
		pod, ip, node, uid string
		ready              bool
		ports              []uint32
	}
	wants := []want{
		{"web-1", "10.1.1.10", "node1", "uid-web-1", true, []uint32{8080, 9000, 9090}},
		{"web-2", "10.1.2.10", "node2", "uid-web-2", false, []uint32{8081, 9000, 9090}},
		{"web-3", "10.1.2.11", "node2", "", true, []uint32{0, 9000, 9090}},
	}
	if len(got) != len(wants) {
		t.Fatalf("backends %v, want web-1, web-2, web-3", got)
	}
	for i, w := range wants {
		b := got[i]
		if b.Pod != w.pod || len(b.Ips) != 1 || b.Ips[0] != w.ip || b.Node != w.node || b.WorkloadUid != w.uid || b.Ready != w.ready || !slices.Equal(b.Ports, w.ports) {
			t.Errorf("backend %d: %v, want %+v", i, b, w)
		}
	}
	if eps := s.Services[0].Endpoints; !slices.Equal(eps, []string{"uid-web-1", "uid-web-2"}) {
		t.Errorf("enrolled endpoints %v, want web-1 and web-2", eps)
	}
}

// Workloads are named as Istio's metrics name them: by the pod's controller, a
// Deployment's name for a pod of one of its ReplicaSets.
func TestWorkloadName(t *testing.T) {
	controller := func(kind, name string) []metav1.OwnerReference {
		return []metav1.OwnerReference{{Kind: kind, Name: name, Controller: new(true)}}
	}
	for _, tc := range []struct {
		name   string
		owners []metav1.OwnerReference
		labels map[string]string
		want   string
	}{
		{"web-7d4b9c5f8-x2x5q", controller("ReplicaSet", "web-7d4b9c5f8"), map[string]string{"pod-template-hash": "7d4b9c5f8"}, "web"},
		{"cache-abcde", controller("ReplicaSet", "cache"), nil, "cache"}, // a ReplicaSet of its own
		{"to-service-q8z4w", controller("Job", "to-service"), nil, "to-service"},
		{"db-0", controller("StatefulSet", "db"), nil, "db"},
		{"ferry-agent-h7k2p", controller("DaemonSet", "ferry-agent"), nil, "ferry-agent"},
		{"debug", nil, nil, "debug"},
		{"owned-not-controlled", []metav1.OwnerReference{{Kind: "ConfigMap", Name: "x"}}, nil, "owned-not-controlled"},
	} {
		p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: tc.name, Namespace: "shop", OwnerReferences: tc.owners, Labels: tc.labels}}
		if got := WorkloadName(p); got != tc.want {
			t.Errorf("WorkloadName(%s) = %q, want %q", tc.name, got, tc.want)
		}
	}
}
