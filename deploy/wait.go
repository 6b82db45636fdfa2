// This file waits for an installed Ferry to run: the operator's replicas
// available and an up-to-date agent ready on every node.

package deploy

import (
	"context"
	"fmt"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// OperatorDeployment names the operator's Deployment.
const OperatorDeployment = "ferry-operator"

// WaitReady waits until the operator Deployment has all its replicas updated
// and available and the agent DaemonSet an updated, ready pod on every node it
// is scheduled to, as `kubectl rollout status` does. progress gets a line each
// time the counts change. poll 0 means every 2 s.
func WaitReady(ctx context.Context, cfg *rest.Config, timeout, poll time.Duration, progress func(string)) error {
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("kubernetes client: %w", err)
	}
	if poll == 0 {
		poll = 2 * time.Second
	}
	var last string
	err = wait.PollUntilContextTimeout(ctx, poll, timeout, true, func(ctx context.Context) (bool, error) {
		d, err := client.AppsV1().Deployments(Namespace).Get(ctx, OperatorDeployment, metav1.GetOptions{})
		if err != nil {
			return false, fmt.Errorf("Deployment %s/%s: %w", Namespace, OperatorDeployment, err)
		}
		ds, err := client.AppsV1().DaemonSets(Namespace).Get(ctx, AgentDaemonSet, metav1.GetOptions{})
		if err != nil {
			return false, fmt.Errorf("DaemonSet %s/%s: %w", Namespace, AgentDaemonSet, err)
		}
		want := int32(1)
		if d.Spec.Replicas != nil {
			want = *d.Spec.Replicas
		}
		opDone := d.Status.ObservedGeneration >= d.Generation && d.Status.UpdatedReplicas == want && d.Status.AvailableReplicas == want
		agDone := ds.Status.ObservedGeneration >= ds.Generation && ds.Status.UpdatedNumberScheduled == ds.Status.DesiredNumberScheduled &&
			ds.Status.NumberReady == ds.Status.DesiredNumberScheduled
		line := fmt.Sprintf("operator: %d of %d replicas available; agents: %d of %d nodes ready",
			d.Status.AvailableReplicas, want, ds.Status.NumberReady, ds.Status.DesiredNumberScheduled)
		if ds.Status.ObservedGeneration < ds.Generation || d.Status.ObservedGeneration < d.Generation {
			line += " (the controllers have not seen the change yet)"
		}
		if line != last {
			progress(line)
			last = line
		}
		return opDone && agDone, nil
	})
	if err != nil {
		return fmt.Errorf("not ready after %v (%s; kubectl -n %s get pods -o wide shows which): %w", timeout, last, Namespace, err)
	}
	return nil
}
