// This file applies rendered objects to a cluster with server-side apply, in
// order, reporting each one.

package deploy

import (
	"context"
	"errors"
	"fmt"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
)

// FieldManager is the server-side apply field manager of `ferry install`.
const FieldManager = "ferry"

// DryRun says how far Apply goes.
type DryRun string

// Dry-run modes, as kubectl's --dry-run.
const (
	// DryRunNone applies for real.
	DryRunNone DryRun = "none"
	// DryRunServer sends every object to the API server, which validates,
	// defaults and admits it but stores nothing.
	DryRunServer DryRun = "server"
)

// Outcome is what applying one object did.
type Outcome string

// Outcomes of applying one object.
const (
	Created    Outcome = "created"
	Configured Outcome = "configured"
	Unchanged  Outcome = "unchanged"
	// Skipped: a server dry run cannot check an object in a namespace that
	// does not exist yet (the same dry run only pretended to create it).
	Skipped Outcome = "skipped"
)

// Result is the outcome of applying one object.
type Result struct {
	// Object as sent; after a successful apply, as the server returned it.
	Object  *unstructured.Unstructured
	Outcome Outcome
	// Reason explains Skipped.
	Reason string
}

// Ref names an object for people: "Deployment ferry-system/ferry-operator",
// or "ClusterRole ferry-operator" when it has no namespace.
func Ref(o *unstructured.Unstructured) string {
	if ns := o.GetNamespace(); ns != "" {
		return o.GetKind() + " " + ns + "/" + o.GetName()
	}
	return o.GetKind() + " " + o.GetName()
}

// Apply applies objs in order with server-side apply (field manager
// FieldManager, taking over fields other managers own, as an installer must),
// calling progress after each object. It stops at the first error, which names
// the object.
func Apply(ctx context.Context, cfg *rest.Config, objs []*unstructured.Unstructured, dryRun DryRun, progress func(Result)) ([]Result, error) {
	dyn, mapper, err := dynamicClients(cfg)
	if err != nil {
		return nil, err
	}

	var opts metav1.ApplyOptions
	opts.FieldManager, opts.Force = FieldManager, true
	if dryRun == DryRunServer {
		opts.DryRun = []string{metav1.DryRunAll}
	}
	// Namespaces that this run creates only on paper (server dry run).
	pretend := map[string]bool{}
	var results []Result
	for _, obj := range objs {
		ref := Ref(obj)
		gvk := obj.GroupVersionKind()
		mapping, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if meta.IsNoMatchError(err) {
			// A kind from a CRD applied earlier in this run: look again.
			mapper.Reset()
			mapping, err = mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		}
		if err != nil {
			return results, fmt.Errorf("%s: %w", ref, err)
		}
		var client dynamic.ResourceInterface = dyn.Resource(mapping.Resource)
		if mapping.Scope.Name() == meta.RESTScopeNameNamespace {
			if pretend[obj.GetNamespace()] {
				r := Result{Object: obj, Outcome: Skipped,
					Reason: fmt.Sprintf("namespace %s does not exist yet, so the server cannot check objects in it", obj.GetNamespace())}
				results = append(results, r)
				progress(r)
				continue
			}
			client = dyn.Resource(mapping.Resource).Namespace(obj.GetNamespace())
		}
		before, err := client.Get(ctx, obj.GetName(), metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(err):
			before = nil
		case err != nil:
			return results, fmt.Errorf("%s: get: %w", ref, explain(err))
		}
		after, err := client.Apply(ctx, obj.GetName(), obj, opts)
		if err != nil {
			return results, fmt.Errorf("%s: apply: %w", ref, explain(err))
		}
		r := Result{Object: after, Outcome: Configured}
		switch {
		case before == nil:
			r.Outcome = Created
			if dryRun == DryRunServer && gvk.Group == "" && gvk.Kind == "Namespace" {
				pretend[obj.GetName()] = true
			}
		case before.GetResourceVersion() == after.GetResourceVersion():
			r.Outcome = Unchanged
		}
		results = append(results, r)
		progress(r)
	}
	return results, nil
}

// explain adds what to do to errors a user can fix.
func explain(err error) error {
	switch {
	case apierrors.IsForbidden(err):
		return fmt.Errorf("%w (installing Ferry creates cluster-wide RBAC and CRDs: it needs a cluster administrator's credentials)", err)
	case errors.Is(err, context.DeadlineExceeded):
		return fmt.Errorf("%w (is the API server reachable?)", err)
	}
	return err
}
