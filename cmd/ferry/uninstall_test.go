package main

import (
	"bytes"
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/deploy"
	"github.com/ferrymesh/ferry/internal/kubetest"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
)

func TestUninstall(t *testing.T) {
	c := kubetest.Start(t)
	ctx := t.Context()
	client, err := kubernetes.NewForConfig(c.RestConfig)
	if err != nil {
		t.Fatal(err)
	}
	kubeconfig := "--kubeconfig=" + c.Kubeconfig
	if _, err := ferryCLI(t, newInstallCommand, kubeconfig); err != nil {
		t.Fatalf("ferry install: %v", err)
	}

	t.Run("asks first", func(t *testing.T) {
		cmd := newUninstallCommand()
		var out bytes.Buffer
		cmd.SetOut(&out)
		cmd.SetIn(strings.NewReader("n\n"))
		cmd.SetArgs([]string{kubeconfig})
		cmd.SilenceUsage, cmd.SilenceErrors = true, true
		err := cmd.ExecuteContext(ctx)
		if err == nil || !strings.Contains(err.Error(), "uninstall cancelled") {
			t.Errorf("ferry uninstall answered n: %v, want cancelled", err)
		}
		if !strings.Contains(out.String(), "with every AuthorizationPolicy, PeerAuthentication and TrafficPolicy. Continue? [y/N]") {
			t.Errorf("the question does not say policies go too: %q", out.String())
		}
		if _, err := client.AppsV1().DaemonSets(deploy.Namespace).Get(ctx, deploy.AgentDaemonSet, metav1.GetOptions{}); err != nil {
			t.Errorf("agent DaemonSet after a cancelled uninstall: %v", err)
		}
	})

	t.Run("removes everything, nodes cleaned first", func(t *testing.T) {
		// There is no DaemonSet controller here: play it, and report the
		// cleanup DaemonSet ready on two nodes once it exists.
		pctx, stop := context.WithCancel(ctx)
		var wg sync.WaitGroup
		wg.Go(func() {
			_ = wait.PollUntilContextCancel(pctx, 50*time.Millisecond, true, func(ctx context.Context) (bool, error) {
				ds, err := client.AppsV1().DaemonSets(deploy.Namespace).Get(ctx, deploy.CleanupDaemonSet, metav1.GetOptions{})
				if err != nil {
					return false, nil
				}
				ds.Status.ObservedGeneration = ds.Generation
				ds.Status.DesiredNumberScheduled, ds.Status.UpdatedNumberScheduled, ds.Status.NumberReady = 2, 2, 2
				_, err = client.AppsV1().DaemonSets(deploy.Namespace).UpdateStatus(ctx, ds, metav1.UpdateOptions{})
				return err == nil, nil
			})
		})
		defer func() {
			stop()
			wg.Wait()
		}()
		out, err := ferryCLI(t, newUninstallCommand, kubeconfig, "--yes", "--timeout=60s")
		if err != nil {
			t.Fatalf("ferry uninstall: %v", err)
		}
		// In this order.
		rest := out
		for _, want := range []string{
			"DaemonSet ferry-system/ferry-agent: deleted; waiting for its pods to stop",
			"DaemonSet ferry-system/ferry-cleanup: created; it runs ferry-agent --cleanup on every node",
			"nodes cleaned: 2 of 2",
			"DaemonSet ferry-system/ferry-cleanup: deleted",
			"Deployment ferry-system/ferry-operator: deleted",
			"ClusterRole ferry-operator: deleted",
			"CustomResourceDefinition authorizationpolicies.ferry.io: deleted",
			"Namespace ferry-system: deleted",
			"Ferry uninstalled.",
		} {
			i := strings.Index(rest, want)
			if i < 0 {
				t.Fatalf("output lacks %q after what came before", want)
			}
			rest = rest[i+len(want):]
		}
		if _, err := client.RbacV1().ClusterRoles().Get(ctx, "ferry-operator", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
			t.Errorf("ClusterRole ferry-operator after uninstall: %v, want not found", err)
		}
		ns, err := client.CoreV1().Namespaces().Get(ctx, deploy.Namespace, metav1.GetOptions{})
		if err == nil && ns.DeletionTimestamp == nil {
			t.Errorf("namespace %s is not being deleted", deploy.Namespace)
		}
	})
}
