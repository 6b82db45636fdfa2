// Package arch checks the import rules that keep Ferry's boxes apart (DESIGN.md,
// Layout): api/ depends on no other Ferry package, bpf/ on api/ at most, the agent
// and the operator never on each other, nothing product-side on the lab, nothing
// on test/.
package arch

import (
	"os/exec"
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
