// This file resolves address conflicts among enrolled pods: two pods claiming one
// IP (a stale pod the kubelet has not cleaned up, as IP reuse leaves) must not
// make every agent refuse the whole state, so the view decides itself which one
// the mesh knows, and says so.

package mesh

import (
	"cmp"
	"fmt"
	"slices"
	"strings"

	"github.com/ferrymesh/ferry/api/ferryv1"
	corev1 "k8s.io/api/core/v1"
)

// Conflict is one address more than one enrolled pod claims.
type Conflict struct {
	IP string
	// Winner is the pod (namespace/name) the mesh gives the address: the newest by
	// creation time. "" when the newest are created at the same time, and no one
	// can tell which is live: then every claimant is withheld.
	Winner string
	// Withheld are the other claimants (namespace/name, sorted): out of the mesh,
	// their workloads, endpoints and identities sent to no agent, until the
	// conflict ends.
	Withheld []string
}

func (c Conflict) equal(d Conflict) bool {
	return c.IP == d.IP && c.Winner == d.Winner && slices.Equal(c.Withheld, d.Withheld)
}

// String says what was done, for logs, events and statuses.
func (c Conflict) String() string {
	if c.Winner == "" {
		return fmt.Sprintf("pods %s all claim ip %s and were created at the same time: all withheld from the mesh", strings.Join(c.Withheld, ", "), c.IP)
	}
	return fmt.Sprintf("pods %s and %s claim ip %s: the newer, %s, keeps it; %s withheld from the mesh", c.Winner, strings.Join(c.Withheld, ", "), c.IP, c.Winner, strings.Join(c.Withheld, ", "))
}

// claimant is an enrolled pod and its mesh entry.
type claimant struct {
	w   *ferryv1.Workload
	pod *corev1.Pod
}

// resolveConflicts finds the addresses more than one claimant holds and decides
// each: the newest pod wins, ties withhold them all. A pod withheld for one of its
// addresses is withheld whole. The result is sorted by address.
func resolveConflicts(all []claimant) ([]Conflict, map[string]bool) {
	byIP := map[string][]claimant{}
	for _, c := range all {
		for _, ip := range c.w.Ips {
			byIP[ip] = append(byIP[ip], c)
		}
	}
	var out []Conflict
	withheld := map[string]bool{}
	for ip, cs := range byIP {
		if len(cs) < 2 {
			continue
		}
		name := func(c claimant) string { return c.pod.Namespace + "/" + c.pod.Name }
		slices.SortFunc(cs, func(a, b claimant) int {
			return cmp.Or(b.pod.CreationTimestamp.Compare(a.pod.CreationTimestamp.Time), strings.Compare(name(a), name(b)))
		})
		c := Conflict{IP: ip}
		rest := cs
		if !cs[0].pod.CreationTimestamp.Equal(&cs[1].pod.CreationTimestamp) {
			c.Winner, rest = name(cs[0]), cs[1:]
		}
		for _, r := range rest {
			c.Withheld = append(c.Withheld, name(r))
			withheld[name(r)] = true
		}
		slices.Sort(c.Withheld)
		out = append(out, c)
	}
	// A winner withheld for another address it shares is out too: say so.
	for i, c := range out {
		if c.Winner != "" && withheld[c.Winner] {
			out[i].Withheld = append(out[i].Withheld, c.Winner)
			slices.Sort(out[i].Withheld)
			out[i].Winner = ""
		}
	}
	slices.SortFunc(out, func(a, b Conflict) int { return strings.Compare(a.IP, b.IP) })
	return out, withheld
}

// conflictStatuses are the conflicts as ConfigStatus entries of kind Pod, one per
// pod involved: not accepted for a withheld pod, accepted for the winner, each
// naming the others.
func conflictStatuses(conflicts []Conflict) []*ferryv1.ConfigStatus {
	var out []*ferryv1.ConfigStatus
	for _, c := range conflicts {
		if c.Winner != "" {
			out = append(out, &ferryv1.ConfigStatus{Kind: "Pod", Name: c.Winner, Conditions: []*ferryv1.Condition{
				{Type: "Accepted", Status: true, Reason: "AddressConflict", Message: c.String()}}})
		}
		for _, w := range c.Withheld {
			out = append(out, &ferryv1.ConfigStatus{Kind: "Pod", Name: w, Conditions: []*ferryv1.Condition{
				{Type: "Accepted", Status: false, Reason: "AddressConflict", Message: c.String()}}})
		}
	}
	return out
}

// logConflicts logs each conflict once, when it starts, and when it ends.
func (v *View) logConflicts(conflicts []Conflict) {
	now := map[string]bool{}
	for _, c := range conflicts {
		msg := c.String()
		now[msg] = true
		if !v.loggedConflicts[msg] {
			v.log.Warn("mesh view: address conflict", "ip", c.IP, "winner", c.Winner, "withheld", strings.Join(c.Withheld, ","), "detail", msg)
		}
	}
	for msg := range v.loggedConflicts {
		if !now[msg] {
			v.log.Info("mesh view: address conflict over", "detail", msg)
		}
	}
	v.loggedConflicts = now
}
