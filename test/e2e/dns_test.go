package e2e

import (
	"context"
	"errors"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/api/admin"
)

// inPod runs name in pod through the lab (its netns, cgroup and resolv.conf) with
// extra environment, and returns its combined output.
func (e *env) inPod(t *testing.T, pod string, env []string, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	cmd := e.lab.Command(ctx, pod, name, args...)
	cmd.Env = append(cmd.Env, env...)
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

// An app in an enrolled pod reaches a Service by name: Go's resolver (ferry's echo
// client) and glibc's (getent) find the cluster IP in the lab's DNS, and the
// connection goes through the mesh to one of the Service's endpoints.
func TestDNSServiceByName(t *testing.T) {
	e := setup(t)
	ferry := filepath.Join(e.bin, "ferry")
	svc := netip.AddrPortFrom(webVIP, servicePort)
	for _, name := range []string{"web.default.svc.cluster.local", "web.default", "web"} {
		out, err := e.inPod(t, "a", nil, "getent", "hosts", name)
		if f := strings.Fields(out); err != nil || len(f) < 2 || f[0] != webVIP.String() {
			t.Errorf("getent hosts %s in a: %q, %v; want %s", name, out, err, webVIP)
		}
	}
	for _, to := range []string{"web.default:80", "web.default.svc.cluster.local:80", "web:80"} {
		since := time.Now()
		out, err := e.inPod(t, "a", nil, ferry, "lab", "echo-client", "--to", to, "--bytes", "4096")
		if err != nil {
			t.Errorf("echo-client --to %s: %v\n%s", to, err, out)
			continue
		}
		rec := e.findConn(t, "node1", func(c connRecord) bool {
			return c.Service == svc && !c.Start.Before(since) && c.BytesSent == 4096
		})
		if rec.Verdict != admin.VerdictForwarded {
			t.Errorf("echo-client --to %s: carried as %s %s to %s, want forwarded through the Service", to, rec.Security, rec.Verdict, rec.Dst)
		}
	}
}

// An unknown Service is NXDOMAIN: both resolvers say the host does not exist. A short
// unknown name fails at once too, but Go reports the last of its tries, the absolute
// name outside the zone, which the lab refuses (there is no upstream to ask).
func TestDNSUnknownService(t *testing.T) {
	e := setup(t)
	ferry := filepath.Join(e.bin, "ferry")
	out, err := e.inPod(t, "a", nil, "getent", "hosts", "nope.default.svc.cluster.local")
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 2 {
		t.Errorf("getent hosts nope.default.svc.cluster.local: %v %q, want exit status 2 (not found)", err, out)
	}
	out, err = e.inPod(t, "a", nil, ferry, "lab", "echo-client", "--to", "nope.default.svc.cluster.local:80", "--bytes", "1")
	if err == nil || !strings.Contains(out, "no such host") {
		t.Errorf("echo-client --to nope.default.svc.cluster.local:80: %v %q, want a failure saying no such host", err, out)
	}
	out, err = e.inPod(t, "a", nil, ferry, "lab", "echo-client", "--to", "nope.default:80", "--bytes", "1")
	if err == nil || !strings.Contains(out, "lookup nope.default") || strings.Contains(out, "timeout") {
		t.Errorf("echo-client --to nope.default:80: %v %q, want a lookup failure without a timeout", err, out)
	}
}

// DNS over TCP from an enrolled pod is a TCP connection like any other: connect4
// captures it, and the agent carries it in plaintext to the node's resolver, which is
// outside the mesh. (Over UDP it is not captured at all: the tests above.)
func TestDNSOverTCPThroughTheMesh(t *testing.T) {
	e := setup(t)
	a := e.pod("a").IP.As4()
	gateway := netip.AddrPortFrom(netip.AddrFrom4([4]byte{a[0], a[1], a[2], 1}), 53)
	since := time.Now()
	out, err := e.inPod(t, "a", []string{"RES_OPTIONS=use-vc"}, "getent", "hosts", "web.default")
	if f := strings.Fields(out); err != nil || len(f) < 2 || f[0] != webVIP.String() {
		t.Fatalf("getent hosts web.default over TCP in a: %q, %v; want %s", out, err, webVIP)
	}
	rec := e.findConn(t, "node1", func(c connRecord) bool {
		return c.Dst == gateway && !c.Start.Before(since) && !c.End.IsZero()
	})
	if rec.Security != admin.Plaintext || rec.Verdict != admin.VerdictForwarded || rec.BytesRecv == 0 {
		t.Errorf("DNS over TCP to %s: %s %s, %d bytes back; want plaintext, forwarded, an answer", gateway, rec.Security, rec.Verdict, rec.BytesRecv)
	}
}
