package lab

import (
	"bufio"
	"bytes"
	"context"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/ferrymesh/ferry/api/ferryv1"
	"github.com/ferrymesh/ferry/api/v1alpha1"
	"github.com/ferrymesh/ferry/operator/ca"
	"google.golang.org/protobuf/encoding/protojson"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

var l7Services = []ServiceConfig{
	{Name: "web", ClusterIP: netip.MustParseAddr("10.96.0.50"), Port: 80, TargetPort: 8080, PortName: "http-web", AppProtocol: "http",
		LoadBalancer: "RoundRobin", Pods: []string{"b", "c"}},
	{Name: "raw", ClusterIP: netip.MustParseAddr("10.96.0.51"), Port: 9000, Pods: []string{"c"}},
}

// The local-mode operator reads a lab Service's port name and appProtocol, and the
// TrafficPolicy beside it targets the Service with the load balancer asked for.
func TestManifestsServicePorts(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Services = l7Services
	l, client := loadManifests(t, cfg)
	svc, err := client.CoreV1().Services("default").Get(context.Background(), "web", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p := svc.Spec.Ports[0]
	if p.Name != "http-web" || p.AppProtocol == nil || *p.AppProtocol != "http" || p.Port != 80 || p.TargetPort.IntValue() != 8080 {
		t.Errorf("web's port: %+v", p)
	}
	raw, err := client.CoreV1().Services("default").Get(context.Background(), "raw", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if p := raw.Spec.Ports[0]; p.Name != "" || p.AppProtocol != nil {
		t.Errorf("raw's port says more than asked: %+v", p)
	}
	// The TrafficPolicy, decoded as the operator's typed client would.
	data, err := os.ReadFile(filepath.Join(l.ManifestDir(), "ns-default.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var policies []v1alpha1.TrafficPolicy
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	for {
		doc, err := r.Read()
		if err != nil {
			break
		}
		var tp v1alpha1.TrafficPolicy
		if err := yaml.UnmarshalStrict(doc, &tp, yaml.DisallowUnknownFields); err == nil && tp.Kind == "TrafficPolicy" {
			policies = append(policies, tp)
		}
	}
	if len(policies) != 1 {
		t.Fatalf("%d TrafficPolicies, want 1 (for web)", len(policies))
	}
	tp := policies[0]
	if tp.APIVersion != "ferry.io/v1alpha1" || tp.Name != "web" || tp.Namespace != "default" || tp.Spec.LoadBalancer == nil ||
		tp.Spec.LoadBalancer.Type != v1alpha1.LoadBalancerRoundRobin ||
		!slices.Equal(tp.Spec.TargetRefs, []v1alpha1.PolicyTargetReference{{Kind: "Service", Name: "web"}}) {
		t.Errorf("TrafficPolicy %+v", tp)
	}
}

// SetServicePods rewrites the Services in the state files, keeping each node's
// certificates, with a newer version the agent's file watch applies.
func TestSetServicePodsStateFiles(t *testing.T) {
	cfg := DefaultConfig()
	cfg.StateDir = t.TempDir()
	cfg.Services = l7Services
	cfg, err := cfg.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	l := &Lab{log: slog.New(slog.DiscardHandler), desc: plan(cfg, "/sys/fs/cgroup")}
	for _, n := range l.desc.Nodes {
		if err := os.MkdirAll(n.Dir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	authority, err := ca.New(cfg.TrustDomain)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.writeStatesWith(authority); err != nil {
		t.Fatal(err)
	}
	before := readState(t, l.desc.Nodes[1].StateFile)
	if err := l.SetServicePods(context.Background(), "web", []string{"c"}); err != nil {
		t.Fatal(err)
	}
	after := readState(t, l.desc.Nodes[1].StateFile)
	if after.Version != before.Version+1 || len(after.Certificates) != 1 ||
		!bytes.Equal(after.Certificates[0].CertChainPem, before.Certificates[0].CertChainPem) {
		t.Errorf("version %d → %d, certificates %d: want the next version with the same certificate", before.Version, after.Version, len(after.Certificates))
	}
	var web *ferryv1.Service
	for _, s := range after.Services {
		if s.Name == "web" {
			web = s
		}
	}
	if web == nil || len(web.Backends) != 1 || web.Backends[0].Pod != "c" || !web.Backends[0].Ready ||
		web.Ports[0].Name != "http-web" || web.Ports[0].AppProtocol != "http" || web.LoadBalancer != "RoundRobin" {
		t.Errorf("web after the change: %v", web)
	}
	if err := l.SetServicePods(context.Background(), "web", []string{"nosuch"}); err == nil {
		t.Error("a pod the lab does not have was accepted")
	}
	if err := l.SetServicePods(context.Background(), "nosuch", nil); err == nil {
		t.Error("a Service the lab does not have was accepted")
	}
}

func readState(t *testing.T, path string) *ferryv1.NodeState {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	st := &ferryv1.NodeState{}
	if err := protojson.Unmarshal(data, st); err != nil {
		t.Fatal(err)
	}
	return st
}
