package operator

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/api/v1alpha1"
	"github.com/ferrymesh/ferry/operator/mesh"
	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes/fake"
)

func conflictPod(name string, created time.Time) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default", UID: types.UID("uid-" + name), CreationTimestamp: metav1.NewTime(created)},
		Spec:       corev1.PodSpec{NodeName: "node2"},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "10.100.2.10"},
	}
}

// A conflict in the view is the ferry_operator_conflicts gauge, naming each pod and
// what became of it, and a Warning Event on the pod withheld.
func TestConflictMetricAndEvent(t *testing.T) {
	epoch := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "default", Labels: map[string]string{v1alpha1.MeshLabel: v1alpha1.MeshEnabled}}}
	client := fake.NewClientset(ns, conflictPod("c", epoch.Add(time.Hour)), conflictPod("old-c", epoch))
	factory := informers.NewSharedInformerFactory(client, 0)
	view, err := mesh.NewView(factory, "cluster.local", slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	factory.Start(ctx.Done())
	done := make(chan struct{})
	go func() { defer close(done); view.Run(ctx) }()
	defer func() { cancel(); <-done; factory.Shutdown() }()
	deadline := time.Now().Add(10 * time.Second)
	for s, _ := view.Current(); s == nil; s, _ = view.Current() {
		if time.Now().After(deadline) {
			t.Fatal("no snapshot")
		}
		time.Sleep(10 * time.Millisecond)
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(conflictCollector{view})
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]bool{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			l := map[string]string{}
			for _, lp := range m.GetLabel() {
				l[lp.GetName()] = lp.GetValue()
			}
			got[mf.GetName()+" "+l["ip"]+" "+l["pod"]+" "+l["outcome"]] = m.GetGauge().GetValue() == 1
		}
	}
	for _, want := range []string{"ferry_operator_conflicts 10.100.2.10 default/c kept", "ferry_operator_conflicts 10.100.2.10 default/old-c withheld"} {
		if !got[want] || len(got) != 2 {
			t.Fatalf("gauges %v, want %q", got, want)
		}
	}

	o := &Operator{client: client, view: view, log: slog.New(slog.DiscardHandler), cfg: Config{RetryPeriod: time.Second}}
	o.leader.Store(true)
	rctx, rcancel := context.WithCancel(ctx)
	reported := make(chan struct{})
	go func() { defer close(reported); o.reportConflicts(rctx) }()
	for {
		evs, err := client.CoreV1().Events("default").List(ctx, metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if len(evs.Items) > 0 {
			ev := evs.Items[0]
			if len(evs.Items) != 1 || ev.InvolvedObject.Name != "old-c" || ev.Type != corev1.EventTypeWarning || ev.Reason != "AddressConflict" ||
				!strings.Contains(ev.Message, "the newer, default/c, keeps it") {
				t.Fatalf("events %+v", evs.Items)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no event posted")
		}
		time.Sleep(10 * time.Millisecond)
	}
	rcancel()
	<-reported
}
