// This file holds the one rule that says a certificate is about to expire, shared by
// ferry check and the agent's connection records, so the two never disagree.

package admin

import "time"

// CertExpiringShare is the share of a certificate's lifetime left under which it is
// about to expire. Agents renew at half life, so with under a fifth left renewal is
// overdue: the operator or its CA has been away. ferry check fails on it (its
// default --cert-warn) and connection records carry it (Conn.CertExpiring).
const CertExpiringShare = 0.2

// CertExpiring says whether a certificate valid from issued (when the agent asked
// for it: the CA backdates NotBefore) to notAfter has less than share of its
// lifetime left at now. An unknown issue time or an empty lifetime says nothing.
func CertExpiring(issued, notAfter, now time.Time, share float64) bool {
	life := notAfter.Sub(issued)
	return share > 0 && !issued.IsZero() && life > 0 && float64(notAfter.Sub(now)) < share*float64(life)
}
