package mesh

import (
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/agent"
	"github.com/ferrymesh/ferry/api/ferryv1"
	"github.com/ferrymesh/ferry/api/v1alpha1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
)

var conflictEpoch = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func runningPod(name, ip string, created time.Duration) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default", UID: types.UID("uid-" + name),
			CreationTimestamp: metav1.NewTime(conflictEpoch.Add(created)), Labels: map[string]string{"app": name}},
		Spec:   corev1.PodSpec{NodeName: "node2"},
		Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip},
	}
}

func meshNamespace() *corev1.Namespace {
	return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "default", Labels: map[string]string{v1alpha1.MeshLabel: v1alpha1.MeshEnabled}}}
}

func workloadNames(s *Snapshot) []string {
	var out []string
	for _, w := range s.Workloads {
		out = append(out, w.Namespace+"/"+w.Name)
	}
	return out
}

// A stale pod with c's address: the newer pod keeps it, the older is withheld
// (not a workload, not a backend), the state is one every agent takes whole, and
// the conflict is in the snapshot and the statuses by name.
func TestConflictNewerPodWins(t *testing.T) {
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "c", Namespace: "default"},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "c"}, Ports: []corev1.ServicePort{{Port: 80}}}}
	stale := runningPod("old-c", "10.100.2.10", 0)
	stale.Labels["app"] = "c" // it matches c's Service too
	v := startView(t, meshNamespace(), runningPod("a", "10.100.1.10", time.Hour), runningPod("c", "10.100.2.10", time.Hour), stale, svc)
	v.rebuild()
	s, _ := v.Current()
	if got := workloadNames(s); !slices.Equal(got, []string{"default/a", "default/c"}) {
		t.Fatalf("workloads %v, want a and c (old-c withheld)", got)
	}
	want := Conflict{IP: "10.100.2.10", Winner: "default/c", Withheld: []string{"default/old-c"}}
	if len(s.Conflicts) != 1 || !s.Conflicts[0].equal(want) {
		t.Fatalf("conflicts %+v, want %+v", s.Conflicts, want)
	}
	for _, sv := range s.Services {
		for _, b := range sv.Backends {
			if b.Pod == "old-c" {
				t.Errorf("withheld old-c is a backend of %s", sv.Name)
			}
		}
	}
	i := slices.IndexFunc(s.ConfigStatus, func(cs *ferryv1.ConfigStatus) bool { return cs.Kind == "Pod" && cs.Name == "default/old-c" })
	if i < 0 || s.ConfigStatus[i].Conditions[0].Status || !strings.Contains(s.ConfigStatus[i].Conditions[0].Message, "default/c") {
		t.Fatalf("statuses %v, want old-c not accepted, naming c", s.ConfigStatus)
	}
	st := &ferryv1.NodeState{Node: "node2", Workloads: s.Workloads, Services: s.Services}
	if err := agent.CheckState(st); err != nil {
		t.Fatalf("agents would cut the state: %v", err)
	}
	t.Logf("%s", s.Conflicts[0])
}

// Created at the same time, neither can be told live: both are withheld.
func TestConflictSameAgeWithholdsBoth(t *testing.T) {
	v := startView(t, meshNamespace(), runningPod("c", "10.100.2.10", 0), runningPod("twin", "10.100.2.10", 0), runningPod("a", "10.100.1.10", 0))
	v.rebuild()
	s, _ := v.Current()
	if got := workloadNames(s); !slices.Equal(got, []string{"default/a"}) {
		t.Fatalf("workloads %v, want a only", got)
	}
	if c := s.Conflicts; len(c) != 1 || c[0].Winner != "" || !slices.Equal(c[0].Withheld, []string{"default/c", "default/twin"}) {
		t.Fatalf("conflicts %+v", c)
	}
}

// A conflict among many does not keep the rest from changing: a pod added later
// is in the next snapshot.
func TestConflictDoesNotFreezeTheMesh(t *testing.T) {
	objs := []runtime.Object{meshNamespace(), runningPod("c", "10.100.2.10", time.Hour), runningPod("old-c", "10.100.2.10", 0)}
	tv := startViewLog(t, slog.New(slog.DiscardHandler), objs...)
	tv.rebuild()
	s1, _ := tv.Current()
	client := tv.core.CoreV1().Pods("default")
	if _, err := client.Create(t.Context(), runningPod("d", "10.100.2.11", 2*time.Hour), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		tv.rebuild()
		s, _ := tv.Current()
		if slices.Contains(workloadNames(s), "default/d") {
			if s.Version <= s1.Version || len(s.Conflicts) != 1 {
				t.Fatalf("version %d after %d, conflicts %v", s.Version, s1.Version, s.Conflicts)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("the new pod never reached the snapshot")
		}
		time.Sleep(10 * time.Millisecond)
	}
}
