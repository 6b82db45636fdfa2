package e2e

// The kernel objects an agent holds, as bpftool lists them: every program, map and
// link, by ID, found from three sides that must agree — the pins under the agent's
// pin folder, the BPF file descriptors the agent process holds, and what those
// refer to (a link's program, a program's maps, which include .rodata).

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/bpf"
)

// bpfObject is one entry of `bpftool -j -f {prog,map,link} show`.
type bpfObject struct {
	ID     uint32   `json:"id"`
	Name   string   `json:"name"`
	MapIDs []uint32 `json:"map_ids"`
	ProgID uint32   `json:"prog_id"`
	Pinned []string `json:"pinned"`
}

// objectKinds are bpftool's object kinds.
func objectKinds() []string { return []string{"prog", "map", "link"} }

// bpftoolShow lists every object of each kind the kernel has, by ID.
func bpftoolShow(t *testing.T) map[string]map[uint32]bpfObject {
	t.Helper()
	all := map[string]map[uint32]bpfObject{}
	for _, kind := range objectKinds() {
		out, err := exec.Command("bpftool", "-j", "-f", kind, "show").Output()
		if err != nil {
			t.Fatalf("bpftool %s show: %v", kind, err)
		}
		var objs []bpfObject
		if err := json.Unmarshal(out, &objs); err != nil {
			t.Fatalf("bpftool %s show: %v", kind, err)
		}
		all[kind] = map[uint32]bpfObject{}
		for _, o := range objs {
			if o.ID == 0 {
				t.Fatalf("bpftool %s show lists an object without an ID: %+v", kind, o)
			}
			all[kind][o.ID] = o
		}
	}
	return all
}

// kernelObjects are the objects of one agent.
type kernelObjects struct {
	// ids holds every object by kind and ID, with the name bpftool shows.
	ids map[string]map[uint32]string
	// pinned names the pinned ones by their path under the pin folder.
	pinned map[string]uint32
	// held are the IDs of the objects the agent process holds descriptors to.
	held map[string]map[uint32]bool
}

// agentObjects lists the objects of the agent with pid and pinDir. Every pin under
// pinDir must be a map or link bpftool lists, every map Ferry pins must be there, and
// every ID found must be one bpftool lists: an ID that could not be read fails.
func agentObjects(t *testing.T, pinDir string, pid int) kernelObjects {
	t.Helper()
	if pid == 0 {
		t.Fatal("the agent is not running")
	}
	// Descriptors first: whatever they name exists when bpftool lists next.
	held := heldObjects(t, pid)
	show := bpftoolShow(t)
	k := kernelObjects{ids: map[string]map[uint32]string{}, pinned: map[string]uint32{}, held: held}
	for _, kind := range objectKinds() {
		k.ids[kind] = map[uint32]string{}
	}
	var add func(kind string, id uint32, from string)
	add = func(kind string, id uint32, from string) {
		o, ok := show[kind][id]
		if !ok {
			t.Fatalf("%s names %s ID %d, which bpftool does not list", from, kind, id)
		}
		if _, seen := k.ids[kind][id]; seen {
			return
		}
		name := o.Name
		if name == "" && len(o.Pinned) > 0 {
			name = filepath.Base(o.Pinned[0]) // links have no name, only their pin
		}
		k.ids[kind][id] = name
		switch kind {
		case "link":
			add("prog", o.ProgID, fmt.Sprintf("link %d", id))
		case "prog":
			for _, m := range o.MapIDs {
				add("map", m, fmt.Sprintf("program %d (%s)", id, o.Name))
			}
		}
	}
	for _, kind := range objectKinds() {
		for _, o := range show[kind] {
			for _, p := range o.Pinned {
				if rel, err := filepath.Rel(pinDir, p); err == nil && !strings.HasPrefix(rel, "..") {
					k.pinned[rel] = o.ID
					add(kind, o.ID, "pin "+p)
				}
			}
		}
	}
	err := filepath.WalkDir(pinDir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(pinDir, p)
		if k.pinned[rel] == 0 {
			t.Errorf("pin %s is not an object bpftool lists as pinned", p)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("walk %s: %v", pinDir, err)
	}
	for _, name := range bpf.MapNames() {
		if k.pinned[name] == 0 {
			t.Fatalf("map %s is not pinned in %s (pins: %v)", name, pinDir, k.pinned)
		}
	}
	for kind, ids := range held {
		for id := range ids {
			add(kind, id, fmt.Sprintf("a descriptor of agent %d", pid))
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	return k
}

// heldObjects reads the IDs of the BPF objects behind pid's file descriptors from
// /proc/PID/fdinfo.
func heldObjects(t *testing.T, pid int) map[string]map[uint32]bool {
	t.Helper()
	kinds := map[string]struct{ kind, field string }{
		"anon_inode:bpf-prog": {"prog", "prog_id"},
		"anon_inode:bpf-map":  {"map", "map_id"},
		"anon_inode:bpf_link": {"link", "link_id"},
	}
	held := map[string]map[uint32]bool{"prog": {}, "map": {}, "link": {}}
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	fds, err := os.ReadDir(dir)
	if err != nil {
		t.Fatalf("descriptors of the agent: %v", err)
	}
	for _, fd := range fds {
		target, err := os.Readlink(filepath.Join(dir, fd.Name()))
		if err != nil {
			continue // closed meanwhile
		}
		k, ok := kinds[target]
		if !ok {
			continue
		}
		id := fdinfoID(t, pid, fd.Name(), k.field)
		if id == 0 {
			t.Fatalf("descriptor %s of agent %d is a %s without a readable %s", fd.Name(), pid, k.kind, k.field)
		}
		held[k.kind][id] = true
	}
	return held
}

// fdinfoID reads field (e.g. map_id) from /proc/PID/fdinfo/FD; 0 when it is not there.
func fdinfoID(t *testing.T, pid int, fd, field string) uint32 {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/fdinfo/%s", pid, fd))
	if err != nil {
		t.Fatalf("fdinfo: %v", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), field+":"); ok {
			id, err := strconv.ParseUint(strings.TrimSpace(v), 10, 32)
			if err != nil {
				t.Fatalf("fdinfo %s of %d: %s: %v", fd, pid, sc.Text(), err)
			}
			return uint32(id)
		}
	}
	return 0
}

// names lists the objects of kind as "name=id", sorted.
func (k kernelObjects) names(kind string) []string {
	var out []string
	for id, name := range k.ids[kind] {
		out = append(out, fmt.Sprintf("%s=%d", name, id))
	}
	sort.Strings(out)
	return out
}

func (k kernelObjects) String() string {
	var b strings.Builder
	for _, kind := range objectKinds() {
		fmt.Fprintf(&b, "%s: %s\n", kind, strings.Join(k.names(kind), " "))
	}
	return b.String()
}

// checkObjects fails unless the agent holds every kind of object Ferry creates: each
// of its programs, each pinned map and the .rodata of its globals, and links.
func checkObjects(t *testing.T, k kernelObjects) {
	t.Helper()
	names := map[string]bool{}
	for _, kind := range objectKinds() {
		for _, n := range k.ids[kind] {
			names[kind+" "+n] = true
		}
	}
	for _, p := range bpf.ProgramNames() {
		if !names["prog "+p] {
			t.Errorf("the agent holds no program %s", p)
		}
	}
	rodata := false
	for n := range names {
		rodata = rodata || strings.HasPrefix(n, "map ") && strings.HasSuffix(n, ".rodata")
	}
	if !rodata {
		t.Error("the agent's programs use no .rodata map")
	}
	if len(k.ids["link"]) == 0 {
		t.Error("the agent holds no link")
	}
	if t.Failed() {
		t.Fatalf("objects of the agent:\n%s", k)
	}
}

// waitGone waits until bpftool lists none of the objects of kind in ids (the kernel
// frees them from a work queue after the last reference goes) and returns those
// still there at the deadline.
func waitGone(t *testing.T, ids map[string]map[uint32]string) []string {
	t.Helper()
	var left []string
	for deadline := time.Now().Add(carryWait); ; time.Sleep(100 * time.Millisecond) {
		left = left[:0]
		show := bpftoolShow(t)
		for kind, objs := range ids {
			for id, name := range objs {
				if _, ok := show[kind][id]; ok {
					left = append(left, fmt.Sprintf("%s %d (%s)", kind, id, name))
				}
			}
		}
		if len(left) == 0 || time.Now().After(deadline) {
			sort.Strings(left)
			return left
		}
	}
}
