package agent

import (
	"context"
	"slices"
	"strings"
	"testing"

	"github.com/ferrymesh/ferry/api/ferryv1"
)

// Two workloads claiming one address (a stale pod, as IP reuse leaves) are both
// left out; every other entry applies, so a pod added beside them is enrolled, and
// the admin API names what was left out.
func TestConflictingWorkloadsLeftOutRestApplies(t *testing.T) {
	ta := newTestAgent(t)
	ta.netns.add(podA.ip)
	ta.writeState(t, ta.state(t, 1, podA))
	if err := ta.Start(t.Context()); err != nil {
		t.Fatal(err)
	}
	defer ta.Stop(context.Background())

	stale := pod{"uold", "old-b", "node1", podB.ip, "b"} // b's address, claimed twice
	ta.netns.add(podB.ip)
	st := ta.state(t, 2, podA, podB, stale)
	if err := ta.Apply(st); err != nil {
		t.Fatalf("a state with one conflict refused whole: %v", err)
	}
	if got := ta.enrolledNames(); !slices.Equal(got, []string{"default/a"}) {
		t.Errorf("enrolled %v, want a only: neither claimant of %s", got, podB.ip)
	}

	newPod := pod{"ud", "d", "node1", "10.1.1.12", "d"}
	ta.netns.add(newPod.ip)
	if err := ta.Apply(ta.state(t, 3, podA, podB, stale, newPod)); err != nil {
		t.Fatal(err)
	}
	got := ta.enrolledNames()
	slices.Sort(got)
	if !slices.Equal(got, []string{"default/a", "default/d"}) {
		t.Errorf("enrolled %v, want a and the new d", got)
	}
	sn := adminSource{ta.Agent}.Snapshot()
	if len(sn.Dropped) != 2 || !strings.Contains(sn.Dropped[0], "default/b") || !strings.Contains(sn.Dropped[0], "also claimed by default/old-b") ||
		!strings.Contains(sn.Dropped[1], "default/old-b") {
		t.Errorf("admin API reports %q, want both claimants named", sn.Dropped)
	}

	// The stale pod goes: b's address is b's again.
	if err := ta.Apply(ta.state(t, 4, podA, podB, newPod)); err != nil {
		t.Fatal(err)
	}
	if got := ta.enrolledNames(); len(got) != 3 {
		t.Errorf("enrolled %v once the conflict ended", got)
	}
	if sn := (adminSource{ta.Agent}).Snapshot(); len(sn.Dropped) != 0 {
		t.Errorf("still reports %q", sn.Dropped)
	}
}

// A malformed Service is left out, and so is one whose route sends requests to it;
// the others are taken. CheckState still says what was left out, for the
// operator's tests.
func TestBadServiceLeftOut(t *testing.T) {
	st := routedState()
	good := len(st.Services)
	st.Services = append(st.Services, &ferryv1.Service{Name: "broken", Namespace: "shop", LoadBalancer: "Nope"})
	svcs, err := services(st)
	if len(svcs) != good {
		t.Fatalf("took %d services, want the %d good ones: %v", len(svcs), good, err)
	}
	ds := droppedEntries(err)
	if len(ds) != 1 || ds[0].Name != "shop/broken" || ds[0].Kind != "service" {
		t.Fatalf("dropped %v", ds)
	}

	// A route of the first Service now names the broken one.
	st.Services[0].RouteTables[0].Rules[0].Backends[0].Service = "shop/broken"
	svcs, err = services(st)
	names := []string{}
	for _, d := range droppedEntries(err) {
		names = append(names, d.Name)
	}
	slices.Sort(names)
	want := []string{"shop/broken", st.Services[0].Namespace + "/" + st.Services[0].Name}
	slices.Sort(want)
	if !slices.Equal(names, want) || len(svcs) != good-1 {
		t.Fatalf("dropped %v (took %d), want %v", names, len(svcs), want)
	}
	if CheckState(st) == nil {
		t.Error("CheckState passes a state with entries left out")
	}
}
