package deploy_test

import (
	"bytes"
	"context"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/deploy"
	"github.com/ferrymesh/ferry/internal/kubetest"
	"github.com/ferrymesh/ferry/operator"
	authenticationv1 "k8s.io/api/authentication/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// lockedBuffer collects the operator's log from its goroutines.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestRBAC installs the base and checks, as the API server's authorizer sees
// it, what each service account may do: the operator exactly what it needs,
// the agent nothing. Then it runs the real operator with the operator
// account's token and checks it becomes leader and ready without being refused
// anything.
func TestRBAC(t *testing.T) {
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
	if _, err := deploy.Apply(ctx, c.RestConfig, objs, deploy.DryRunNone, func(deploy.Result) {}); err != nil {
		t.Fatal(err)
	}

	const (
		operatorSA = "system:serviceaccount:ferry-system:ferry-operator"
		agentSA    = "system:serviceaccount:ferry-system:ferry-agent"
	)
	for _, tc := range []struct {
		user, verb, group, resource, namespace, name string
		allowed                                      bool
	}{
		{operatorSA, "watch", "", "pods", "", "", true},
		{operatorSA, "list", "", "namespaces", "", "", true},
		{operatorSA, "list", "", "services", "shop", "", true},
		{operatorSA, "watch", "", "serviceaccounts", "", "", true},
		{operatorSA, "watch", "discovery.k8s.io", "endpointslices", "", "", true},
		{operatorSA, "watch", "gateway.networking.k8s.io", "httproutes", "", "", true},
		{operatorSA, "watch", "gateway.networking.k8s.io", "grpcroutes", "", "", true},
		{operatorSA, "list", "gateway.networking.k8s.io", "referencegrants", "", "", true},
		{operatorSA, "update", "gateway.networking.k8s.io", "httproutes/status", "shop", "", true},
		{operatorSA, "update", "gateway.networking.k8s.io", "grpcroutes/status", "shop", "", true},
		{operatorSA, "watch", "ferry.io", "authorizationpolicies", "", "", true},
		{operatorSA, "watch", "ferry.io", "peerauthentications", "", "", true},
		{operatorSA, "watch", "ferry.io", "trafficpolicies", "", "", true},
		{operatorSA, "create", "authentication.k8s.io", "tokenreviews", "", "", true},
		{operatorSA, "create", "", "secrets", "ferry-system", "", true},
		{operatorSA, "get", "", "secrets", "ferry-system", "", true},
		{operatorSA, "create", "", "configmaps", "ferry-system", "", true},
		{operatorSA, "create", "coordination.k8s.io", "leases", "ferry-system", "", true},
		{operatorSA, "update", "", "configmaps", "ferry-system", "ferry-ca-bundle", true},
		{operatorSA, "update", "coordination.k8s.io", "leases", "ferry-system", "ferry-operator", true},
		// Never beyond its namespace or its needs.
		{operatorSA, "update", "", "secrets", "ferry-system", "", false},
		{operatorSA, "list", "", "configmaps", "ferry-system", "", false},
		{operatorSA, "update", "", "configmaps", "ferry-system", "", false},                // only ferry-ca-bundle
		{operatorSA, "update", "coordination.k8s.io", "leases", "ferry-system", "", false}, // only ferry-operator
		{operatorSA, "list", "", "secrets", "ferry-system", "", false},
		{operatorSA, "get", "", "secrets", "kube-system", "", false},
		{operatorSA, "update", "", "configmaps", "kube-system", "", false},
		{operatorSA, "update", "", "pods", "shop", "", false},
		{operatorSA, "delete", "", "namespaces", "", "", false},
		{operatorSA, "update", "ferry.io", "authorizationpolicies", "shop", "", false},
		{operatorSA, "update", "gateway.networking.k8s.io", "httproutes", "shop", "", false}, // status only
		{operatorSA, "update", "gateway.networking.k8s.io", "referencegrants/status", "shop", "", false},
		{operatorSA, "create", "", "serviceaccounts/token", "shop", "", false},
		// The agent talks to the operator only.
		{agentSA, "get", "", "pods", "", "", false},
		{agentSA, "get", "", "configmaps", "ferry-system", "", false},
		{agentSA, "create", "authentication.k8s.io", "tokenreviews", "", "", false},
	} {
		resource, subresource, _ := strings.Cut(tc.resource, "/")
		sar, err := client.AuthorizationV1().SubjectAccessReviews().Create(ctx, &authorizationv1.SubjectAccessReview{
			Spec: authorizationv1.SubjectAccessReviewSpec{
				User:   tc.user,
				Groups: []string{"system:serviceaccounts", "system:serviceaccounts:ferry-system", "system:authenticated"},
				ResourceAttributes: &authorizationv1.ResourceAttributes{
					Verb: tc.verb, Group: tc.group, Resource: resource, Subresource: subresource, Namespace: tc.namespace, Name: tc.name,
				},
			},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if sar.Status.Allowed != tc.allowed {
			sa := tc.user[strings.LastIndex(tc.user, ":")+1:]
			t.Errorf("%s may %s %s.%s %q in %q: %v, want %v", sa, tc.verb, tc.resource, tc.group, tc.name, tc.namespace, sar.Status.Allowed, tc.allowed)
		}
	}

	t.Run("the operator runs with only these rights", func(t *testing.T) {
		tok, err := client.CoreV1().ServiceAccounts(deploy.Namespace).CreateToken(ctx, "ferry-operator",
			&authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{}}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		kubeconfig := filepath.Join(t.TempDir(), "operator.kubeconfig")
		err = clientcmd.WriteToFile(clientcmdapi.Config{
			Clusters:       map[string]*clientcmdapi.Cluster{"kubetest": {Server: c.URL, CertificateAuthorityData: c.RestConfig.CAData}},
			AuthInfos:      map[string]*clientcmdapi.AuthInfo{"ferry-operator": {Token: tok.Status.Token}},
			Contexts:       map[string]*clientcmdapi.Context{"kubetest": {Cluster: "kubetest", AuthInfo: "ferry-operator"}},
			CurrentContext: "kubetest",
		}, kubeconfig)
		if err != nil {
			t.Fatal(err)
		}
		var logs lockedBuffer
		log := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
		// The Deployment's arguments, with loopback addresses for the test.
		op, err := operator.New(operator.Config{
			Kubeconfig:  kubeconfig,
			Namespace:   deploy.Namespace,
			GRPCAddr:    "127.0.0.1:0",
			TrustDomain: "cluster.local",
			CASecret:    "ferry-ca",
			LeaderElect: true,
			Identity:    "ferry-operator-test",
			CertTTL:     24 * time.Hour,
		}, log)
		if err != nil {
			t.Fatal(err)
		}
		if err := op.Start(ctx); err != nil {
			t.Fatal(err)
		}
		defer op.Stop(context.Background())
		err = wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, 60*time.Second, true, func(context.Context) (bool, error) {
			return op.Leader() && op.Ready(), nil
		})
		if err != nil {
			t.Fatalf("operator not leader and ready: %v\n%s", err, logs.String())
		}
		if _, err := client.CoreV1().Secrets(deploy.Namespace).Get(ctx, "ferry-ca", metav1.GetOptions{}); err != nil {
			t.Errorf("CA Secret: %v", err)
		}
		err = wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
			cm, err := client.CoreV1().ConfigMaps(deploy.Namespace).Get(ctx, operator.BundleConfig, metav1.GetOptions{})
			return err == nil && cm.Data[operator.BundleKey] != "", nil
		})
		if err != nil {
			t.Errorf("CA bundle ConfigMap %s not published: %v", operator.BundleConfig, err)
		}
		if strings.Contains(strings.ToLower(logs.String()), "forbidden") {
			t.Errorf("the operator was refused something:\n%s", logs.String())
		}
		t.Logf("operator log:\n%s", logs.String())
	})
}
