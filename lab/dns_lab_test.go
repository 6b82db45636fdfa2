package lab

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/privileged"
)

// ferryCLI builds cmd/ferry, which runs the lab's DNS responder (`ferry lab dns`).
func ferryCLI(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "ferry")
	if out, err := exec.CommandContext(t.Context(), "go", "build", "-o", bin, "github.com/ferrymesh/ferry/cmd/ferry").CombinedOutput(); err != nil {
		t.Fatalf("build ferry: %v\n%s", err, out)
	}
	return bin
}

func dnsConfig(t *testing.T, tag string) Config {
	cfg := testConfig(t, tag)
	cfg.Nodes[0].Pods = append(cfg.Nodes[0].Pods, PodConfig{Name: "shopper", Namespace: "shop", Enrolled: true})
	cfg.Services = []ServiceConfig{
		{Name: "web", ClusterIP: netip.MustParseAddr("10.96.0.50"), Port: 80, TargetPort: 8080, Pods: []string{"b", "c"}},
		{Name: "api", Namespace: "shop", ClusterIP: netip.MustParseAddr("10.96.0.60"), Port: 80},
	}
	cfg.DNS.Binary = ferryCLI(t)
	return cfg
}

// getent runs glibc's resolver (getent hosts NAME) in pod with extra environment.
func getent(t *testing.T, l *Lab, pod, name string, env ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	cmd := l.Command(ctx, pod, "getent", "hosts", name)
	cmd.Env = append(cmd.Env, env...)
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

// Service names resolve in the pods through glibc, over UDP and over TCP, with the
// search list of the pod's namespace, as in a cluster.
func TestDNSServiceNamesInPods(t *testing.T) {
	privileged.Require(t)
	t.Parallel()
	hostResolv, err := os.ReadFile("/etc/resolv.conf")
	if err != nil {
		t.Fatal(err)
	}
	l := up(t, dnsConfig(t, "n"))
	for _, c := range []struct{ pod, name, want string }{
		{"a", "web.default.svc.cluster.local", "10.96.0.50"},
		{"a", "web.default.svc.cluster.local.", "10.96.0.50"},
		{"c", "web.default", "10.96.0.50"}, // on the other node, through its own gateway
		{"a", "web", "10.96.0.50"},
		{"d", "web", "10.96.0.50"}, // outside the mesh too
		{"a", "api.shop", "10.96.0.60"},
		{"shopper", "api", "10.96.0.60"},
		{"shopper", "web.default", "10.96.0.50"},
	} {
		for _, transport := range []string{"udp", "tcp"} {
			var env []string
			if transport == "tcp" {
				env = append(env, "RES_OPTIONS=use-vc") // glibc: every query over TCP
			}
			out, err := getent(t, l, c.pod, c.name, env...)
			if err != nil {
				t.Errorf("%s: getent hosts %s over %s: %v: %s", c.pod, c.name, transport, err, out)
				continue
			}
			if f := strings.Fields(out); len(f) < 2 || f[0] != c.want {
				t.Errorf("%s: getent hosts %s over %s = %q, want %s", c.pod, c.name, transport, out, c.want)
			}
		}
	}
	// Not found: a Service of another namespace by its short name, an unknown Service.
	// getent exits 2 for a name that does not exist.
	for _, c := range []struct{ pod, name string }{
		{"a", "api"},
		{"a", "nope.default.svc.cluster.local"},
		{"a", "nope"},
	} {
		out, err := getent(t, l, c.pod, c.name)
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 2 {
			t.Errorf("%s: getent hosts %s: %v %q, want exit status 2 (not found)", c.pod, c.name, err, out)
		}
	}
	// A name outside the zone fails at once: REFUSED, not a timeout. glibc waits 5 s
	// for a server that does not answer, so an answer before that is a refusal.
	start := time.Now()
	if out, err := getent(t, l, "a", "example.com"); err == nil {
		t.Errorf("getent hosts example.com in the lab: %q, want a failure (nothing is forwarded)", out)
	}
	if took := time.Since(start); took > 4*time.Second {
		t.Errorf("getent hosts example.com took %v: the responder did not answer, the resolver timed out", took)
	}

	// What the resolver was told, and what it was told in the responder's own words.
	out, err := l.Command(t.Context(), "shopper", "cat", "/etc/resolv.conf").CombinedOutput()
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"nameserver 10.100.1.1\n", "search shop.svc.cluster.local svc.cluster.local cluster.local\n", "options ndots:5\n"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("resolv.conf in pod shopper lacks %q:\n%s", want, out)
		}
	}
	checkRcodes(t, l)

	// The host's resolver is untouched.
	if now, _ := os.ReadFile("/etc/resolv.conf"); string(now) != string(hostResolv) {
		t.Errorf("the host's /etc/resolv.conf changed:\n%s", now)
	}
	if mi, _ := os.ReadFile("/proc/self/mountinfo"); strings.Contains(string(mi), "resolv.conf") {
		t.Errorf("a resolv.conf is mounted in the host's mount namespace:\n%s", mi)
	}
	if st := l.Status(); st.DNS == nil || !st.DNS.Alive {
		t.Errorf("status: dns %+v, want a running responder", st.DNS)
	}
}

// checkRcodes asks the responder, from pod a's namespace, with Go's resolver, and
// checks the answers' kinds: NXDOMAIN (no such host) in the zone, a server failure
// outside it.
func checkRcodes(t *testing.T, l *Lab) {
	t.Helper()
	ns, err := l.Netns("a")
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	r := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		var c net.Conn
		// The socket is made in the pod's namespace and stays there.
		err := ns.Do(func() (err error) {
			var d net.Dialer
			c, err = d.DialContext(ctx, network, "10.100.1.1:53")
			return err
		})
		return c, err
	}}
	if got, err := r.LookupHost(t.Context(), "web.default.svc.cluster.local."); err != nil || len(got) != 1 || got[0] != "10.96.0.50" {
		t.Errorf("go resolver: web = %v, %v", got, err)
	}
	var de *net.DNSError
	if _, err := r.LookupHost(t.Context(), "nope.default.svc.cluster.local."); !errors.As(err, &de) || !de.IsNotFound {
		t.Errorf("go resolver: unknown service: %v, want no such host (NXDOMAIN)", err)
	}
	if _, err := r.LookupHost(t.Context(), "example.com."); !errors.As(err, &de) || de.IsNotFound || de.IsTimeout {
		t.Errorf("go resolver: example.com: %v, want a refusal (neither not found nor a timeout)", err)
	}
}

// The responder ends with the lab, and with a crashed lab's leftovers.
func TestDNSStopsWithTheLab(t *testing.T) {
	privileged.Require(t)
	t.Parallel()
	cfg := dnsConfig(t, "q")
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	l, err := Up(ctx, cfg, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	pid := l.Status().DNS.PID
	if err := l.Down(); err != nil {
		t.Fatal(err)
	}
	if pidAlive(pid, 0) {
		t.Errorf("dns pid %d survived down", pid)
	}

	// A crashed run whose description is unreadable: the prefix rule (the lab's
	// cgroup tree) still finds the responder.
	l, err = Up(ctx, cfg, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	l.Close()
	pid = l.Status().DNS.PID
	if err := os.WriteFile(filepath.Join(cfg.StateDir, descriptionFile), []byte("{torn"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := Clean(cfg.Prefix, cfg.StateDir, testLog(t)); err != nil {
		t.Fatal(err)
	}
	if pidAlive(pid, 0) {
		t.Errorf("dns pid %d survived clean by prefix", pid)
	}
}
