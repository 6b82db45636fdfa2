package main

import (
	"bytes"
	"strings"
	"testing"

	"github.com/ferrymesh/ferry/deploy"
	"github.com/ferrymesh/ferry/internal/kubetest"
	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/restmapper"
)

// ferryCLI runs a ferry command as a user would and returns what it printed
// (stdout and stderr together).
func ferryCLI(t *testing.T, newCmd func() *cobra.Command, args ...string) (string, error) {
	t.Helper()
	cmd := newCmd()
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetArgs(args)
	cmd.SilenceUsage, cmd.SilenceErrors = true, true
	err := cmd.ExecuteContext(t.Context())
	t.Logf("ferry %s %s:\n%s", cmd.Name(), strings.Join(args, " "), out.String())
	return out.String(), err
}

func TestInstall(t *testing.T) {
	c := kubetest.Start(t)
	ctx := t.Context()
	client, err := kubernetes.NewForConfig(c.RestConfig)
	if err != nil {
		t.Fatal(err)
	}
	objs, err := deploy.Render(deploy.Options{})
	if err != nil {
		t.Fatal(err)
	}
	kubeconfig := "--kubeconfig=" + c.Kubeconfig

	t.Run("-o yaml prints the manifests", func(t *testing.T) {
		out, err := ferryCLI(t, newInstallCommand, "-o", "yaml")
		if err != nil {
			t.Fatal(err)
		}
		want, _ := deploy.YAML(deploy.Options{})
		if out != string(want) {
			t.Errorf("ferry install -o yaml printed something else than the base")
		}
	})

	t.Run("--dry-run=server on a fresh cluster changes nothing", func(t *testing.T) {
		out, err := ferryCLI(t, newInstallCommand, "--dry-run=server", kubeconfig)
		if err != nil {
			t.Fatalf("ferry install --dry-run=server: %v", err)
		}
		// Cluster-wide objects are checked; those inside the namespace the
		// dry run only pretended to create cannot be, and are named as skipped.
		for _, want := range []string{
			"created    Namespace ferry-system",
			"created    CustomResourceDefinition trafficpolicies.ferry.io",
			"created    ClusterRole ferry-operator",
			"skipped    DaemonSet ferry-system/ferry-agent (namespace ferry-system does not exist yet",
			"Nothing was changed.",
		} {
			if !strings.Contains(out, want) {
				t.Errorf("output lacks %q", want)
			}
		}
		if _, err := client.CoreV1().Namespaces().Get(ctx, deploy.Namespace, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
			t.Errorf("namespace %s after a dry run: %v, want not found", deploy.Namespace, err)
		}
	})

	t.Run("--dry-run=server checks every object once the namespace exists", func(t *testing.T) {
		if _, err := c.CreateNamespace(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: deploy.Namespace}}); err != nil {
			t.Fatal(err)
		}
		out, err := ferryCLI(t, newInstallCommand, "--dry-run=server", kubeconfig)
		if err != nil {
			t.Fatalf("ferry install --dry-run=server: %v", err)
		}
		if strings.Contains(out, "skipped") {
			t.Errorf("objects were skipped")
		}
		if !strings.Contains(out, "created    DaemonSet ferry-system/ferry-agent") {
			t.Errorf("the DaemonSet was not checked by the server")
		}
	})

	t.Run("install applies every object", func(t *testing.T) {
		out, err := ferryCLI(t, newInstallCommand, kubeconfig, "--image-tag", "v0.1.0")
		if err != nil {
			t.Fatalf("ferry install: %v", err)
		}
		if !strings.Contains(out, "Ferry installed:") {
			t.Errorf("no summary")
		}
		dyn, err := dynamic.NewForConfig(c.RestConfig)
		if err != nil {
			t.Fatal(err)
		}
		dc, err := discovery.NewDiscoveryClientForConfig(c.RestConfig)
		if err != nil {
			t.Fatal(err)
		}
		mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(dc))
		for _, o := range objs {
			gvk := o.GroupVersionKind()
			m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
			if err != nil {
				t.Fatalf("%s: %v", deploy.Ref(o), err)
			}
			var r dynamic.ResourceInterface = dyn.Resource(m.Resource)
			if m.Scope.Name() == meta.RESTScopeNameNamespace {
				r = dyn.Resource(m.Resource).Namespace(o.GetNamespace())
			}
			if _, err := r.Get(ctx, o.GetName(), metav1.GetOptions{}); err != nil {
				t.Errorf("%s after install: %v", deploy.Ref(o), err)
			}
		}
		ds, err := client.AppsV1().DaemonSets(deploy.Namespace).Get(ctx, "ferry-agent", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if img := ds.Spec.Template.Spec.Containers[0].Image; img != deploy.AgentImage+":v0.1.0" {
			t.Errorf("agent image = %q, want the --image-tag", img)
		}
	})

	t.Run("installing again changes nothing", func(t *testing.T) {
		out, err := ferryCLI(t, newInstallCommand, kubeconfig, "--image-tag", "v0.1.0")
		if err != nil {
			t.Fatalf("ferry install: %v", err)
		}
		if got := strings.Count(out, "  unchanged "); got != len(objs) {
			t.Errorf("%d objects unchanged, want all %d", got, len(objs))
		}
	})

	t.Run("upgrading the image tag configures the workloads only", func(t *testing.T) {
		out, err := ferryCLI(t, newInstallCommand, kubeconfig, "--image-tag", "v0.2.0")
		if err != nil {
			t.Fatalf("ferry install: %v", err)
		}
		for _, want := range []string{"configured DaemonSet ferry-system/ferry-agent", "configured Deployment ferry-system/ferry-operator"} {
			if !strings.Contains(out, want) {
				t.Errorf("output lacks %q", want)
			}
		}
		if got := strings.Count(out, "  configured "); got != 2 {
			t.Errorf("%d objects configured, want 2", got)
		}
	})

	t.Run("--wait says what is not running yet", func(t *testing.T) {
		_, err := ferryCLI(t, newInstallCommand, kubeconfig, "--image-tag", "v0.2.0", "--wait", "3s")
		if err == nil || !strings.Contains(err.Error(), "ferry is installed but not ready after 3s (operator: 0 of 2 replicas available; agents: 0 of 0 nodes ready") {
			t.Errorf("ferry install --wait 3s with nothing running: %v", err)
		}
	})

	t.Run("--wait returns once everything runs", func(t *testing.T) {
		// No controllers here: report what they would, the operator's two
		// replicas available and an agent ready on each of three nodes.
		d, err := client.AppsV1().Deployments(deploy.Namespace).Get(ctx, deploy.OperatorDeployment, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		d.Status.ObservedGeneration, d.Status.Replicas, d.Status.UpdatedReplicas, d.Status.AvailableReplicas, d.Status.ReadyReplicas = d.Generation, 2, 2, 2, 2
		if _, err := client.AppsV1().Deployments(deploy.Namespace).UpdateStatus(ctx, d, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		ds, err := client.AppsV1().DaemonSets(deploy.Namespace).Get(ctx, deploy.AgentDaemonSet, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		ds.Status.ObservedGeneration = ds.Generation
		ds.Status.DesiredNumberScheduled, ds.Status.CurrentNumberScheduled, ds.Status.UpdatedNumberScheduled, ds.Status.NumberReady = 3, 3, 3, 3
		if _, err := client.AppsV1().DaemonSets(deploy.Namespace).UpdateStatus(ctx, ds, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		out, err := ferryCLI(t, newInstallCommand, kubeconfig, "--image-tag", "v0.2.0", "--wait", "60s")
		if err != nil {
			t.Fatalf("ferry install --wait: %v", err)
		}
		for _, want := range []string{
			"operator: 2 of 2 replicas available; agents: 3 of 3 nodes ready",
			"Ferry is running. Next: ferry enroll NAMESPACE",
		} {
			if !strings.Contains(out, want) {
				t.Errorf("output lacks %q", want)
			}
		}
	})

	t.Run("a user without rights is told why", func(t *testing.T) {
		cfg, err := c.UserConfig("alice")
		if err != nil {
			t.Fatal(err)
		}
		_, err = deploy.Apply(ctx, cfg, objs, deploy.DryRunServer, func(deploy.Result) {})
		if err == nil || !strings.Contains(err.Error(), "Namespace ferry-system") || !strings.Contains(err.Error(), "cluster administrator") {
			t.Errorf("install as a user without rights: %v, want an error naming the object and the rights needed", err)
		}
	})
}
