package kubetest_test

import (
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/ferrymesh/ferry/internal/kubetest"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

func TestCluster(t *testing.T) {
	c := kubetest.Start(t)
	ctx := t.Context()
	client, err := kubernetes.NewForConfig(c.RestConfig)
	if err != nil {
		t.Fatal(err)
	}

	t.Run("version", func(t *testing.T) {
		v, err := client.Discovery().ServerVersion()
		if err != nil {
			t.Fatal(err)
		}
		if v.GitVersion != "v1.37.2" || v.Major != "1" || v.Minor != "37" {
			t.Errorf("server version = %q (major %q, minor %q), want v1.37.2 from build-kube.sh's -ldflags", v.GitVersion, v.Major, v.Minor)
		}
	})

	t.Run("kubeconfig", func(t *testing.T) {
		cfg, err := clientcmd.BuildConfigFromFlags("", c.Kubeconfig)
		if err != nil {
			t.Fatal(err)
		}
		kc, err := kubernetes.NewForConfig(cfg)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := kc.CoreV1().Namespaces().Get(ctx, "default", metav1.GetOptions{}); err != nil {
			t.Errorf("get namespace default with %s: %v", c.Kubeconfig, err)
		}
	})

	t.Run("kubectl", func(t *testing.T) {
		out, err := exec.CommandContext(ctx, c.Kubectl, "--kubeconfig", c.Kubeconfig, "version").CombinedOutput()
		if err != nil {
			t.Fatalf("kubectl version: %v\n%s", err, out)
		}
		for _, want := range []string{"Client Version: v1.37.2", "Server Version: v1.37.2"} {
			if !strings.Contains(string(out), want) {
				t.Errorf("kubectl version printed %q, want a line %q", out, want)
			}
		}
	})

	ns, err := c.CreateNamespace(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{
		Name:   "shop",
		Labels: map[string]string{"ferry.io/mesh": "enabled"},
	}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := client.CoreV1().ServiceAccounts(ns.Name).Create(ctx,
		&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "cart"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	// A pod as the lab creates it: bound to a node by hand (there is no
	// scheduler), its IP written into the status (there is no kubelet).
	pod, err := client.CoreV1().Pods(ns.Name).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "cart-0", Labels: map[string]string{"app": "cart"}},
		Spec: corev1.PodSpec{
			NodeName:           "node-a",
			ServiceAccountName: "cart",
			Containers:         []corev1.Container{{Name: "app", Image: "registry.invalid/cart:1"}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pod.Status.PodIP = "10.244.1.5"
	pod.Status.PodIPs = []corev1.PodIP{{IP: "10.244.1.5"}}
	if _, err := client.CoreV1().Pods(ns.Name).UpdateStatus(ctx, pod, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	got, err := client.CoreV1().Pods(ns.Name).Get(ctx, "cart-0", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got.Spec.NodeName != "node-a" || got.Spec.ServiceAccountName != "cart" || got.Status.PodIP != "10.244.1.5" {
		t.Errorf("pod read back: node %q, service account %q, IP %q; want node-a, cart, 10.244.1.5",
			got.Spec.NodeName, got.Spec.ServiceAccountName, got.Status.PodIP)
	}

	t.Run("default service account", func(t *testing.T) {
		for _, namespace := range []string{ns.Name, metav1.NamespaceDefault, metav1.NamespaceSystem} {
			p, err := client.CoreV1().Pods(namespace).Create(ctx, &corev1.Pod{
				ObjectMeta: metav1.ObjectMeta{Name: "plain"},
				Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "registry.invalid/plain:1"}}},
			}, metav1.CreateOptions{})
			if err != nil {
				t.Errorf("create pod with no service account in %s: %v", namespace, err)
				continue
			}
			if p.Spec.ServiceAccountName != "default" {
				t.Errorf("%s: service account = %q, want default", namespace, p.Spec.ServiceAccountName)
			}
		}
	})

	// How the operator will authenticate an agent: a token bound to the
	// agent's pod, checked with TokenReview, which names the pod and its node.
	t.Run("token review", func(t *testing.T) {
		const audience = "ferry-operator"
		tr, err := client.CoreV1().ServiceAccounts(ns.Name).CreateToken(ctx, "cart", &authenticationv1.TokenRequest{
			Spec: authenticationv1.TokenRequestSpec{
				Audiences:         []string{audience},
				ExpirationSeconds: new(int64(600)),
				BoundObjectRef:    &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: got.Name, UID: got.UID},
			},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		review := func(token string, audiences ...string) authenticationv1.TokenReviewStatus {
			t.Helper()
			r, err := client.AuthenticationV1().TokenReviews().Create(ctx, &authenticationv1.TokenReview{
				Spec: authenticationv1.TokenReviewSpec{Token: token, Audiences: audiences},
			}, metav1.CreateOptions{})
			if err != nil {
				t.Fatal(err)
			}
			return r.Status
		}

		st := review(tr.Status.Token, audience)
		if !st.Authenticated {
			t.Fatalf("token not authenticated: %s", st.Error)
		}
		if want := "system:serviceaccount:shop:cart"; st.User.Username != want {
			t.Errorf("user = %q, want %q", st.User.Username, want)
		}
		if !slices.Equal(st.Audiences, []string{audience}) {
			t.Errorf("audiences = %v, want [%s]", st.Audiences, audience)
		}
		for key, want := range map[string]string{
			"authentication.kubernetes.io/pod-name":  "cart-0",
			"authentication.kubernetes.io/node-name": "node-a",
		} {
			if v := st.User.Extra[key]; len(v) != 1 || v[0] != want {
				t.Errorf("extra %s = %v, want [%s]", key, v, want)
			}
		}

		if st := review(tr.Status.Token, "someone-else"); st.Authenticated {
			t.Errorf("token for %q accepted for audience someone-else", audience)
		}
		if st := review(tr.Status.Token); st.Authenticated {
			t.Errorf("token for %q accepted for the API server's own audience %s", audience, kubetest.Issuer)
		}
	})

	t.Run("rbac", func(t *testing.T) {
		cfg, err := c.UserConfig("alice", "developers")
		if err != nil {
			t.Fatal(err)
		}
		alice, err := kubernetes.NewForConfig(cfg)
		if err != nil {
			t.Fatal(err)
		}
		_, err = alice.CoreV1().Pods(ns.Name).List(ctx, metav1.ListOptions{})
		if !apierrors.IsForbidden(err) {
			t.Errorf("list pods as a user with no role: err = %v, want forbidden", err)
		}
	})
}
