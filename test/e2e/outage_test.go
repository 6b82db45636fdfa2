package e2e

// Outages of the control plane past the certificates' lifetime, fabric faults and
// load held, on a lab of their own (prefix "ou", pods in 10.117.0.0/16) whose
// operator issues short certificates, so an hour's outage is compressed into a
// minute.

import (
	"context"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/api/admin"
	"github.com/ferrymesh/ferry/lab"
)

const (
	ouPrefix = "ou"
	ouPodNet = 117
	// ouCertTTL is the certificates' lifetime: renewed at half of it, so an operator
	// away longer than ouCertTTL outlives every certificate the agents hold.
	ouCertTTL = 40 * time.Second
)

var ouLab = onceLab{what: "outage lab", bringUp: ouBringUp}

// ouSetup returns the outage lab: a and b on node1, c on node2 (namespace ops),
// with echo servers in a and c.
func ouSetup(t *testing.T) *env { return ouLab.get(t) }

func ouBringUp() (*env, error) {
	cfg := lab.Config{
		Prefix:   ouPrefix,
		PodNet:   ouPodNet,
		Operator: lab.OperatorConfig{Args: []string{"--cert-ttl", ouCertTTL.String()}},
		Nodes: []lab.NodeConfig{
			{Name: "node1", Pods: []lab.PodConfig{
				{Name: "a", Namespace: "ops", ServiceAccount: "web", Enrolled: true},
				{Name: "b", Namespace: "ops", ServiceAccount: "api", Enrolled: true},
			}},
			{Name: "node2", Pods: []lab.PodConfig{
				{Name: "c", Namespace: "ops", ServiceAccount: "db", Enrolled: true},
			}},
		},
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	e, err := newEnv(ctx, cfg, "ferry", "ferry-agent", "ferry-operator")
	if err != nil {
		return nil, err
	}
	for _, pod := range []string{"a", "c"} {
		if err := e.startServer(ctx, pod, echoPort); err != nil {
			return e.fail(err)
		}
	}
	return e, nil
}

// heldCert is node's agent's certificate for pod, waiting up to 30 s for one.
func (e *env) heldCert(t *testing.T, node, pod string) admin.HeldCert {
	t.Helper()
	id := e.pod(pod).Identity
	deadline := time.Now().Add(30 * time.Second)
	for {
		for _, c := range e.status(t, node).Certificates {
			if c.Identity == id && time.Now().Before(c.NotAfter) {
				return c
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent on %s holds no valid certificate for %s", node, pod)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// check runs `ferry check --lab ou` and returns its output (it fails when a check
// does: that is the point here).
func (e *env) check(t *testing.T) string {
	t.Helper()
	out, _ := exec.Command(filepath.Join(e.bin, "ferry"), "check", "--lab", ouPrefix).CombinedOutput()
	return string(out)
}

// The operator (and its CA) is away past half the certificates' life and past
// their expiry: while they are valid every connection a→c succeeds; `ferry check`
// says when one is about to expire; once a's has expired its connections are
// refused with certificate_expired on the record and in the log, never carried
// with an expired certificate; when the operator returns the certificates are
// renewed within seconds and a→c is carried again.
func TestOutageOperatorPastCertificateLifetime(t *testing.T) {
	e := ouSetup(t)
	e.waitEnrolled(t, "node1", "ops/a", "ops/b")
	e.waitEnrolled(t, "node2", "ops/c")
	e.mustRun(t, "a", "echo", e.addr("c", echoPort), "4096")

	if err := e.lab.StopOperator(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	restarted := false
	t.Cleanup(func() {
		if restarted {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := e.lab.StartOperator(ctx); err != nil {
			t.Error(err)
		}
	})
	down := time.Now()
	// What the agents hold now is all they will have until the operator returns
	// (a renewal may have landed just before the kill: read after it).
	time.Sleep(time.Second)
	ca, cc := e.heldCert(t, "node1", "a"), e.heldCert(t, "node2", "c")
	first := ca.NotAfter
	if cc.NotAfter.Before(first) {
		first = cc.NotAfter
	}
	last := ca.NotAfter
	if cc.NotAfter.After(last) {
		last = cc.NotAfter
	}
	t.Logf("operator down; a's certificate expires in %s, c's in %s", time.Until(ca.NotAfter).Round(time.Second), time.Until(cc.NotAfter).Round(time.Second))

	// Valid: every new connection succeeds, past the renewal point (half life),
	// until 2 s before the first expiry.
	ok, failed := 0, 0
	var firstErr error
	warned := ""
	// a→c's records on the side whose certificate expires first carry it (node1's
	// outbound records a's, node2's inbound ones c's): from when it has under a
	// fifth of its lifetime left (the rule ferry check uses) they say it is expiring.
	side := ouSide{node: "node1", dir: admin.Outbound, cert: ca}
	if cc.NotAfter.Before(ca.NotAfter) {
		side = ouSide{node: "node2", dir: admin.Inbound, cert: cc}
	}
	expiringFrom := side.cert.NotAfter.Add(-time.Duration(admin.CertExpiringShare * float64(side.cert.NotAfter.Sub(side.cert.Issued))))
	var fresh, expiring connRecord
	flowNote := ""
	for time.Now().Before(first.Add(-2 * time.Second)) {
		began := time.Now()
		if _, err := e.run(t, "a", "echo", e.addr("c", echoPort), "1024"); err != nil {
			failed++
			if firstErr == nil {
				firstErr = err
			}
		} else {
			ok++
		}
		// Under 20% of its life left (8 s of 40 s), with renewal overdue.
		if warned == "" && time.Until(first) < ouCertTTL/5-time.Second {
			warned = e.check(t)
		}
		switch {
		case fresh.ID == 0 && time.Now().Before(expiringFrom.Add(-time.Second)):
			fresh = e.ouRecord(t, side, began)
		case expiring.ID == 0 && began.After(expiringFrom.Add(500*time.Millisecond)):
			expiring = e.ouRecord(t, side, began)
			flowNote = e.ouFlowLine(t, side.node, began)
		}
	}
	if failed > 0 || ok == 0 {
		t.Fatalf("with valid certificates and the operator down: %d ok, %d failed; first: %v", ok, failed, firstErr)
	}
	t.Logf("operator down %s: %d connections a→c, 0 failed, while the certificates were valid", time.Since(down).Round(time.Second), ok)
	if !strings.Contains(warned, "renewal is overdue") {
		t.Errorf("ferry check with under 20%% of the lifetime left did not say so:\n%s", warned)
	}
	if fresh.ID == 0 || fresh.CertExpiring || !fresh.CertNotAfter.Equal(side.cert.NotAfter) {
		t.Errorf("a→c on %s with most of %s left: %+v, want not expiring, not after %s", side.node, side.cert.Identity, fresh, side.cert.NotAfter)
	}
	if expiring.ID == 0 || !expiring.CertExpiring || !expiring.CertNotAfter.Equal(side.cert.NotAfter) {
		t.Errorf("a→c on %s with under 20%% of %s left: %+v, want expiring, not after %s", side.node, side.cert.Identity, expiring, side.cert.NotAfter)
	}
	if !strings.Contains(flowNote, "[cert expires in ") {
		t.Errorf("ferry observe does not say %s is about to expire: %q", side.cert.Identity, flowNote)
	}
	t.Logf("%s under 20%% left from %s: a→c's %s record says expiring; ferry observe: %s", side.cert.Identity, expiringFrom.Format("15:04:05"), side.dir, flowNote)

	// Expired: refused, with the typed reason, on the record and in the log.
	time.Sleep(time.Until(last) + time.Second)
	e.mustRun(t, "a", "refused", e.addr("c", echoPort))
	rec := e.findConn(t, "node1", func(c connRecord) bool {
		return c.Direction == admin.Outbound && c.Src.Addr() == e.pod("a").IP && c.Dst.Addr() == e.pod("c").IP && c.End.After(last)
	})
	if rec.Verdict != admin.VerdictDenied || rec.Reason != admin.ReasonCertExpired || rec.BytesSent != 0 {
		t.Fatalf("a→c past expiry: %+v, want denied with %s", rec, admin.ReasonCertExpired)
	}
	if log := tailFile(e.lab.AgentLog("node1"), 400); !strings.Contains(log, "certificate expired; refusing the pod's mesh connections") {
		t.Errorf("node1's log does not say the certificate expired:\n%s", tailFile(e.lab.AgentLog("node1"), 20))
	}
	if out := e.check(t); !strings.Contains(out, "certificate_expired") {
		t.Errorf("ferry check past expiry does not name the expired certificate:\n%s", out)
	}
	t.Logf("past expiry a→c refused: %s (%s)", rec.Reason, rec.Error)

	// Back: renewed within seconds, and carried again.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := e.lab.StartOperator(ctx); err != nil {
		t.Fatal(err)
	}
	restarted = true
	back := time.Now()
	for _, w := range []struct{ node, pod, serial string }{{"node1", "a", ca.Serial}, {"node2", "c", cc.Serial}} {
		for e.heldCert(t, w.node, w.pod).Serial == w.serial {
			if time.Since(back) > 20*time.Second {
				t.Fatalf("%s's certificate not renewed 20 s after the operator returned", w.pod)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	renewed := time.Since(back)
	e.mustRun(t, "a", "echo", e.addr("c", echoPort), "65536")
	if out := e.check(t); strings.Contains(out, "certificate_expired") || strings.Contains(out, "renewal is overdue") {
		t.Errorf("ferry check after renewal still warns:\n%s", out)
	}
	t.Logf("operator back after %s: both certificates renewed %s later; a→c carried again", back.Sub(down).Round(time.Second), renewed.Round(10*time.Millisecond))
}

// ouSide is where a connection a→c is recorded with a pod's certificate.
type ouSide struct {
	node string
	dir  admin.Direction
	cert admin.HeldCert
}

// ouRecord is side's record of a connection a→c that began after since.
func (e *env) ouRecord(t *testing.T, side ouSide, since time.Time) connRecord {
	t.Helper()
	return e.findConn(t, side.node, func(c connRecord) bool {
		return c.Direction == side.dir && c.Src.Addr() == e.pod("a").IP && c.Dst.Addr() == e.pod("c").IP && c.Start.After(since) && !c.End.IsZero()
	})
}

// ouFlowLine is the compact line `ferry observe` prints for node's first flow a→c
// recorded after since.
func (e *env) ouFlowLine(t *testing.T, node string, since time.Time) string {
	t.Helper()
	var out []byte
	for deadline := time.Now().Add(carryWait); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		var err error
		out, err = exec.Command(filepath.Join(e.bin, "ferry"), "observe", "--lab", ouPrefix, "--node", node,
			"--from-pod", "ops/a", "--to-pod", "ops/c", "--since", sinceText(since)).Output()
		if err != nil {
			t.Fatalf("ferry observe: %v", err)
		}
		if line, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n"); line != "" {
			return line
		}
	}
	t.Fatalf("ferry observe shows no flow a→c on %s since %s", node, since.Format(time.RFC3339Nano))
	return ""
}

// After a rotation at half life, new connections a→c present a's new certificate:
// c's records show its serial, although the tunnel pooled before the rotation still
// carries a connection held open across it (which keeps flowing).
func TestOutageRotationNewSerialSeen(t *testing.T) {
	e := ouSetup(t)
	e.waitEnrolled(t, "node1", "ops/a", "ops/b")
	e.waitEnrolled(t, "node2", "ops/c")
	release := e.hold(t, "a", e.addr("c", echoPort))
	e.waitLive(t, "node1", "a", "c", echoPort)

	inbound := func(since time.Time) connRecord {
		return e.findConn(t, "node2", func(c connRecord) bool {
			return c.Direction == admin.Inbound && c.Src.Addr() == e.pod("a").IP && c.Start.After(since) && !c.End.IsZero() && c.PeerSerial != ""
		})
	}
	before := e.heldCert(t, "node1", "a")
	began := time.Now()
	e.mustRun(t, "a", "echo", e.addr("c", echoPort), "4096")
	old := inbound(began)
	if serialOf(old.PeerSerial) != serialOf(before.Serial) {
		// a renewal landed between reading the held certificate and the connection
		before = e.heldCert(t, "node1", "a")
	}
	if serialOf(old.PeerSerial) != serialOf(before.Serial) {
		t.Fatalf("c saw serial %s from a; node1 holds %s", old.PeerSerial, before.Serial)
	}

	deadline := time.Now().Add(ouCertTTL)
	after := before
	for serialOf(after.Serial) == serialOf(before.Serial) {
		if time.Now().After(deadline) {
			t.Fatalf("a's certificate %s not renewed within its %s lifetime", before.Serial, ouCertTTL)
		}
		time.Sleep(200 * time.Millisecond)
		after = e.heldCert(t, "node1", "a")
	}
	rotated := time.Now()
	e.mustRun(t, "a", "echo", e.addr("c", echoPort), "4096")
	rec := inbound(rotated)
	if serialOf(rec.PeerSerial) != serialOf(after.Serial) {
		t.Fatalf("after the rotation c saw serial %s from a, want the new %s (old %s)", rec.PeerSerial, after.Serial, before.Serial)
	}
	if err := release(); err != nil {
		t.Fatalf("the connection held across the rotation broke: %v", err)
	}
	t.Logf("a's certificate rotated %s → %s; c's record of the next connection shows %s", before.Serial, after.Serial, rec.PeerSerial)
}

// serialOf is a hex serial number without leading zeros: the admin API prints
// them both with and without.
func serialOf(s string) string { return strings.TrimLeft(strings.ToLower(s), "0") }
