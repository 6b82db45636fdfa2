package lab

import (
	"context"
	"log/slog"
	"path/filepath"
	"testing"

	"github.com/ferrymesh/ferry/operator/local"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/fake"
)

// The manifests the lab writes for the local-mode operator load without errors and
// say what the lab config says: who is enrolled, where, with which identity and IP.
// No root needed: nothing is built.
func TestManifestsFromPods(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Nodes[0].Pods = append(cfg.Nodes[0].Pods, PodConfig{Name: "web", Namespace: "shop", ServiceAccount: "websa", Enrolled: true})
	l, client := loadManifests(t, cfg)
	ctx := context.Background()
	ns, err := client.CoreV1().Namespaces().Get(ctx, "default", metav1.GetOptions{})
	if err != nil || ns.Labels["ferry.io/mesh"] != "enabled" {
		t.Fatalf("namespace default: %v %v", ns.GetLabels(), err)
	}
	for _, p := range l.Pods() {
		pod, err := client.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		optedOut := pod.Labels["ferry.io/mesh"] == "disabled"
		if pod.Spec.NodeName != p.Node || pod.Status.PodIP != p.IP.String() || pod.Spec.ServiceAccountName != p.ServiceAccount ||
			string(pod.UID) != p.UID || optedOut == p.Enrolled || pod.Status.Phase != corev1.PodRunning {
			t.Errorf("pod %s: node %s ip %s sa %s uid %s opted out %t; lab says %+v", p.Name, pod.Spec.NodeName, pod.Status.PodIP, pod.Spec.ServiceAccountName, pod.UID, optedOut, p)
		}
	}
	if got := l.operatorArgs(&l.desc.Nodes[1]); got[1] != "unix://"+filepath.Join(l.desc.Config.StateDir, "operator", "grpc.sock") || got[5] != filepath.Join(l.desc.Config.StateDir, "operator", "tokens", "node2") {
		t.Errorf("agent flags %v", got)
	}
}

// loadManifests writes the manifests of cfg, run with a local-mode operator, and loads
// them as that operator does, failing on any manifest error.
func loadManifests(t *testing.T, cfg Config) (*Lab, kubernetes.Interface) {
	t.Helper()
	cfg.StateDir = t.TempDir()
	cfg.Operator.Binary = "/bin/true"
	cfg, err := cfg.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	l := &Lab{log: slog.New(slog.DiscardHandler), desc: plan(cfg, "/sys/fs/cgroup")}
	l.planOperator()
	if err := l.writeManifests(); err != nil {
		t.Fatal(err)
	}
	client := fake.NewClientset()
	loader, err := local.NewLoader(l.ManifestDir(), client, nil, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	loader.SetPolicyClient(local.NewPolicyClient()) // as the operator's local mode does
	if err := loader.Load(context.Background()); err != nil {
		t.Fatal(err)
	}
	if errs := loader.Errors(); len(errs) != 0 {
		t.Fatalf("manifest errors: %v", errs)
	}
	return l, client
}
