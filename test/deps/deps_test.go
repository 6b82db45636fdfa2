// Package deps checks that every external program and file Ferry's build, tests,
// demo and bench use comes from a Debian package that hack/install-deps.sh installs
// (hack/install-deps.sh), so a tool that is on one developer's machine by chance, or only
// as a Recommends, fails here by name instead of on the next fresh machine.
package deps

import (
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"testing"
)

// need is one program (found on PATH) or file (an absolute path) Ferry uses, and the
// package that provides it on Debian.
type need struct {
	name    string // program name, or absolute path of a file
	pkg     string // the Debian package to list in hack/install-deps.sh
	usedFor string
}

// needs is every program and file outside Go that Ferry runs or reads. When code
// starts running a new program, add it here (TestNeedsCoverSource fails until then).
var needs = []need{
	{"clang", "clang", "bpf2go compiles bpf/ferry.c (make generate)"},
	{"llvm-strip", "llvm", "bpf2go strips the objects (make generate)"},
	{"/usr/include/bpf/bpf_helpers.h", "libbpf-dev", "bpf/ferry.c includes it"},
	{"/usr/include/linux/bpf.h", "linux-libc-dev", "bpf/ferry.c includes it"},
	{"protoc", "protobuf-compiler", "api/ferryv1 code generation (make generate)"},
	{"/usr/include/google/protobuf/duration.proto", "libprotobuf-dev", "observer.proto imports it"},
	{"/usr/include/google/protobuf/timestamp.proto", "libprotobuf-dev", "observer.proto imports it"},
	{"git", "git", "make check-generated"},
	{"bpftool", "bpftool", "datapath and e2e tests list kernel objects"},
	{"ip", "iproute2", "datapath tests add addresses in a netns"},
	{"nsenter", "util-linux", "lab: run commands in pod and node namespaces"},
	{"unshare", "util-linux", "lab: a mount namespace per pod command, for the pod's resolv.conf"},
	{"mount", "mount", "lab: bind-mounts the pod's resolv.conf over /etc/resolv.conf"},
	{"cat", "coreutils", "e2e: reads a node namespace's /proc/net/netfilter/nfnetlink_queue (the delay line bound)"},
	{"sh", "dash", "lab: the script that mounts the pod's resolv.conf and runs the command"},
	{"getent", "libc-bin", "lab DNS tests: glibc's resolver in a pod"},
	{"taskset", "util-linux", "bench pins processes to cores"},
	{"setpriv", "util-linux", "deploy capability tests drop privileges"},
	{"tcpdump", "tcpdump", "e2e captures on the lab fabric"},
	{"tshark", "tshark", "e2e reads the captures"},
	{"promtool", "prometheus", "metrics tests: promtool check metrics; deploy/monitoring rules: promtool check and test rules"},
	{"prometheus", "prometheus", "e2e: the real Prometheus server scraping a lab's agents and operator (dashboards' queries)"},
	{"chromium", "chromium", "the web view test"},
	{"haproxy", "haproxy", "make bench: the peer proxy pair"},
	{"h2load", "nghttp2-client", "make bench: the HTTP/2 load client"},
	{"iptables", "iptables", "--capture=iptables"},
	{"ip6tables", "iptables", "--capture=iptables (IPv6)"},
	{"iptables-save", "iptables", "capture tests read the nat table"},
	{"bash", "bash", "hack/ scripts"},
	{"dpkg-query", "dpkg", "hack/install-deps.sh and this test"},
	{"curl", "curl", "L7 e2e: the HTTP/1.1 client through Service VIPs"},
	{"h2load", "nghttp2-client", "L7 e2e: the HTTP/2 load client (prior knowledge, 100 streams)"},
	{"nghttpd", "nghttp2-server", "L7 e2e: the h2c server of a 1 GiB response"},
	{"runc", "runc", "test node: containerd's shim runs the pods' containers with it"},
	{"/usr/lib/cni/bridge", "containernetworking-plugins", "test node: containerd's CRI puts pods on a bridge"},
	{"/usr/lib/cni/host-local", "containernetworking-plugins", "test node: pod IPs from the node's pod CIDR"},
	{"/usr/lib/cni/loopback", "containernetworking-plugins", "test node: each pod's lo"},
	{"umount", "mount", "test node: unmounts what kubelet and containerd left under the node folder"},
}

// notDebian are programs the source runs that are not Debian packages: Go itself,
// the test binary re-running itself.
// the test binary re-running itself, and fortio (make bench builds it with go build).
var notDebian = []string{"go", "/proc/self/exe", "fortio"}

// TestNeedsInstalled checks the real list: each program and file is there and owned
// by a package that hack/install-deps.sh lists (or that Debian always has installed).
func TestNeedsInstalled(t *testing.T) {
	if _, err := exec.LookPath("dpkg-query"); err != nil {
		t.Fatalf("dpkg-query not found: Ferry's machines are Debian, and install-deps needs dpkg: %v", err)
	}
	listed, err := readPackages(filepath.Join(repoRoot(t), "hack", "install-deps.sh"))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range check(needs, listed, debian) {
		t.Error(p)
	}
}

// TestMissingPackageNamed shows the check failing, with the program and the package
// to add, when the list lacks a package: first on this machine's real files with a
// list that leaves libprotobuf-dev out (the package a fresh machine once missed),
// then with fake owners so it needs nothing installed.
func TestMissingPackageNamed(t *testing.T) {
	listed, err := readPackages(filepath.Join(repoRoot(t), "hack", "install-deps.sh"))
	if err != nil {
		t.Fatal(err)
	}
	without := slices.DeleteFunc(slices.Clone(listed), func(p string) bool { return p == "libprotobuf-dev" })
	problems := check(needs, without, debian)
	if len(problems) != 2 {
		t.Fatalf("want 2 problems (duration.proto, timestamp.proto) without libprotobuf-dev, got %d: %q", len(problems), problems)
	}
	for _, p := range problems {
		if !strings.Contains(p, "libprotobuf-dev") || !strings.Contains(p, ".proto") {
			t.Errorf("problem does not name the file and the package to add: %q", p)
		}
	}

	owners := map[string]string{"/usr/bin/fake-tool": "fake-pkg", "/usr/bin/from-dep": "some-dependency"}
	owner := func(path string) (string, error) {
		if p, ok := owners[path]; ok {
			return p, nil
		}
		return "", errors.New("not owned")
	}
	fake := []need{
		{"/usr/bin/fake-tool", "fake-pkg", "a test"},
		{"/usr/bin/from-dep", "some-dependency", "a test"},
		{"/usr/bin/not-there", "absent-pkg", "a test"},
		{"/usr/bin/by-hand", "by-hand-pkg", "a test"},
	}
	m := machine{
		find: func(name string) (string, error) {
			if _, ok := owners[name]; ok || name == "/usr/bin/by-hand" {
				return name, nil
			}
			return "", fs.ErrNotExist
		},
		owner:     owner,
		essential: func(string) bool { return false },
	}
	got := check(fake, []string{"fake-pkg"}, m)
	want := []string{
		"/usr/bin/from-dep (a test) comes from package some-dependency, which hack/install-deps.sh does not list: add some-dependency",
		"/usr/bin/not-there (a test) is not installed: add absent-pkg to hack/install-deps.sh and run make deps",
		"/usr/bin/by-hand (a test) at /usr/bin/by-hand belongs to no Debian package (installed by hand?): add by-hand-pkg to hack/install-deps.sh",
	}
	if !slices.Equal(got, want) {
		t.Fatalf("fake list:\n got  %q\n want %q", got, want)
	}
	if got := check(fake[:1], []string{"fake-pkg"}, m); len(got) != 0 {
		t.Fatalf("a program from a listed package is reported: %q", got)
	}
}

// TestNeedsCoverSource reads the Go source for programs it runs by a literal name and
// fails on one that needs does not name, so the table cannot fall behind the code.
func TestNeedsCoverSource(t *testing.T) {
	known := map[string]bool{}
	for _, n := range needs {
		known[n.name] = true
	}
	for _, n := range notDebian {
		known[n] = true
	}
	// exec.Command("x", ...), exec.CommandContext(ctx, "x", ...), exec.LookPath("x"),
	// and the program nsenter runs: "nsenter", "--net="+p, "x" / "--", "x".
	calls := regexp.MustCompile(`exec\.(?:Command|CommandContext|LookPath)\((?:(?:ctx|cctx|t\.Context\(\)), )?"([^"]+)"`)
	nsenter := regexp.MustCompile(`"nsenter", "--net="\+[a-zA-Z.()]+, (?:"--", )?"([^"-][^"]*)"`)
	// bench checks its tools in a loop: for _, tool := range []string{"a", "b"} {
	tools := regexp.MustCompile(`range \[\]string\{("[a-z0-9-]+"(?:, "[a-z0-9-]+")*)\} \{\s+if _, err := exec\.LookPath\(tool\)`)
	root := repoRoot(t)
	seen := map[string]string{}
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		// hack/ holds other modules; this package's own patterns are not calls.
		if d.IsDir() && path != root && (d.Name() == "hack" || d.Name() == "deps" || strings.HasPrefix(d.Name(), ".")) {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(path, ".go") {
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, path)
		for _, re := range []*regexp.Regexp{calls, nsenter} {
			for _, m := range re.FindAllSubmatch(b, -1) {
				seen[string(m[1])] = rel
			}
		}
		for _, m := range tools.FindAllSubmatch(b, -1) {
			for _, q := range strings.Split(string(m[1]), ", ") {
				seen[strings.Trim(q, `"`)] = rel
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(seen) < 10 {
		t.Fatalf("found only %d programs in the source (%v): the patterns no longer match the code", len(seen), seen)
	}
	names := slices.Sorted(maps.Keys(seen))
	t.Logf("programs the source runs by name: %s", strings.Join(names, " "))
	for _, name := range names {
		if file := seen[name]; !known[name] {
			t.Errorf("%s runs %q, which test/deps' needs does not name: add it with the Debian package that provides it", file, name)
		}
	}
}

// machine is what check asks of the system: where a need is (PATH or the file),
// which package owns a file (dpkg -S), and whether a package is one Debian never lacks
// (Essential: yes), which need not be listed.
type machine struct {
	find      func(name string) (string, error)
	owner     func(path string) (string, error)
	essential func(pkg string) bool
}

// debian is this machine.
var debian = machine{find: findNeed, owner: dpkgOwner, essential: essential}

// check returns one line per need that is missing or comes from a package the list
// does not name.
func check(needs []need, listed []string, m machine) []string {
	var problems []string
	for _, n := range needs {
		what := fmt.Sprintf("%s (%s)", n.name, n.usedFor)
		path, err := m.find(n.name)
		if err != nil {
			problems = append(problems, fmt.Sprintf("%s is not installed: add %s to hack/install-deps.sh and run make deps", what, n.pkg))
			continue
		}
		pkg, err := ownerOf(path, m.owner)
		if err != nil {
			problems = append(problems, fmt.Sprintf("%s at %s belongs to no Debian package (installed by hand?): add %s to hack/install-deps.sh", what, path, n.pkg))
			continue
		}
		if !slices.Contains(listed, pkg) && !m.essential(pkg) {
			problems = append(problems, fmt.Sprintf("%s comes from package %s, which hack/install-deps.sh does not list: add %s", what, pkg, pkg))
		}
	}
	return problems
}

// ownerOf finds the package that owns path, trying the forms dpkg records it under:
// on a merged-/usr system /usr/sbin/ip is recorded as /sbin/ip, and a program behind
// an alternative (iptables) is owned through its target.
func ownerOf(path string, owner func(string) (string, error)) (string, error) {
	candidates := []string{path}
	if real, err := filepath.EvalSymlinks(path); err == nil && real != path {
		candidates = append(candidates, real)
	}
	for _, c := range slices.Clone(candidates) {
		if rest, ok := strings.CutPrefix(c, "/usr"); ok {
			candidates = append(candidates, rest)
		}
	}
	var firstErr error
	for _, c := range candidates {
		pkg, err := owner(c)
		if err == nil {
			return pkg, nil
		}
		if firstErr == nil {
			firstErr = err
		}
	}
	return "", firstErr
}

// findNeed finds a program on PATH, or checks that a file is there.
func findNeed(name string) (string, error) {
	if filepath.IsAbs(name) {
		_, err := os.Stat(name)
		return name, err
	}
	return exec.LookPath(name)
}

// dpkgOwner is `dpkg -S path`, without the architecture qualifier.
func dpkgOwner(path string) (string, error) {
	out, err := exec.Command("dpkg-query", "-S", path).Output()
	if err != nil {
		return "", fmt.Errorf("dpkg -S %s: %w", path, err)
	}
	// "pkg:arch: /path" or "pkg: /path"; diversions print more than one line.
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		pkgs, file, ok := strings.Cut(line, ": ")
		if !ok || file != path || strings.HasPrefix(line, "diversion ") {
			continue
		}
		pkg, _, _ := strings.Cut(strings.Split(pkgs, ", ")[0], ":")
		return pkg, nil
	}
	return "", fmt.Errorf("dpkg -S %s: no owner in %q", path, out)
}

// essential says whether Debian marks pkg Essential (installed on every system).
func essential(pkg string) bool {
	out, err := exec.Command("dpkg-query", "-W", "-f=${Essential}", pkg).Output()
	return err == nil && strings.TrimSpace(string(out)) == "yes"
}

// readPackages reads the packages install-deps.sh installs: the lines between
// "packages=(" and ")", a name a line, `#` starting a comment.
func readPackages(path string) ([]string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("package list: %w", err)
	}
	_, rest, ok := strings.Cut(string(b), "\npackages=(\n")
	list, _, closed := strings.Cut(rest, "\n)\n")
	if !ok || !closed {
		return nil, fmt.Errorf("package list: no packages=( ... ) array in %s", path)
	}
	var pkgs []string
	for _, line := range strings.Split(list, "\n") {
		line, _, _ = strings.Cut(line, "#")
		pkgs = append(pkgs, strings.Fields(line)...)
	}
	if len(pkgs) == 0 {
		return nil, fmt.Errorf("package list in %s is empty", path)
	}
	return pkgs, nil
}

func repoRoot(t *testing.T) string {
	t.Helper()
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		t.Fatal("cannot find the source folder")
	}
	return filepath.Join(filepath.Dir(file), "..", "..")
}
