package deploy_test

// Tests of the Helm chart deploy/helm/ferry, with the helm CLI that
// hack/build-helm.sh builds from helm.sh/helm/v4.

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/deploy"
	"github.com/ferrymesh/ferry/internal/kubetest"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
)

const chart = "helm/ferry"

var (
	helmOnce sync.Once
	helmPath string
	helmErr  error
)

// helm runs the helm CLI with its own empty configuration folders and returns
// its stdout; a failure fails the test with helm's stderr.
func helm(t *testing.T, args ...string) string {
	t.Helper()
	out, err := helmRun(t, args...)
	if err != nil {
		t.Fatalf("helm %s: %v", strings.Join(args, " "), err)
	}
	return out
}

func helmRun(t *testing.T, args ...string) (string, error) {
	t.Helper()
	helmOnce.Do(func() {
		out, err := exec.Command("bash", "../hack/build-helm.sh").Output()
		if err != nil {
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				err = errors.Join(err, errors.New(string(ee.Stderr)))
			}
			helmErr = err
			return
		}
		helmPath = strings.TrimSpace(string(out))
	})
	if helmErr != nil {
		t.Fatalf("hack/build-helm.sh: %v", helmErr)
	}
	home := t.TempDir()
	cmd := exec.CommandContext(t.Context(), helmPath, args...)
	cmd.Env = append(os.Environ(),
		"HELM_CACHE_HOME="+filepath.Join(home, "cache"),
		"HELM_CONFIG_HOME="+filepath.Join(home, "config"),
		"HELM_DATA_HOME="+filepath.Join(home, "data"))
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), errors.Join(err, errors.New(stderr.String()))
	}
	return stdout.String(), nil
}

// parseObjects decodes a multi-document YAML stream into objects (through JSON, as
// deploy.Render's are), skipping empty documents.
func parseObjects(t *testing.T, text string) []*unstructured.Unstructured {
	t.Helper()
	dec := utilyaml.NewYAMLOrJSONDecoder(strings.NewReader(text), 4096)
	var objs []*unstructured.Unstructured
	for {
		var raw json.RawMessage
		err := dec.Decode(&raw)
		if errors.Is(err, io.EOF) {
			return objs
		}
		if err != nil {
			t.Fatalf("parse rendered YAML: %v", err)
		}
		if len(raw) == 0 || string(raw) == "null" {
			continue
		}
		u := &unstructured.Unstructured{}
		if err := u.UnmarshalJSON(raw); err != nil {
			t.Fatalf("parse rendered object: %v\n%s", err, raw)
		}
		objs = append(objs, u)
	}
}

func byRef(objs []*unstructured.Unstructured) map[string]*unstructured.Unstructured {
	m := map[string]*unstructured.Unstructured{}
	for _, o := range objs {
		m[o.GetKind()+" "+o.GetNamespace()+"/"+o.GetName()] = o
	}
	return m
}

func TestHelmLint(t *testing.T) {
	out := helm(t, "lint", "--strict", chart)
	t.Logf("helm lint --strict:\n%s", out)
	if !strings.Contains(out, "1 chart(s) linted, 0 chart(s) failed") {
		t.Errorf("helm lint --strict %s:\n%s", chart, out)
	}
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, "[WARNING]") || strings.HasPrefix(line, "[ERROR]") {
			t.Errorf("helm lint: %s", line)
		}
	}
}

// With its default values the chart renders exactly the kustomize base's objects,
// field by field, CRDs included.
func TestHelmTemplateEqualsKustomize(t *testing.T) {
	want, err := deploy.Render(deploy.Options{})
	if err != nil {
		t.Fatal(err)
	}
	got := byRef(parseObjects(t, helm(t, "template", "ferry", chart, "--namespace", deploy.Namespace, "--include-crds")))
	wantRefs := byRef(want)
	for ref, w := range wantRefs {
		g, ok := got[ref]
		if !ok {
			t.Errorf("helm template lacks %s", ref)
			continue
		}
		if !reflect.DeepEqual(g.Object, w.Object) {
			gj, _ := json.MarshalIndent(g.Object, "", " ")
			wj, _ := json.MarshalIndent(w.Object, "", " ")
			t.Errorf("%s differs:\n--- helm\n%s\n--- kustomize\n%s", ref, gj, wj)
		}
	}
	for ref := range got {
		if _, ok := wantRefs[ref]; !ok {
			t.Errorf("helm template renders %s, which the kustomize base does not", ref)
		}
	}
	if len(got) != len(wantRefs) || len(got) < 15 {
		t.Errorf("helm rendered %d objects, kustomize %d", len(got), len(wantRefs))
	}
}

// selfSignedCA returns a CA certificate and key in PEM.
func selfSignedCA(t *testing.T) (certPEM, keyPEM []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "user CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})
}

func container(t *testing.T, o *unstructured.Unstructured, init bool) map[string]any {
	t.Helper()
	field := "containers"
	if init {
		field = "initContainers"
	}
	cs, _, _ := unstructured.NestedSlice(o.Object, "spec", "template", "spec", field)
	if len(cs) == 0 {
		t.Fatalf("%s has no %s", deploy.Ref(o), field)
	}
	return cs[0].(map[string]any)
}

func args(c map[string]any) []string {
	var out []string
	for _, a := range c["args"].([]any) {
		out = append(out, a.(string))
	}
	return out
}

// Each value changes what a user would expect, in the rendered objects.
func TestHelmValues(t *testing.T) {
	certPEM, keyPEM := selfSignedCA(t)
	dir := t.TempDir()
	for name, data := range map[string][]byte{"ca.crt": certPEM, "ca.key": keyPEM} {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	values := filepath.Join(dir, "values.yaml")
	err := os.WriteFile(values, []byte(`
images:
  operator: {repository: registry.example/ferry/operator, tag: v0.2.0, pullPolicy: IfNotPresent}
  agent: {repository: registry.example/ferry/agent, tag: v0.2.1, pullPolicy: Always}
trustDomain: prod.example.org
certTTL: 12h
operator:
  replicas: 3
  ports: {grpc: 16012, health: 16021, metrics: 16014}
  resources: {requests: {cpu: 250m, memory: 256Mi}, limits: {memory: 2Gi}}
agent:
  ports: {health: 16022, metrics: 16020}
  resources: {requests: {cpu: 300m, memory: 200Mi}, limits: {memory: 3Gi}}
`), 0o644)
	if err != nil {
		t.Fatal(err)
	}
	out := helm(t, "template", "mesh", chart, "--namespace", "mesh-system", "-f", values,
		"--set", "ca.user.secretName=corp-ca", "--set-file", "ca.user.certificate="+filepath.Join(dir, "ca.crt"),
		"--set-file", "ca.user.key="+filepath.Join(dir, "ca.key"))
	objs := byRef(parseObjects(t, out))

	op := objs["Deployment mesh-system/ferry-operator"]
	if op == nil {
		t.Fatalf("no operator Deployment in mesh-system:\n%s", out)
	}
	if r, _, _ := unstructured.NestedInt64(op.Object, "spec", "replicas"); r != 3 {
		t.Errorf("operator replicas = %d, want 3", r)
	}
	oc := container(t, op, false)
	if oc["image"] != "registry.example/ferry/operator:v0.2.0" || oc["imagePullPolicy"] != "IfNotPresent" {
		t.Errorf("operator image %v %v", oc["image"], oc["imagePullPolicy"])
	}
	for _, want := range []string{"--trust-domain=prod.example.org", "--cert-ttl=12h", "--user-ca-secret=corp-ca",
		"--grpc-addr=:16012", "--health-addr=:16021", "--metrics-addr=:16014", "--ca-secret=ferry-ca"} {
		if !slices.Contains(args(oc), want) {
			t.Errorf("operator args %q lack %s", args(oc), want)
		}
	}
	if got, _ := json.Marshal(oc["resources"]); string(got) != `{"limits":{"memory":"2Gi"},"requests":{"cpu":"250m","memory":"256Mi"}}` {
		t.Errorf("operator resources %s", got)
	}
	var ports []int64
	for _, p := range oc["ports"].([]any) {
		ports = append(ports, p.(map[string]any)["containerPort"].(int64))
	}
	if !slices.Equal(ports, []int64{16012, 16021, 16014}) {
		t.Errorf("operator container ports %v", ports)
	}
	svc := objs["Service mesh-system/ferry-operator"]
	if p, _, _ := unstructured.NestedSlice(svc.Object, "spec", "ports"); len(p) != 1 || p[0].(map[string]any)["port"] != int64(16012) {
		t.Errorf("operator Service ports %v", p)
	}

	ds := objs["DaemonSet mesh-system/ferry-agent"]
	ac, ic := container(t, ds, false), container(t, ds, true)
	for _, c := range []map[string]any{ac, ic} {
		if c["image"] != "registry.example/ferry/agent:v0.2.1" || c["imagePullPolicy"] != "Always" {
			t.Errorf("agent container %v: image %v %v", c["name"], c["image"], c["imagePullPolicy"])
		}
	}
	for _, want := range []string{"--operator=ferry-operator.$(POD_NAMESPACE).svc:16012", "--health-addr=:16022", "--metrics-addr=:16020"} {
		if !slices.Contains(args(ac), want) {
			t.Errorf("agent args %q lack %s", args(ac), want)
		}
	}
	if p, _, _ := unstructured.NestedInt64(ac, "readinessProbe", "httpGet", "port"); p != 16022 {
		t.Errorf("agent readiness port %d", p)
	}
	if got, _ := json.Marshal(ac["resources"]); string(got) != `{"limits":{"memory":"3Gi"},"requests":{"cpu":"300m","memory":"200Mi"}}` {
		t.Errorf("agent resources %s", got)
	}

	sec := objs["Secret mesh-system/corp-ca"]
	if sec == nil {
		t.Fatal("no user CA Secret corp-ca")
	}
	data, _, _ := unstructured.NestedStringMap(sec.Object, "data")
	if crt, _ := base64.StdEncoding.DecodeString(data["tls.crt"]); !bytes.Equal(crt, certPEM) {
		t.Errorf("Secret tls.crt is not the CA given")
	}
	if key, _ := base64.StdEncoding.DecodeString(data["tls.key"]); !bytes.Equal(key, keyPEM) {
		t.Errorf("Secret tls.key is not the key given")
	}
	// Everything in the release's namespace, bindings included.
	for ref, o := range objs {
		if o.GetNamespace() != "" && o.GetNamespace() != "mesh-system" {
			t.Errorf("%s outside the release namespace", ref)
		}
		if o.GetLabels()["app.kubernetes.io/part-of"] != "ferry" {
			t.Errorf("%s lacks app.kubernetes.io/part-of=ferry", ref)
		}
	}
	rb := objs["RoleBinding mesh-system/ferry-operator"]
	if s, _, _ := unstructured.NestedSlice(rb.Object, "subjects"); len(s) != 1 || s[0].(map[string]any)["namespace"] != "mesh-system" {
		t.Errorf("RoleBinding subjects %v", s)
	}
	if objs["Namespace /mesh-system"] == nil {
		t.Error("no Namespace mesh-system")
	}

	// A PEM without its key is refused with a message, not rendered half.
	_, err = helmRun(t, "template", "mesh", chart, "--set-file", "ca.user.certificate="+filepath.Join(dir, "ca.crt"))
	if err == nil || !strings.Contains(err.Error(), "certificate and key need each other") {
		t.Errorf("helm template with a certificate and no key: %v", err)
	}
	// createNamespace=false leaves the namespace to --create-namespace.
	if objs := byRef(parseObjects(t, helm(t, "template", "ferry", chart, "-n", deploy.Namespace, "--set", "createNamespace=false"))); objs["Namespace /"+deploy.Namespace] != nil {
		t.Error("createNamespace=false still renders the Namespace")
	}
}

// helm install on a real API server creates every object the chart renders;
// helm upgrade changes them; helm uninstall removes them.
func TestHelmInstall(t *testing.T) {
	c := kubetest.Start(t)
	kc := "--kubeconfig=" + c.Kubeconfig
	// helm keeps its release record in the release namespace, so that must exist
	// before the chart's Namespace object is applied: --create-namespace makes it,
	// --take-ownership lets the chart's Namespace (with its Pod Security labels)
	// adopt it. docs/install.md gives this command.
	out := helm(t, "install", "ferry", chart, "--namespace", deploy.Namespace, "--create-namespace", "--take-ownership", kc)
	t.Logf("helm install:\n%s", out)
	want, err := deploy.Render(deploy.Options{})
	if err != nil {
		t.Fatal(err)
	}
	var refs []string
	for _, o := range want {
		refs = append(refs, strings.ToLower(o.GetKind())+"."+o.GroupVersionKind().Group+"/"+o.GetName())
	}
	list := func() map[string]*unstructured.Unstructured {
		t.Helper()
		text, err := kubectl(t, c, append([]string{"get", "-n", deploy.Namespace, "-o", "json"}, refs...)...)
		if err != nil {
			t.Fatalf("kubectl get: %v\n%s", err, text)
		}
		l := &unstructured.UnstructuredList{}
		if err := l.UnmarshalJSON([]byte(text)); err != nil {
			t.Fatal(err)
		}
		m := map[string]*unstructured.Unstructured{}
		for i := range l.Items {
			m[l.Items[i].GetKind()+" "+l.Items[i].GetNamespace()+"/"+l.Items[i].GetName()] = &l.Items[i]
		}
		return m
	}
	got := list()
	for ref := range byRef(want) {
		o := got[ref]
		if o == nil {
			t.Errorf("after helm install, %s does not exist", ref)
			continue
		}
		if o.GetKind() != "CustomResourceDefinition" && o.GetAnnotations()["meta.helm.sh/release-name"] != "ferry" {
			t.Errorf("%s is not owned by the release: annotations %v", ref, o.GetAnnotations())
		}
	}
	if ns := got["Namespace /"+deploy.Namespace]; ns == nil || ns.GetLabels()["pod-security.kubernetes.io/enforce"] != "privileged" {
		t.Errorf("namespace %s is not labelled for the privileged Pod Security level: %v", deploy.Namespace, ns)
	}
	if status := helm(t, "status", "ferry", "-n", deploy.Namespace, kc); !strings.Contains(status, "STATUS: deployed") {
		t.Errorf("helm status:\n%s", status)
	}

	helm(t, "upgrade", "ferry", chart, "--namespace", deploy.Namespace, kc, "--set", "trustDomain=upgraded.example", "--set", "images.agent.tag=v9")
	got = list()
	if a := args(container(t, got["Deployment ferry-system/ferry-operator"], false)); !slices.Contains(a, "--trust-domain=upgraded.example") {
		t.Errorf("after helm upgrade, operator args %q", a)
	}
	if img := container(t, got["DaemonSet ferry-system/ferry-agent"], false)["image"]; img != deploy.AgentImage+":v9" {
		t.Errorf("after helm upgrade, agent image %v", img)
	}

	helm(t, "uninstall", "ferry", "--namespace", deploy.Namespace, kc, "--wait=false")
	text, _ := kubectl(t, c, "get", "-n", deploy.Namespace, "deployment/ferry-operator", "daemonset/ferry-agent", "clusterrole/ferry-operator", "--ignore-not-found", "-o", "name")
	if strings.TrimSpace(text) != "" {
		t.Errorf("after helm uninstall these remain:\n%s", text)
	}
}
