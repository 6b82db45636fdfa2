package deploy_test

import (
	"bytes"
	"context"
	"encoding/json"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/api/v1alpha1"
	"github.com/ferrymesh/ferry/deploy"
	"github.com/ferrymesh/ferry/internal/kubetest"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/dynamic"
)

// kubectl runs the test cluster's kubectl in this folder (deploy/) and returns
// its combined output.
func kubectl(t *testing.T, c *kubetest.Cluster, args ...string) (string, error) {
	t.Helper()
	cmd := exec.CommandContext(t.Context(), c.Kubectl, append([]string{"--kubeconfig", c.Kubeconfig}, args...)...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func TestDeploy(t *testing.T) {
	c := kubetest.Start(t)

	t.Run("kubectl kustomize renders what ferry install renders", func(t *testing.T) {
		out, err := exec.CommandContext(t.Context(), c.Kubectl, "kustomize", ".").Output()
		if err != nil {
			t.Fatalf("kubectl kustomize deploy/: %v", err)
		}
		embedded, err := deploy.YAML(deploy.Options{})
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(out, embedded) {
			t.Errorf("kubectl kustomize deploy/ and deploy.YAML differ:\n--- kubectl\n%s\n--- embedded\n%s", out, embedded)
		}
	})

	t.Run("client-side kubectl apply is refused for Gateway API's CRDs alone", func(t *testing.T) {
		out, err := kubectl(t, c, "apply", "--dry-run=server", "-f", "gateway-api/")
		if err == nil || !strings.Contains(out, "Too long") {
			t.Errorf("kubectl apply -f gateway-api/ = %v; the README says client-side apply fails, but:\n%s", err, out)
		}
	})

	// On a cluster without ferry-system, a server dry run can only pretend to
	// create the namespace, and the server then refuses everything in it. That
	// is kubectl's behaviour for any base with a Namespace; docs/install.md says
	// to create the namespace first when checking.
	t.Run("kubectl apply --dry-run=server on a fresh cluster names the missing namespace", func(t *testing.T) {
		out, err := kubectl(t, c, "apply", "--dry-run=server", "-k", ".")
		if err == nil || !strings.Contains(out, `namespaces "ferry-system" not found`) {
			t.Errorf("kubectl apply --dry-run=server -k deploy/ = %v, want a failure naming the namespace:\n%s", err, out)
		}
	})

	t.Run("kubectl apply --dry-run=server", func(t *testing.T) {
		if out, err := kubectl(t, c, "create", "namespace", deploy.Namespace, "--save-config"); err != nil {
			t.Fatalf("kubectl create namespace: %v\n%s", err, out)
		}
		// Server-side only: Gateway API's CRDs are too large for client-side
		// apply's last-applied annotation (gateway-api/README.md).
		for _, mode := range [][]string{{"apply", "--server-side"}, {"apply", "--server-side", "--force-conflicts"}} {
			args := append(mode, "--dry-run=server", "-k", ".")
			out, err := kubectl(t, c, args...)
			t.Logf("kubectl %s:\n%s", strings.Join(args, " "), out)
			if err != nil {
				t.Fatalf("kubectl %s: %v", strings.Join(args, " "), err)
			}
			objs, err := deploy.Render(deploy.Options{})
			if err != nil {
				t.Fatal(err)
			}
			if got := strings.Count(out, "(server dry run)"); got != len(objs) {
				t.Errorf("kubectl accepted %d objects, want all %d", got, len(objs))
			}
			// kubectl's own bookkeeping on the namespace created above
			// (last-applied-configuration) aside, the server has nothing to say.
			for _, line := range strings.Split(out, "\n") {
				if strings.HasPrefix(line, "Warning") && !strings.Contains(line, "last-applied-configuration") {
					t.Errorf("the server warned about the manifests: %s", line)
				}
			}
		}
	})

	t.Run("kubectl apply --dry-run=server -k cleanup/", func(t *testing.T) {
		out, err := kubectl(t, c, "apply", "--dry-run=server", "-k", "cleanup")
		t.Logf("kubectl apply --dry-run=server -k deploy/cleanup:\n%s", out)
		if err != nil || !strings.Contains(out, "daemonset.apps/ferry-cleanup created (server dry run)") {
			t.Fatalf("kubectl apply --dry-run=server -k deploy/cleanup: %v", err)
		}
	})

	t.Run("CRD schemas accept every field of the Go types", func(t *testing.T) {
		if out, err := kubectl(t, c, "apply", "--server-side", "-f", "crds/"); err != nil {
			t.Fatalf("kubectl apply -f crds/: %v\n%s", err, out)
		}
		if out, err := kubectl(t, c, "wait", "--for=condition=Established", "--timeout=60s",
			"crd/authorizationpolicies.ferry.io", "crd/peerauthentications.ferry.io", "crd/trafficpolicies.ferry.io"); err != nil {
			t.Fatalf("kubectl wait: %v\n%s", err, out)
		}
		if _, err := c.CreateNamespace(t.Context(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop"}}); err != nil {
			t.Fatal(err)
		}
		dyn, err := dynamic.NewForConfig(c.RestConfig)
		if err != nil {
			t.Fatal(err)
		}
		for _, tc := range []struct {
			resource string
			obj      runtime.Object
		}{
			{"authorizationpolicies", fullAuthorizationPolicy()},
			{"peerauthentications", fullPeerAuthentication()},
			{"trafficpolicies", fullTrafficPolicy()},
		} {
			// Through JSON: the unstructured converter cannot write maps with
			// number keys (PeerAuthentication's portLevelMtls).
			b, err := json.Marshal(tc.obj)
			if err != nil {
				t.Fatal(err)
			}
			u := &unstructured.Unstructured{}
			if err := u.UnmarshalJSON(b); err != nil {
				t.Fatal(err)
			}
			gvr := v1alpha1.GroupVersion().WithResource(tc.resource)
			// The CRD's discovery may lag its Established condition by a moment.
			var created *unstructured.Unstructured
			err = wait.PollUntilContextTimeout(t.Context(), 200*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
				created, err = dyn.Resource(gvr).Namespace("shop").Create(ctx, u, metav1.CreateOptions{FieldValidation: "Strict"})
				if apierrors.IsNotFound(err) {
					return false, nil
				}
				return true, err
			})
			if err != nil {
				t.Errorf("create %s with strict field validation: %v", tc.resource, err)
				continue
			}
			// Nothing the Go types set was pruned by the schema.
			if !equalJSON(t, u.Object["spec"], created.Object["spec"]) {
				t.Errorf("%s spec changed on the server:\nsent %v\ngot  %v", tc.resource, u.Object["spec"], created.Object["spec"])
			}
		}

		bad := fullAuthorizationPolicy()
		bad.Name, bad.Spec.Action = "bad", "Maybe"
		m, _ := runtime.DefaultUnstructuredConverter.ToUnstructured(bad)
		_, err = dyn.Resource(v1alpha1.GroupVersion().WithResource("authorizationpolicies")).Namespace("shop").
			Create(t.Context(), &unstructured.Unstructured{Object: m}, metav1.CreateOptions{})
		if !apierrors.IsInvalid(err) || !strings.Contains(err.Error(), "spec.action") {
			t.Errorf("create AuthorizationPolicy with action Maybe: %v, want invalid spec.action", err)
		}
	})
}
