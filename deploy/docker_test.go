package deploy_test

import (
	"bufio"
	"encoding/json"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/ferrymesh/ferry/deploy"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// No container engine runs here, so the images cannot be built in tests. This
// checks what can go wrong without one: the packages each Dockerfile builds
// exist, are not hidden by its .dockerignore, build with CGO off (static
// binaries: distroless/static has no libc), and are the ones the manifests run.

// dockerfileBuild returns the packages the Dockerfile's `go build` builds.
func dockerfileBuild(t *testing.T, dockerfile string) []string {
	t.Helper()
	data, err := os.ReadFile(dockerfile)
	if err != nil {
		t.Fatal(err)
	}
	var pkgs []string
	for _, f := range strings.Fields(string(data)) {
		if strings.HasPrefix(f, "./cmd/") {
			pkgs = append(pkgs, f)
		}
	}
	if len(pkgs) == 0 {
		t.Fatalf("%s builds no ./cmd/... package", dockerfile)
	}
	return pkgs
}

// ignoredDirs returns the plain folder entries of a .dockerignore.
func ignoredDirs(t *testing.T, file string) []string {
	t.Helper()
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var dirs []string
	s := bufio.NewScanner(f)
	for s.Scan() {
		line := strings.TrimSpace(s.Text())
		if line == "" || strings.HasPrefix(line, "#") || strings.ContainsAny(line, "*?[!") {
			continue
		}
		dirs = append(dirs, strings.TrimSuffix(line, "/"))
	}
	return dirs
}

// dockerfileEntrypoint returns the base name of the program the Dockerfile's
// ENTRYPOINT (exec form) runs.
func dockerfileEntrypoint(t *testing.T, dockerfile string) string {
	t.Helper()
	data, err := os.ReadFile(dockerfile)
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(string(data)) {
		rest, ok := strings.CutPrefix(strings.TrimSpace(line), "ENTRYPOINT ")
		if !ok {
			continue
		}
		var argv []string
		if err := json.Unmarshal([]byte(rest), &argv); err != nil || len(argv) == 0 {
			t.Fatalf("%s: ENTRYPOINT %s: want the exec form, [\"/path/program\", ...]", dockerfile, rest)
		}
		return path.Base(argv[0])
	}
	t.Fatalf("%s has no ENTRYPOINT", dockerfile)
	return ""
}

func TestDockerfiles(t *testing.T) {
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	objs, err := deploy.Render(deploy.Options{})
	if err != nil {
		t.Fatal(err)
	}
	// Binary names the manifests start, by image; "" for a container that runs
	// the image's entrypoint.
	commands := map[string][]string{}
	for _, o := range objs {
		for _, field := range [][]string{
			{"spec", "template", "spec", "containers"},
			{"spec", "template", "spec", "initContainers"},
		} {
			containers, _, _ := unstructured.NestedSlice(o.Object, field...)
			for _, e := range containers {
				c, _ := e.(map[string]any)
				image, _ := c["image"].(string)
				image, _, _ = strings.Cut(image, ":")
				program := ""
				if cmd, _ := c["command"].([]any); len(cmd) > 0 {
					program = path.Base(cmd[0].(string))
				}
				commands[image] = append(commands[image], program)
			}
		}
	}

	for _, tc := range []struct{ dockerfile, image string }{
		{"docker/ferry-operator.Dockerfile", deploy.OperatorImage},
		{"docker/ferry-agent.Dockerfile", deploy.AgentImage},
	} {
		t.Run(filepath.Base(tc.dockerfile), func(t *testing.T) {
			pkgs := dockerfileBuild(t, tc.dockerfile)
			var built []string
			for _, p := range pkgs {
				built = append(built, path.Base(p))
			}
			entrypoint := dockerfileEntrypoint(t, tc.dockerfile)
			for _, c := range commands[tc.image] {
				if c == "" {
					c = entrypoint
				}
				if !slices.Contains(built, c) {
					t.Errorf("the manifests run %q from %s, which %s does not build (it builds %v)", c, tc.image, tc.dockerfile, built)
				}
			}

			list := exec.CommandContext(t.Context(), "go", append([]string{"list", "-deps", "-f", "{{if not .Standard}}{{.Dir}}{{end}}"}, pkgs...)...)
			list.Dir = root
			out, err := list.Output()
			if err != nil {
				t.Fatalf("go list %v: %v", pkgs, err)
			}
			ignored := ignoredDirs(t, tc.dockerfile+".dockerignore")
			for _, dir := range strings.Fields(string(out)) {
				rel, err := filepath.Rel(root, dir)
				if err != nil || strings.HasPrefix(rel, "..") {
					continue // a module dependency, downloaded in the image
				}
				for _, ig := range ignored {
					if rel == ig || strings.HasPrefix(rel, ig+"/") {
						t.Errorf("package folder %s is needed by %v but %s.dockerignore leaves it out (%s)", rel, pkgs, tc.dockerfile, ig)
					}
				}
			}

			// What the image's CGO_ENABLED=0 build compiles: every package must
			// have Go files without cgo (a cgo-only package fails there). The
			// binaries are then static, as distroless/static needs. (Building
			// them here would recompile every dependency without cgo: ~4 min
			// on 2 cores.)
			nocgo := exec.CommandContext(t.Context(), "go", append([]string{"list", "-e", "-deps", "-f",
				"{{if .Error}}{{.ImportPath}}: {{.Error}}{{end}}{{if .CgoFiles}}{{.ImportPath}}: cgo{{end}}"}, pkgs...)...)
			nocgo.Dir = root
			nocgo.Env = append(os.Environ(), "CGO_ENABLED=0")
			out, err = nocgo.Output()
			if err != nil {
				t.Fatalf("CGO_ENABLED=0 go list %v: %v", pkgs, err)
			}
			if problems := strings.TrimSpace(string(out)); problems != "" {
				t.Errorf("with CGO_ENABLED=0, as in the image:\n%s", problems)
			}
		})
	}
}
