package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/agent/datapath"
	"github.com/ferrymesh/ferry/lab"
)

// `ferry-agent --cleanup` leaves no Ferry program, map, link or pin: the kernel
// objects the agent created are gone as bpftool sees them. It runs on a lab of its
// own, since other labs' agents keep their own programs loaded meanwhile.
func TestAgentCleanup(t *testing.T) {
	e := setup(t) // for the binaries
	cfg := lab.Config{
		Prefix:      "e2ecln",
		PodNet:      101, // apart from the shared lab, which is up meanwhile
		AgentBinary: filepath.Join(e.bin, "ferry-agent"),
		// With the fast path the agent holds every kind of object: sk_msg and its link too.
		AgentArgs: []string{"--fast-path=true"},
		Nodes:     []lab.NodeConfig{{Name: "node1", Pods: []lab.PodConfig{{Name: "a", Enrolled: true}}}},
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	l, err := lab.Up(ctx, cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Down()
	if err := l.WaitAgentReady(ctx, "node1"); err != nil {
		time.Sleep(time.Second)
		b, _ := os.ReadFile(l.AgentLog("node1"))
		t.Fatalf("%v\n%s", err, b)
	}
	pinDir := filepath.Join(lab.BPFRoot, cfg.Prefix+"-node1")
	progs, err := datapath.Programs(pinDir)
	if err != nil {
		t.Fatal(err)
	}
	maps, err := datapath.DumpMaps(pinDir)
	if err != nil {
		t.Fatal(err)
	}
	ours := map[string]map[uint32]bool{"prog": {}, "map": {}, "link": {}}
	for _, p := range progs {
		ours["prog"][p.ID], ours["link"][p.LinkID] = true, true
	}
	for _, m := range maps.Maps {
		ours["map"][m.ID] = true
	}
	if len(ours["prog"]) < 5 || len(ours["link"]) < 5 || len(ours["map"]) < 6 {
		t.Fatalf("expected the agent to hold 5+ programs, links and 6 maps; found %v", ours)
	}

	if err := l.StopAgent("node1", syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	cgroup, err := l.NodeCgroup("node1")
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(cfg.AgentBinary, "--cleanup", "--bpf-pin-dir", pinDir, "--cgroup", cgroup).CombinedOutput()
	if err != nil {
		t.Fatalf("ferry-agent --cleanup: %v\n%s", err, out)
	}
	if _, err := os.Stat(pinDir); !os.IsNotExist(err) {
		t.Fatalf("pin folder %s still there after cleanup (%v)", pinDir, err)
	}
	// The kernel frees maps from a work queue after the last reference goes, so
	// give it a moment before calling what is left a leak.
	var left []string
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		left = leftovers(t, ours)
		if len(left) == 0 || time.Now().After(deadline) {
			break
		}
	}
	if len(left) > 0 {
		t.Fatalf("bpftool still lists after cleanup: %v", left)
	}
}

// leftovers lists the objects of ours that bpftool still shows.
func leftovers(t *testing.T, ours map[string]map[uint32]bool) []string {
	var left []string
	for kind, ids := range ours {
		out, err := exec.Command("bpftool", "-j", kind, "show").Output()
		if err != nil {
			t.Fatalf("bpftool %s show: %v", kind, err)
		}
		var objs []struct {
			ID   uint32 `json:"id"`
			Name string `json:"name"`
		}
		if err := json.Unmarshal(out, &objs); err != nil {
			t.Fatalf("bpftool %s show: %v", kind, err)
		}
		for _, o := range objs {
			if ids[o.ID] {
				left = append(left, fmt.Sprintf("%s %d (%s)", kind, o.ID, o.Name))
			}
		}
	}
	return left
}
