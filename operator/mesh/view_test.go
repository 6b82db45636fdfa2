package mesh

import (
	"context"
	"fmt"
	"github.com/ferrymesh/ferry/api/v1alpha1"
	"log/slog"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
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
	factory := informers.NewSharedInformerFactory(fake.NewClientset(objs...), 0)
	v, err := NewView(factory, "cluster.local", slog.New(slog.DiscardHandler))
	if err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	tb.Cleanup(func() { cancel(); factory.Shutdown() })
	factory.Start(ctx.Done())
	factory.WaitForCacheSync(ctx.Done())
	return v
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
