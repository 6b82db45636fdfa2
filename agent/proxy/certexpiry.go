// This file keeps the proxy from serving with an expired certificate, and marks
// the records of a pod whose certificate is about to expire.

package proxy

import (
	"fmt"
	"time"

	"github.com/ferrymesh/ferry/api/admin"
)

// CertExpiredError refuses a connection of a pod whose own certificate has expired
// (the operator or its CA was away past the certificate's life). A tunnel pooled
// while the certificate was valid would still carry it, so the proxy checks before
// every stream, not only at the handshake.
type CertExpiredError struct {
	Identity string
	NotAfter time.Time
}

func (e *CertExpiredError) Error() string {
	return fmt.Sprintf("certificate of %s expired at %s; its connections are refused until the operator renews it",
		e.Identity, e.NotAfter.UTC().Format(time.RFC3339))
}

// certValid returns a *CertExpiredError when pd's certificate has expired at now,
// and logs the first refusal of each expired certificate. No certificate at all is
// left to the handshake, which fails without one.
func (pd *pod) certValid(now time.Time) error {
	c, err := pd.ids.Certificate(pd.w.Identity)
	if err != nil || c.Leaf == nil || now.Before(c.Leaf.NotAfter) {
		return nil
	}
	notAfter := c.Leaf.NotAfter
	if pd.expiredLogged.Swap(notAfter.UnixNano()) != notAfter.UnixNano() {
		pd.proxy.log.Warn("certificate expired; refusing the pod's mesh connections until it is renewed",
			"pod", pd.w.Name, "identity", pd.w.Identity, "not_after", notAfter.UTC().Format(time.RFC3339))
	}
	return &CertExpiredError{Identity: pd.w.Identity, NotAfter: notAfter}
}

// certExpiry notes on c, as of now, when the certificate of this agent's pod on it
// expires (the source's outbound, the destination's inbound) and whether it is
// about to (admin.CertExpiring, the rule ferry check uses): a user reading flows
// sees an outage of the operator before the pod's connections are refused.
func (t *tracker) certExpiry(c *Conn, now time.Time) {
	id := c.SrcIdentity
	if c.Direction == admin.Inbound {
		id = c.DstIdentity
	}
	if t.lifetime == nil || id == "" {
		return
	}
	issued, notAfter, ok := t.lifetime(id)
	if !ok {
		return
	}
	c.CertNotAfter = notAfter
	c.CertExpiring = admin.CertExpiring(issued, notAfter, now, admin.CertExpiringShare)
}
