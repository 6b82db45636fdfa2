package proxy

import (
	"errors"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/agent/identity"
	"github.com/ferrymesh/ferry/agent/identity/identitytest"
	"github.com/ferrymesh/ferry/api/admin"
)

// A pod whose certificate has expired is refused before any tunnel is asked (a
// pooled tunnel would still carry it), with the typed reason; once renewed it is
// carried again.
func TestOutboundRefusedWithExpiredCertificate(t *testing.T) {
	tp := newTestProxy(t)
	ca := identitytest.NewCA(t)
	now := time.Now()
	expired := ca.Issue(t, wa.Identity, now.Add(-2*time.Minute), now.Add(-time.Second))
	if err := tp.cfg.Identities.Update(ca.RootPEM, map[string]identity.CertPEM{wa.Identity: expired}); err != nil {
		t.Fatal(err)
	}
	dst := netip.AddrPortFrom(wc.IPs[0], 8080)
	_, err, rec := tp.outbound(t, tp.a, dst, "ping")
	if !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, syscall.EPIPE) {
		t.Errorf("client saw %v, want a reset", err)
	}
	if rec.Verdict != admin.VerdictDenied || rec.Reason != admin.ReasonCertExpired || rec.BytesSent != 0 {
		t.Errorf("record %+v, want denied with %s", rec, admin.ReasonCertExpired)
	}
	if len(tp.tunnels.log) != 0 {
		t.Errorf("a tunnel was asked for with an expired certificate: %+v", tp.tunnels.log)
	}

	if err := tp.cfg.Identities.Update(ca.RootPEM, map[string]identity.CertPEM{wa.Identity: ca.Valid(t, wa.Identity)}); err != nil {
		t.Fatal(err)
	}
	reply, err, rec := tp.outbound(t, tp.a, dst, "ping")
	if err != nil || reply != "ping" || rec.Verdict != admin.VerdictForwarded {
		t.Errorf("after renewal: reply %q, %v, record %+v", reply, err, rec)
	}
}

// A record of a pod whose certificate has under a fifth of its lifetime left says
// so, with when it expires; the lifetime runs from when the agent asked for it, not
// from the CA's backdated NotBefore.
func TestRecordSaysCertificateExpiring(t *testing.T) {
	tp := newTestProxy(t)
	ca := identitytest.NewCA(t)
	dst := netip.AddrPortFrom(wc.IPs[0], 8080)
	now := time.Now()
	for _, tc := range []struct {
		name     string
		issued   time.Time
		notAfter time.Time
		want     bool
	}{
		{"a tenth left", now.Add(-90 * time.Second), now.Add(10 * time.Second), true},
		{"fresh, NotBefore backdated", now.Add(-5 * time.Second), now.Add(time.Minute), false},
		{"issue time unknown, NotBefore used", time.Time{}, now.Add(time.Minute), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := ca.Issue(t, wa.Identity, now.Add(-10*time.Minute), tc.notAfter)
			c.Issued = tc.issued
			if err := tp.cfg.Identities.Update(ca.RootPEM, map[string]identity.CertPEM{wa.Identity: c}); err != nil {
				t.Fatal(err)
			}
			reply, err, rec := tp.outbound(t, tp.a, dst, "ping")
			if err != nil || reply != "ping" {
				t.Fatalf("reply %q, %v", reply, err)
			}
			if rec.CertExpiring != tc.want || !rec.CertNotAfter.Equal(tc.notAfter.Truncate(time.Second)) {
				t.Errorf("record expiring %v, not after %s; want %v, %s", rec.CertExpiring, rec.CertNotAfter, tc.want, tc.notAfter.Truncate(time.Second))
			}
		})
	}
}

// Inbound, the record carries the destination pod's certificate, not the source's.
func TestInboundRecordCarriesDestinationCertificate(t *testing.T) {
	now := time.Now()
	lives := map[string][2]time.Time{
		wa.Identity: {now.Add(-time.Minute), now.Add(time.Second)}, // expiring
		wc.Identity: {now.Add(-time.Second), now.Add(time.Minute)}, // fresh
	}
	tr := newTracker(4)
	tr.lifetime = func(id string) (time.Time, time.Time, bool) {
		l, ok := lives[id]
		return l[0], l[1], ok
	}
	in := tr.open(Conn{Direction: admin.Inbound, SrcIdentity: wa.Identity, DstIdentity: wc.Identity})
	out := tr.open(Conn{Direction: admin.Outbound, SrcIdentity: wa.Identity, DstIdentity: wc.Identity})
	if in.CertExpiring || !in.CertNotAfter.Equal(lives[wc.Identity][1]) {
		t.Errorf("inbound record %+v, want c's fresh certificate", in)
	}
	if !out.CertExpiring || !out.CertNotAfter.Equal(lives[wa.Identity][1]) {
		t.Errorf("outbound record %+v, want a's expiring certificate", out)
	}
}
