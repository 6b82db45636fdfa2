package operator

// Route status in a cluster: Gateway API asks the controller of a route's parent
// to report, in status.parents, whether it accepted the route and resolved its
// references. Ferry is the controller of Service parents (GAMMA).

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/ferrymesh/ferry/api/ferryv1"
	"github.com/ferrymesh/ferry/operator/mesh"
	"google.golang.org/protobuf/proto"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
)

// A status that could not be written is tried again after statusRetry, doubling
// up to statusRetryMax while writes keep failing (RBAC fixed later, API server
// down), so a lasting failure is not logged every second.
const (
	statusRetry    = time.Second
	statusRetryMax = 30 * time.Second
)

// writeRouteStatus writes every route's conditions to its status whenever the
// mesh view's verdict on it changes, while this replica leads, until ctx ends.
// What it wrote is remembered so that an unchanged verdict costs no API call, and
// a status already as wanted is not written again (no write loops with the
// informer that sees the write).
func (o *Operator) writeRouteStatus(ctx context.Context) {
	written := map[string]*ferryv1.ConfigStatus{}
	var retry <-chan time.Time
	delay := statusRetry
	for {
		snap, changed := o.view.Current()
		if !o.leader.Load() {
			clear(written) // a new leader checks everything again
		} else if snap != nil {
			failed := false
			current := map[string]bool{}
			for _, cs := range snap.ConfigStatus {
				gvr, ok := routeResource(cs.Kind)
				if !ok {
					continue
				}
				key := cs.Kind + " " + cs.Name
				current[key] = true
				if proto.Equal(written[key], cs) {
					continue
				}
				if err := o.writeStatus(ctx, gvr, cs); err != nil {
					if ctx.Err() != nil {
						return
					}
					o.log.Warn("route status not written; retrying", "route", key, "error", err, "retry_in", delay)
					failed = true
					continue
				}
				written[key] = cs
			}
			for key := range written {
				if !current[key] {
					delete(written, key) // the route is gone
				}
			}
			retry = nil
			if failed {
				retry = time.After(delay)
				delay = min(2*delay, statusRetryMax)
			} else {
				delay = statusRetry
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-changed:
		case <-retry:
		case <-time.After(o.cfg.RetryPeriod):
			// Leadership changes without a new snapshot.
		}
	}
}

func routeResource(kind string) (schema.GroupVersionResource, bool) {
	switch kind {
	case mesh.KindHTTPRoute:
		return mesh.HTTPRouteResource(), true
	case mesh.KindGRPCRoute:
		return mesh.GRPCRouteResource(), true
	}
	return schema.GroupVersionResource{}, false
}

// writeStatus makes the route's status.parents entries for its Service parents say
// what cs says, leaving other controllers' entries alone.
func (o *Operator) writeStatus(ctx context.Context, gvr schema.GroupVersionResource, cs *ferryv1.ConfigStatus) error {
	ns, name, ok := cutName(cs.Name)
	if !ok {
		return fmt.Errorf("route name %q: not namespace/name", cs.Name)
	}
	res := o.policies.Resource(gvr).Namespace(ns)
	u, err := res.Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil // deleted since; nothing to report on
	}
	if err != nil {
		return fmt.Errorf("get: %w", err)
	}
	if uint64(u.GetGeneration()) != cs.Generation {
		return nil // a newer generation is on its way to the view
	}
	var spec gatewayv1.CommonRouteSpec
	if m, ok := u.Object["spec"].(map[string]any); ok {
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(m, &spec); err != nil {
			return fmt.Errorf("spec: %w", err)
		}
	}
	var status gatewayv1.RouteStatus
	if m, ok := u.Object["status"].(map[string]any); ok {
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(m, &status); err != nil {
			return fmt.Errorf("status: %w", err)
		}
	}
	want, changed := routeParents(status.Parents, spec.ParentRefs, cs, metav1.Now())
	if !changed {
		return nil
	}
	status.Parents = want
	m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(&status)
	if err != nil {
		return fmt.Errorf("status: %w", err)
	}
	u.Object["status"] = m
	if _, err := res.UpdateStatus(ctx, u, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("update status: %w", err)
	}
	return nil
}

// routeParents is status.parents with Ferry's entries (one per Service parentRef)
// set from cs, and whether that differs from have. A condition keeps its
// lastTransitionTime while its status stays.
func routeParents(have []gatewayv1.RouteParentStatus, refs []gatewayv1.ParentReference, cs *ferryv1.ConfigStatus, now metav1.Time) ([]gatewayv1.RouteParentStatus, bool) {
	var out, ours []gatewayv1.RouteParentStatus
	for _, p := range have {
		if p.ControllerName == mesh.ControllerName {
			ours = append(ours, p)
		} else {
			out = append(out, p)
		}
	}
	var want []gatewayv1.RouteParentStatus
	for _, ref := range refs {
		if !mesh.ServiceParent(ref) {
			continue
		}
		ps := gatewayv1.RouteParentStatus{ParentRef: ref, ControllerName: mesh.ControllerName}
		var before []metav1.Condition
		for _, p := range ours {
			if equality.Semantic.DeepEqual(p.ParentRef, ref) {
				before = p.Conditions
			}
		}
		for _, c := range cs.Conditions {
			mc := metav1.Condition{Type: c.Type, Status: metav1.ConditionFalse, Reason: c.Reason, Message: c.Message,
				ObservedGeneration: int64(cs.Generation), LastTransitionTime: now}
			if c.Status {
				mc.Status = metav1.ConditionTrue
			}
			for _, b := range before {
				if b.Type == mc.Type && b.Status == mc.Status {
					mc.LastTransitionTime = b.LastTransitionTime
				}
			}
			ps.Conditions = append(ps.Conditions, mc)
		}
		want = append(want, ps)
	}
	return append(out, want...), !equality.Semantic.DeepEqual(ours, want)
}

func cutName(s string) (string, string, bool) {
	ns, name, ok := strings.Cut(s, "/")
	return ns, name, ok && ns != "" && name != ""
}
