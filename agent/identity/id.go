// Package identity holds the SPIFFE identities of the workloads on this node: their
// certificates, the mesh trust bundle, and the TLS configurations the tunnel uses to
// prove and check identities.
package identity

import (
	"crypto/x509"
	"errors"
	"fmt"
	"net/url"
	"strings"
)

// SPIFFEID is the SPIFFE ID of a Kubernetes service account:
// spiffe://<trustDomain>/ns/<namespace>/sa/<serviceAccount>.
func SPIFFEID(trustDomain, namespace, serviceAccount string) string {
	return "spiffe://" + trustDomain + "/ns/" + namespace + "/sa/" + serviceAccount
}

// Parse splits a workload SPIFFE ID into its namespace and service account.
func Parse(id string) (ns, sa string, err error) {
	_, ns, sa, err = ParseFull(id)
	return ns, sa, err
}

// ParseFull splits a workload SPIFFE ID into trust domain, namespace and service account.
func ParseFull(id string) (trustDomain, ns, sa string, err error) {
	rest, ok := strings.CutPrefix(id, "spiffe://")
	if !ok {
		return "", "", "", fmt.Errorf("spiffe id %q: must start with spiffe://", id)
	}
	td, path, ok := strings.Cut(rest, "/")
	if !ok || !validTrustDomain(td) {
		return "", "", "", fmt.Errorf("spiffe id %q: invalid trust domain %q", id, td)
	}
	parts := strings.Split(path, "/")
	if len(parts) != 4 || parts[0] != "ns" || parts[2] != "sa" {
		return "", "", "", fmt.Errorf("spiffe id %q: path must be /ns/<namespace>/sa/<serviceaccount>", id)
	}
	if !validName(parts[1]) || !validName(parts[3]) {
		return "", "", "", fmt.Errorf("spiffe id %q: invalid namespace or service account", id)
	}
	return td, parts[1], parts[3], nil
}

// FromCert returns the SPIFFE ID of a certificate: its single spiffe:// URI SAN. A
// certificate with no URI SAN or more than one is refused, so there is never a question
// of which identity a peer holds.
func FromCert(c *x509.Certificate) (string, error) {
	if c == nil {
		return "", errors.New("spiffe id from certificate: no certificate")
	}
	if len(c.URIs) != 1 {
		return "", fmt.Errorf("spiffe id from certificate: %d URI SANs, want exactly 1", len(c.URIs))
	}
	u := c.URIs[0]
	if u.Scheme != "spiffe" {
		return "", fmt.Errorf("spiffe id from certificate: URI SAN %q is not spiffe://", u.String())
	}
	id := uriString(u)
	if _, _, _, err := ParseFull(id); err != nil {
		return "", fmt.Errorf("spiffe id from certificate: %w", err)
	}
	return id, nil
}

func uriString(u *url.URL) string {
	if u.User != nil || u.RawQuery != "" || u.Fragment != "" || u.Opaque != "" {
		// Keep the full form so ParseFull rejects it rather than silently dropping parts.
		return u.String()
	}
	return "spiffe://" + u.Host + u.Path
}

func validTrustDomain(td string) bool {
	if td == "" || len(td) > 255 {
		return false
	}
	for i := 0; i < len(td); i++ {
		b := td[i]
		if !(b >= 'a' && b <= 'z' || b >= '0' && b <= '9' || b == '-' || b == '.' || b == '_') {
			return false
		}
	}
	return true
}

// validName accepts Kubernetes object names (DNS labels and subdomains).
func validName(s string) bool {
	if s == "" || len(s) > 253 || s == "." || s == ".." {
		return false
	}
	for i := 0; i < len(s); i++ {
		b := s[i]
		if !(b >= 'a' && b <= 'z' || b >= '0' && b <= '9' || b == '-' || b == '.') {
			return false
		}
	}
	return true
}
