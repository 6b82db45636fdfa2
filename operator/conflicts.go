// This file tells users of the address conflicts the mesh view resolved
// (mesh.Conflict): a Warning Event on each pod withheld (cluster mode; local mode
// has the view's log line), and the ferry_operator_conflicts gauge.

package operator

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/ferrymesh/ferry/operator/mesh"
	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// reportConflicts posts a Warning Event on every pod a new conflict withholds,
// while this replica leads, until ctx ends. An Event is a notice, not state: one
// that fails to post is logged and not retried.
func (o *Operator) reportConflicts(ctx context.Context) {
	told := map[string]bool{} // conflict text → posted
	for {
		snap, changed := o.view.Current()
		if snap != nil && o.leader.Load() {
			now := map[string]bool{}
			for _, c := range snap.Conflicts {
				msg := c.String()
				now[msg] = true
				if told[msg] {
					continue
				}
				for _, pod := range c.Withheld {
					if err := o.postConflictEvent(ctx, pod, msg); err != nil {
						o.log.Warn("conflict event not posted", "pod", pod, "error", err)
					}
				}
			}
			told = now
		}
		select {
		case <-ctx.Done():
			return
		case <-changed:
		case <-time.After(o.cfg.RetryPeriod): // leadership changes without a new snapshot
		}
	}
}

func (o *Operator) postConflictEvent(ctx context.Context, pod, msg string) error {
	ns, name, _ := strings.Cut(pod, "/")
	p, err := o.client.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("get pod: %w", err)
	}
	now := metav1.Now()
	ev := &corev1.Event{
		ObjectMeta:     metav1.ObjectMeta{GenerateName: name + ".", Namespace: ns},
		InvolvedObject: corev1.ObjectReference{Kind: "Pod", Namespace: ns, Name: name, UID: p.UID, APIVersion: "v1"},
		Type:           corev1.EventTypeWarning, Reason: "AddressConflict", Message: msg,
		Source:         corev1.EventSource{Component: "ferry-operator"},
		FirstTimestamp: now, LastTimestamp: now, Count: 1,
	}
	if _, err := o.client.CoreV1().Events(ns).Create(ctx, ev, metav1.CreateOptions{}); err != nil {
		return fmt.Errorf("create event: %w", err)
	}
	return nil
}

// conflictCollector is ferry_operator_conflicts: 1 for every pod of every
// address conflict in the current snapshot, labelled with the address, the pod
// and what became of it (kept or withheld).
type conflictCollector struct{ view *mesh.View }

var conflictDesc = prometheus.NewDesc("ferry_operator_conflicts",
	"Pods claiming an address another enrolled pod claims too, by ip, pod and outcome (kept: the newer keeps the address; withheld: left out of the mesh).",
	[]string{"ip", "pod", "outcome"}, nil)

func (c conflictCollector) Describe(ch chan<- *prometheus.Desc) { ch <- conflictDesc }

func (c conflictCollector) Collect(ch chan<- prometheus.Metric) {
	snap, _ := c.view.Current()
	if snap == nil {
		return
	}
	for _, cf := range snap.Conflicts {
		if cf.Winner != "" {
			ch <- prometheus.MustNewConstMetric(conflictDesc, prometheus.GaugeValue, 1, cf.IP, cf.Winner, "kept")
		}
		for _, w := range cf.Withheld {
			ch <- prometheus.MustNewConstMetric(conflictDesc, prometheus.GaugeValue, 1, cf.IP, w, "withheld")
		}
	}
}
