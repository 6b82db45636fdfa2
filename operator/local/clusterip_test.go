package local

import (
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
)

// loadServices writes files into a folder, loads it, and returns the Services the
// clientset then holds, by name, and the loader's errors.
func loadServices(t *testing.T, l *Loader, files map[string]string) (map[string]corev1.Service, []*ManifestError) {
	t.Helper()
	for name, text := range files {
		if err := os.WriteFile(filepath.Join(l.dir, name), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Load(t.Context()); err != nil {
		t.Fatalf("load: %v", err)
	}
	list, err := l.client.CoreV1().Services("").List(t.Context(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]corev1.Service{}
	for _, s := range list.Items {
		out[s.Name] = s
	}
	return out, l.Errors()
}

func service(name, clusterIP string) string {
	s := "apiVersion: v1\nkind: Service\nmetadata: {name: " + name + "}\nspec:\n  selector: {app: " + name + "}\n  ports: [{port: 80}]\n"
	if clusterIP != "" {
		s += "  clusterIP: " + clusterIP + "\n"
	}
	return s + "---\n"
}

func newTestLoader(t *testing.T) *Loader {
	t.Helper()
	l, err := NewLoader(t.TempDir(), fake.NewClientset(), nil, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func TestClusterIPKeptAndAllocated(t *testing.T) {
	l := newTestLoader(t)
	svcs, errs := loadServices(t, l, map[string]string{"svc.yaml": service("fixed", "10.96.0.50") + service("auto", "") + service("headless", "None")})
	if len(errs) != 0 {
		t.Fatalf("errors: %v", errs)
	}
	if got := svcs["fixed"].Spec.ClusterIPs; len(got) != 1 || got[0] != "10.96.0.50" {
		t.Errorf("a clusterIP the manifest sets: clusterIPs %v, want [10.96.0.50]", got)
	}
	if got := svcs["fixed"].Spec.IPFamilies; len(got) != 1 || got[0] != corev1.IPv4Protocol {
		t.Errorf("ipFamilies %v, want [IPv4]", got)
	}
	auto := svcs["auto"].Spec
	ip, err := netip.ParseAddr(auto.ClusterIP)
	if err != nil || !netip.MustParsePrefix(DefaultServiceCIDR).Contains(ip) {
		t.Fatalf("allocated clusterIP %q is not in %s", auto.ClusterIP, DefaultServiceCIDR)
	}
	if len(auto.ClusterIPs) != 1 || auto.ClusterIPs[0] != auto.ClusterIP {
		t.Errorf("clusterIPs %v do not match clusterIP %s", auto.ClusterIPs, auto.ClusterIP)
	}
	if got := svcs["headless"].Spec.ClusterIPs; len(got) != 1 || got[0] != "None" {
		t.Errorf("headless service: clusterIPs %v, want [None]", got)
	}

	// Loading again (any change in the folder) keeps the allocation, and a second
	// loader over the same manifests (a restarted operator) gives the same address.
	again, _ := loadServices(t, l, map[string]string{"other.yaml": service("more", "")})
	if again["auto"].Spec.ClusterIP != auto.ClusterIP {
		t.Errorf("reload moved auto from %s to %s", auto.ClusterIP, again["auto"].Spec.ClusterIP)
	}
	if again["more"].Spec.ClusterIP == auto.ClusterIP || again["more"].Spec.ClusterIP == "10.96.0.50" {
		t.Errorf("two services share %s", again["more"].Spec.ClusterIP)
	}
	l2, err := NewLoader(l.dir, fake.NewClientset(), nil, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	restarted, _ := loadServices(t, l2, nil)
	if restarted["auto"].Spec.ClusterIP != auto.ClusterIP {
		t.Errorf("a restarted operator gave auto %s, before %s", restarted["auto"].Spec.ClusterIP, auto.ClusterIP)
	}
}

func TestClusterIPErrorsNameFileAndField(t *testing.T) {
	l := newTestLoader(t)
	svcs, errs := loadServices(t, l, map[string]string{
		"a.yaml": service("first", "10.96.0.60"),
		"b.yaml": service("second", "10.96.0.60") + service("outside", "192.168.1.1") + service("garbage", "ten"),
	})
	if _, ok := svcs["first"]; !ok {
		t.Error("the first service with 10.96.0.60 was not loaded")
	}
	want := map[string]string{
		"second":  "b.yaml (Service default/second): field spec.clusterIP: 10.96.0.60 is already the address of Service default/first",
		"outside": "b.yaml (Service default/outside): field spec.clusterIP: 192.168.1.1 is not in the service range 10.96.0.0/16",
		"garbage": `is not an IP address`,
	}
	for name, msg := range want {
		if _, ok := svcs[name]; ok {
			t.Errorf("service %s with a bad clusterIP was loaded", name)
		}
		found := false
		for _, e := range errs {
			if strings.Contains(e.Error(), msg) {
				found = true
			}
		}
		if !found {
			t.Errorf("no error %q among %v", msg, errs)
		}
	}
}

func TestClusterIPRangeFull(t *testing.T) {
	l := newTestLoader(t)
	if err := l.SetServiceCIDR(netip.MustParsePrefix("10.96.0.0/30")); err != nil {
		t.Fatal(err)
	}
	// A /30 has offsets 2 and 3 to give.
	svcs, errs := loadServices(t, l, map[string]string{"s.yaml": service("one", "") + service("two", "") + service("three", "")})
	if len(svcs) != 2 || len(errs) != 1 || !strings.Contains(errs[0].Error(), "no free address left in the service range 10.96.0.0/30") {
		t.Fatalf("services %d, errors %v: want 2 and one range-full error", len(svcs), errs)
	}
	if err := l.SetServiceCIDR(netip.MustParsePrefix("10.96.0.0/31")); err == nil {
		t.Error("a /31 service range was accepted")
	}
}
