// Package arch checks the import rules that keep Ferry's boxes apart (DESIGN.md,
// Layout): api/ depends on no other Ferry package, bpf/ on api/ at most, the agent
// and the operator never on each other, nothing product-side on the lab, nothing
// on test/; and the CLI links none of the agent's daemon, reaching its kernel side
// only through the packages TestCLIDoesNotLinkTheAgent names.
package arch

import (
	"os/exec"
	"slices"
	"sort"
	"strings"
	"testing"
)

const module = "github.com/ferrymesh/ferry/"

func TestImportRules(t *testing.T) {
	out, err := exec.Command("go", "list", "-f", `{{.ImportPath}}{{range .Deps}} {{.}}{{end}}`, module+"...").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	in := func(pkg string, boxes ...string) bool {
		for _, b := range boxes {
			if pkg == b || strings.HasPrefix(pkg, b+"/") {
				return true
			}
		}
		return false
	}
	rules := []struct {
		forbidden func(pkg, dep string) bool
		why       string
	}{
		{func(p, d string) bool { return in(p, "api") && !in(d, "api") }, "api/ is the contract and depends on no other Ferry package"},
		{func(p, d string) bool { return in(p, "bpf") && !in(d, "api", "bpf") }, "bpf/ imports only api/ types at most"},
		{func(p, d string) bool { return in(p, "agent") && in(d, "operator") }, "the agent speaks to the operator only through api/"},
		{func(p, d string) bool { return in(p, "operator") && in(d, "agent") }, "the operator speaks to the agent only through api/"},
		{func(p, d string) bool { return in(p, "agent", "operator", "bpf", "api") && in(d, "lab") }, "the lab imports the product, never the reverse"},
		{func(p, d string) bool { return in(d, "test") }, "nothing imports test/"},
	}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		fields := strings.Fields(line)
		pkg := strings.TrimPrefix(fields[0], module)
		for _, dep := range fields[1:] {
			dep, ours := strings.CutPrefix(dep, module)
			if !ours {
				continue
			}
			for _, r := range rules {
				if r.forbidden(pkg, dep) {
					t.Errorf("%s imports %s: %s", pkg, dep, r.why)
				}
			}
		}
	}
}

// The CLI reads agents through api/admin (and the Observer API), never by linking
// the agent: `go list -deps ./cmd/ferry` holds none of the agent's daemon packages,
// and the kernel-side packages only through the importers named here, each with
// the reason it needs them.
func TestCLIDoesNotLinkTheAgent(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "-f", `{{.ImportPath}}{{range .Imports}} {{.}}{{end}}`, module+"cmd/ferry").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	imports := map[string][]string{} // our package -> our packages it imports
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		fields := strings.Fields(line)
		pkg, ours := strings.CutPrefix(fields[0], module)
		if !ours {
			continue
		}
		imports[pkg] = nil
		for _, dep := range fields[1:] {
			if dep, ours := strings.CutPrefix(dep, module); ours {
				imports[pkg] = append(imports[pkg], dep)
			}
		}
	}
	if _, ok := imports["cmd/ferry"]; !ok {
		t.Fatalf("go list printed no cmd/ferry:\n%s", out)
	}

	// The agent's daemon: never in the CLI, by any path.
	daemon := []string{"agent", "agent/proxy", "agent/tunnel", "agent/controlplane", "agent/identity", "agent/observe", "agent/adminserver", "agent/metrics"}
	for _, pkg := range daemon {
		if _, linked := imports[pkg]; linked {
			t.Errorf("cmd/ferry links %s (%s): the CLI reads agents through api/admin", pkg, strings.Join(pathTo(imports, "cmd/ferry", pkg, nil), " → "))
		}
	}

	// The kernel side: only through these importers.
	kernel := []string{"agent/datapath", "bpf", "agent/netns"}
	gateways := map[string]string{
		"lab":   "the lab commands build the one-machine cluster: cgroup2 mounts through agent/datapath, pod namespaces through agent/netns",
		"bench": "the bench command drives labs (package lab)",
		"agent/datapath": "`ferry bpf` and `ferry check` read the kernel objects the agent pinned (datapath.Programs, DumpMaps, Cgroup2Mount); " +
			"they must work while no agent runs, so they cannot go through the admin API",
		"bpf":                "`ferry check` loads Ferry's objects through the verifier to test the kernel",
		"internal/preflight": "`ferry check`'s checks: BPF features and Ferry's objects through the verifier (bpf), the cgroup2 mount and pinned programs (agent/datapath)",
	}
	// Walk the CLI's own part of the graph (stopping at gateways and at the kernel
	// side): none of it may import a kernel-side package, except cmd/ferry itself
	// importing a named one.
	stop := map[string]string{}
	for k, v := range gateways {
		stop[k] = v
	}
	for _, k := range kernel {
		stop[k] = "kernel side"
	}
	for pkg := range imports {
		if _, stopped := stop[pkg]; stopped {
			continue
		}
		path := pathTo(imports, "cmd/ferry", pkg, stop)
		if path == nil {
			continue // reached only through a gateway
		}
		for _, dep := range imports[pkg] {
			if !slices.Contains(kernel, dep) {
				continue
			}
			if _, named := gateways[dep]; named && pkg == "cmd/ferry" {
				continue
			}
			t.Errorf("%s imports %s (%s): the CLI reaches the kernel side only through %s",
				pkg, dep, strings.Join(append(path, dep), " → "), strings.Join(keys(gateways), ", "))
		}
	}
	for gw, why := range gateways {
		if path := pathTo(imports, "cmd/ferry", gw, nil); path != nil {
			t.Logf("allowed: %s — %s", strings.Join(path, " → "), why)
		}
	}
}

// pathTo returns an import path from one package to another (both included), not
// passing through the packages in skip; nil if none.
func pathTo(imports map[string][]string, from, to string, skip map[string]string) []string {
	prev := map[string]string{from: ""}
	queue := []string{from}
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		if p == to {
			var path []string
			for ; p != ""; p = prev[p] {
				path = append([]string{p}, path...)
			}
			return path
		}
		for _, d := range imports[p] {
			if _, seen := prev[d]; seen {
				continue
			}
			if _, skipped := skip[d]; skipped {
				continue
			}
			prev[d] = p
			queue = append(queue, d)
		}
	}
	return nil
}

func keys(m map[string]string) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
