// Package spiffe is the form of a Ferry workload identity, shared by the operator
// that issues it and the agents that check it:
// spiffe://<trust-domain>/ns/<namespace>/sa/<service account>.
package spiffe

import (
	"crypto/x509"
	"errors"
	"fmt"
	"net/url"
	"strings"
)

// ID is the SPIFFE ID of a Kubernetes service account:
// spiffe://<trustDomain>/ns/<namespace>/sa/<serviceAccount>.
func ID(trustDomain, namespace, serviceAccount string) string {
	return "spiffe://" + trustDomain + "/ns/" + namespace + "/sa/" + serviceAccount
}

// Parse splits a workload SPIFFE ID into trust domain, namespace and service account,
// refusing anything that is not exactly of that form, with an error naming what is
// wrong.
func Parse(id string) (trustDomain, ns, sa string, err error) {
	fail := func(format string, args ...any) (string, string, string, error) {
		return "", "", "", fmt.Errorf("spiffe id %q: %s", id, fmt.Sprintf(format, args...))
	}
	u, err := url.Parse(id)
	if err != nil {
		return fail("%v", err)
	}
	if u.Scheme != "spiffe" {
		return fail("scheme must be spiffe")
	}
	if u.User != nil || u.Port() != "" || u.RawQuery != "" || u.ForceQuery || u.Fragment != "" || u.Opaque != "" {
		return fail("must not have user info, port, query or fragment")
	}
	if strings.Contains(id, "%") {
		// It would be decoded into a different name than the one written.
		return fail("percent-encoding is not allowed")
	}
	if err := ValidTrustDomain(u.Host); err != nil {
		return fail("%v", err)
	}
	parts := strings.Split(strings.TrimPrefix(u.Path, "/"), "/")
	if len(parts) != 4 || parts[0] != "ns" || parts[2] != "sa" {
		return fail("path must be /ns/<namespace>/sa/<serviceaccount>")
	}
	for _, p := range []string{parts[1], parts[3]} {
		if !validName(p) {
			return fail("invalid path segment %q", p)
		}
	}
	if id != ID(u.Host, parts[1], parts[3]) { // an upper-case scheme and the like
		return fail("not in canonical form")
	}
	return u.Host, parts[1], parts[3], nil
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
	// The SAN as written (escapes and all), not rebuilt from the decoded path: a
	// percent-encoded SAN must be refused, not read as the identity it decodes to.
	// Go has lower-cased the scheme already, which names the same identity.
	id := u.String()
	if _, _, _, err := Parse(id); err != nil {
		return "", fmt.Errorf("spiffe id from certificate: %w", err)
	}
	return id, nil
}

// ValidTrustDomain checks a trust domain: lower-case letters, digits, '-', '.', '_'.
func ValidTrustDomain(td string) error {
	if td == "" {
		return errors.New("trust domain is empty")
	}
	if len(td) > 255 {
		return fmt.Errorf("trust domain %q: too long", td)
	}
	for i := 0; i < len(td); i++ {
		b := td[i]
		if !(b >= 'a' && b <= 'z' || b >= '0' && b <= '9' || b == '-' || b == '.' || b == '_') {
			return fmt.Errorf("trust domain %q: only lower-case letters, digits, '-', '.' and '_' are allowed", td)
		}
	}
	return nil
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
