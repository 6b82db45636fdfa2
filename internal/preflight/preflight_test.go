package preflight

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/api/admin"
)

func TestKernelAtLeast(t *testing.T) {
	for _, tc := range []struct {
		release string
		want    bool
	}{
		{"6.18.0-foo", true}, {"5.15.0", true}, {"5.15", true}, {"5.14.21-150500", false}, {"4.19.0", false}, {"10.0", true}, {"junk", false},
	} {
		if got := kernelAtLeast(tc.release, MinKernel); got != tc.want {
			t.Errorf("kernelAtLeast(%q, %q) = %t, want %t", tc.release, MinKernel, got, tc.want)
		}
	}
	if r := kernelCheck("5.4.0"); r.OK || r.Detail != "5.4.0 is older than 5.15" {
		t.Errorf("kernel 5.4: %+v", r)
	}
}

func TestCapabilityCheck(t *testing.T) {
	all := fmt.Sprintf("Name:\tferry\nCapEff:\t%016x\n", uint64(1)<<39|1<<12|1<<21|1<<19)
	if r := capabilityCheck(all); !r.OK {
		t.Errorf("all capabilities: %+v", r)
	}
	r := capabilityCheck("CapEff:\t0000000000001000\n") // CAP_NET_ADMIN only
	if r.OK || r.Detail != "missing CAP_BPF, CAP_SYS_ADMIN, CAP_SYS_PTRACE (run as root, or as the agent runs)" {
		t.Errorf("net admin only: %+v", r)
	}
	if r := capabilityCheck("CapEff:\tzz\n"); r.OK || !strings.HasPrefix(r.Detail, "CapEff: ") {
		t.Errorf("bad CapEff: %+v", r)
	}
}

func TestCertCheck(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	ca := admin.CertInfo{Identity: "ca", NotBefore: now.Add(-time.Hour), NotAfter: now.Add(365 * 24 * time.Hour)}
	good := admin.CertInfo{Identity: "spiffe://td/ns/a/sa/a", NotBefore: now.Add(-time.Hour), NotAfter: now.Add(90 * time.Minute)}
	for _, tc := range []struct {
		name   string
		certs  admin.Certs
		ok     bool
		detail string
	}{
		{"valid", admin.Certs{Workloads: []admin.CertInfo{good}, TrustBundle: []admin.CertInfo{ca}}, true,
			"1 workload certificates and 1 CAs valid; first expiry in 1h30m"},
		{"no bundle", admin.Certs{Workloads: []admin.CertInfo{good}}, false, "no trust bundle"},
		{"expiring", admin.Certs{Workloads: []admin.CertInfo{{Identity: "w", NotAfter: now.Add(time.Minute)}}, TrustBundle: []admin.CertInfo{ca}}, false,
			"w: expires in 1m0s (2026-01-01T00:01:00Z), under 1h0m"},
		{"expired", admin.Certs{Workloads: []admin.CertInfo{{Identity: "w", NotAfter: now.Add(-time.Second)}}, TrustBundle: []admin.CertInfo{ca}}, false,
			"w: expired at 2025-12-31T23:59:59Z (certificate_expired: its connections are refused)"},
		{"future", admin.Certs{Workloads: []admin.CertInfo{{Identity: "w", NotBefore: now.Add(time.Hour), NotAfter: now.Add(48 * time.Hour)}}, TrustBundle: []admin.CertInfo{ca}}, false,
			"w: not valid before 2026-01-01T01:00:00Z"},
		{"error", admin.Certs{Workloads: []admin.CertInfo{{Identity: "w", Error: "no key"}}, TrustBundle: []admin.CertInfo{ca}}, false, "w: no key"},
	} {
		r := certCheck("certificates", tc.certs, nil, now, CertWarn{Left: time.Hour})
		if r.OK != tc.ok || r.Detail != tc.detail {
			t.Errorf("%s: %+v, want ok %t %q", tc.name, r, tc.ok, tc.detail)
		}
	}
}

// A 60 s certificate asked for 50 s ago has a sixth of its life left: under 20%,
// however the CA backdated NotBefore.
func TestCertCheckFractionOfLifetime(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	ca := admin.CertInfo{Identity: "ca", NotBefore: now.Add(-time.Hour), NotAfter: now.Add(365 * 24 * time.Hour)}
	w := admin.CertInfo{Identity: "w", NotBefore: now.Add(-5*time.Minute - 50*time.Second), NotAfter: now.Add(10 * time.Second)}
	certs := admin.Certs{Workloads: []admin.CertInfo{w}, TrustBundle: []admin.CertInfo{ca}}
	warn := CertWarn{Fraction: 0.2}
	r := certCheck("certificates", certs, map[string]time.Time{"w": now.Add(-50 * time.Second)}, now, warn)
	if want := "w: expires in 10s (2026-01-01T00:00:10Z): 17% of its 1m0s lifetime left, under 20%; renewal is overdue"; r.OK || r.Detail != want {
		t.Errorf("%+v, want %q", r, want)
	}
	r = certCheck("certificates", certs, map[string]time.Time{"w": now.Add(-20 * time.Second)}, now, warn)
	if !r.OK {
		t.Errorf("a third of its life left: %+v", r)
	}
}

func TestWriteTableAndFailed(t *testing.T) {
	rs := []Result{pass("kernel", "6.18.0"), fail("bpffs node1", "not mounted")}
	var b bytes.Buffer
	WriteTable(&b, rs)
	want := "CHECK        RESULT  DETAIL\nkernel       pass    6.18.0\nbpffs node1  FAIL    not mounted\n"
	if b.String() != want {
		t.Errorf("table:\n%s\nwant:\n%s", b.String(), want)
	}
	if got := Failed(rs); !reflect.DeepEqual(got, []string{"bpffs node1"}) {
		t.Errorf("Failed = %v", got)
	}
}

// Without an agent, the agent checks fail and say why, without root.
func TestAgentNotRunning(t *testing.T) {
	dir := t.TempDir()
	rs := Agent(context.Background(), Target{Node: "node1", AdminSocket: filepath.Join(dir, "agent.sock"), PinDir: dir}, CertWarn{Left: time.Hour})
	if len(rs) != 2 {
		t.Fatalf("results %+v, want bpffs and agent", rs)
	}
	if rs[0].Name != "bpffs node1" || rs[0].OK || !strings.Contains(rs[0].Detail, "bpffs is not mounted at "+dir) {
		t.Errorf("bpffs: %+v", rs[0])
	}
	if rs[1].Name != "agent node1" || rs[1].OK || !strings.Contains(rs[1].Detail, "is the agent running? its admin socket") {
		t.Errorf("agent: %+v", rs[1])
	}
	if err := pinDirOnBPFFS(filepath.Join(dir, "missing")); err == nil || !strings.Contains(err.Error(), "does not exist") {
		t.Errorf("missing pin folder: %v", err)
	}
}

// A socket file nobody listens on is an agent that died.
func TestUnreachableRefused(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "agent.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	rs := Agent(context.Background(), Target{AdminSocket: sock, PinDir: t.TempDir()}, CertWarn{Left: time.Hour})
	if last := rs[len(rs)-1]; last.Name != "agent" || !strings.Contains(last.Detail, "(the agent that owned "+sock+" is not running)") {
		t.Errorf("agent: %+v", last)
	}
}
