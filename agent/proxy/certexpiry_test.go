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
