// This file removes Ferry from a cluster: the agents first, then what they left
// in each node's kernel (the cleanup DaemonSet), then every other object.

package deploy

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
)

// UninstallOptions say what Uninstall removes and how long it waits.
type UninstallOptions struct {
	Options
	// SkipNodeCleanup leaves the agents' programs, maps and links in the nodes'
	// kernels (enrolled pods' connections keep being redirected to listeners
	// that no longer exist). Only for nodes cleaned by hand.
	SkipNodeCleanup bool
	// KeepCRDs keeps Ferry's CRDs and with them every policy users wrote.
	// Gateway API's CRDs are always kept.
	KeepCRDs bool
	// Timeout bounds each wait: agents gone, cleanup done on every node.
	Timeout time.Duration
	// Poll is how often waits look again; 2 s when zero.
	Poll time.Duration
}

// Names of the agent and cleanup DaemonSets.
const (
	AgentDaemonSet   = "ferry-agent"
	CleanupDaemonSet = "ferry-cleanup"
)

// Uninstall removes Ferry in the only order that leaves nodes clean: delete the
// agent DaemonSet and wait until its pods are gone (so no agent puts capture
// back), run the cleanup DaemonSet until it is ready on every node (each of its
// pods ran `ferry-agent --cleanup`), delete it, then delete the base's objects in
// reverse order. progress gets one line per step.
func Uninstall(ctx context.Context, cfg *rest.Config, opts UninstallOptions, progress func(string)) error {
	if opts.Timeout == 0 {
		opts.Timeout = 5 * time.Minute
	}
	if opts.Poll == 0 {
		opts.Poll = 2 * time.Second
	}
	objs, err := Render(opts.Options)
	if err != nil {
		return err
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("kubernetes client: %w", err)
	}
	dyn, mapper, err := dynamicClients(cfg)
	if err != nil {
		return err
	}
	dss := client.AppsV1().DaemonSets(Namespace)

	// 1. The agents.
	background := metav1.DeletePropagationBackground
	err = dss.Delete(ctx, AgentDaemonSet, metav1.DeleteOptions{PropagationPolicy: &background})
	switch {
	case apierrors.IsNotFound(err):
		progress(fmt.Sprintf("DaemonSet %s/%s: not there", Namespace, AgentDaemonSet))
	case err != nil:
		return fmt.Errorf("delete DaemonSet %s/%s: %w", Namespace, AgentDaemonSet, explain(err))
	default:
		progress(fmt.Sprintf("DaemonSet %s/%s: deleted; waiting for its pods to stop", Namespace, AgentDaemonSet))
	}
	selector := labels.SelectorFromSet(labels.Set{"app.kubernetes.io/name": AgentDaemonSet}).String()
	err = wait.PollUntilContextTimeout(ctx, opts.Poll, opts.Timeout, true, func(ctx context.Context) (bool, error) {
		pods, err := client.CoreV1().Pods(Namespace).List(ctx, metav1.ListOptions{LabelSelector: selector})
		if err != nil {
			return false, err
		}
		return len(pods.Items) == 0, nil
	})
	if err != nil {
		return fmt.Errorf("agent pods still there after %v (kubectl -n %s get pods -l %s): %w", opts.Timeout, Namespace, selector, err)
	}

	// 2. The nodes' kernels.
	if opts.SkipNodeCleanup {
		progress("node cleanup skipped: run ferry-agent --cleanup on each node (docs/install.md)")
	} else if err := cleanNodes(ctx, cfg, client, dyn, mapper, opts, progress); err != nil {
		return err
	}

	// 3. Everything else, dependents first.
	for _, obj := range slices.Backward(objs) {
		if obj.GetKind() == "DaemonSet" && obj.GetName() == AgentDaemonSet {
			continue // done above
		}
		if opts.KeepCRDs && obj.GetKind() == "CustomResourceDefinition" {
			progress(Ref(obj) + ": kept")
			continue
		}
		if obj.GetKind() == "CustomResourceDefinition" && strings.HasSuffix(obj.GetName(), "."+gatewayAPIGroup) {
			// Gateways and other meshes use the same CRDs; deleting one would
			// delete every route in the cluster.
			progress(Ref(obj) + ": kept (Gateway API's, shared with other controllers)")
			continue
		}
		if err := deleteObject(ctx, dyn, mapper, obj, progress); err != nil {
			return err
		}
	}
	return nil
}

// gatewayAPIGroup is the API group of the Gateway API CRDs the base installs.
const gatewayAPIGroup = "gateway.networking.k8s.io"

// cleanNodes applies the cleanup DaemonSet, waits until it is ready on every
// node it is scheduled to, and deletes it.
func cleanNodes(ctx context.Context, cfg *rest.Config, client kubernetes.Interface, dyn dynamic.Interface, mapper meta.RESTMapper,
	opts UninstallOptions, progress func(string)) error {
	cleanup, err := RenderCleanup(opts.Options)
	if err != nil {
		return err
	}
	if _, err := Apply(ctx, cfg, cleanup, DryRunNone, func(r Result) {
		progress(fmt.Sprintf("%s: %s; it runs ferry-agent --cleanup on every node", Ref(r.Object), r.Outcome))
	}); err != nil {
		return err
	}
	var last string
	err = wait.PollUntilContextTimeout(ctx, opts.Poll, opts.Timeout, true, func(ctx context.Context) (bool, error) {
		ds, err := client.AppsV1().DaemonSets(Namespace).Get(ctx, CleanupDaemonSet, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		s := ds.Status
		if s.ObservedGeneration < ds.Generation {
			return false, nil // the controller has not looked at it yet
		}
		line := fmt.Sprintf("nodes cleaned: %d of %d", s.NumberReady, s.DesiredNumberScheduled)
		if line != last {
			progress(line)
			last = line
		}
		return s.UpdatedNumberScheduled == s.DesiredNumberScheduled && s.NumberReady == s.DesiredNumberScheduled, nil
	})
	if err != nil {
		return fmt.Errorf("%s/%s is not ready on every node after %v (%s; kubectl -n %s get pods -l app.kubernetes.io/name=%s -o wide; "+
			"fix or clean those nodes by hand, then run again with --skip-node-cleanup): %w",
			Namespace, CleanupDaemonSet, opts.Timeout, last, Namespace, CleanupDaemonSet, err)
	}
	for _, obj := range cleanup {
		if err := deleteObject(ctx, dyn, mapper, obj, progress); err != nil {
			return err
		}
	}
	return nil
}

// dynamicClients returns a dynamic client and a REST mapper that reads
// discovery once and again when it meets a kind it does not know.
func dynamicClients(cfg *rest.Config) (dynamic.Interface, meta.ResettableRESTMapper, error) {
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return nil, nil, fmt.Errorf("dynamic client: %w", err)
	}
	dc, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		return nil, nil, fmt.Errorf("discovery client: %w", err)
	}
	return dyn, restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(dc)), nil
}

// deleteObject deletes obj (in the background: dependents are the garbage
// collector's) and reports it; an object already gone is reported, not an error.
func deleteObject(ctx context.Context, dyn dynamic.Interface, mapper meta.RESTMapper, obj *unstructured.Unstructured, progress func(string)) error {
	gvk := obj.GroupVersionKind()
	mapping, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
	if meta.IsNoMatchError(err) {
		progress(Ref(obj) + ": not there (its kind is not served)")
		return nil
	}
	if err != nil {
		return fmt.Errorf("%s: %w", Ref(obj), err)
	}
	var r dynamic.ResourceInterface = dyn.Resource(mapping.Resource)
	if mapping.Scope.Name() == meta.RESTScopeNameNamespace {
		r = dyn.Resource(mapping.Resource).Namespace(obj.GetNamespace())
	}
	background := metav1.DeletePropagationBackground
	err = r.Delete(ctx, obj.GetName(), metav1.DeleteOptions{PropagationPolicy: &background})
	switch {
	case apierrors.IsNotFound(err):
		progress(Ref(obj) + ": not there")
	case err != nil:
		return fmt.Errorf("delete %s: %w", Ref(obj), explain(err))
	default:
		progress(Ref(obj) + ": deleted")
	}
	return nil
}
