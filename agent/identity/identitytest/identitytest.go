// Package identitytest issues throwaway SPIFFE certificates for tests of the agent's
// identity and tunnel packages. The real CA lives in the operator, which the agent does
// not import, so this is a minimal stand-in.
package identitytest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net/url"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/agent/identity"
)

// CA is a test certificate authority.
type CA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	// RootPEM is the trust bundle.
	RootPEM []byte
}

// NewCA creates a self-signed P-256 CA.
func NewCA(tb testing.TB) *CA {
	tb.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "test root"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		tb.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &CA{cert: cert, key: key, RootPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

// Issue issues a leaf for id valid from notBefore to notAfter with server and client auth.
func (c *CA) Issue(tb testing.TB, id string, notBefore, notAfter time.Time) identity.CertPEM {
	tb.Helper()
	return c.IssueUsage(tb, id, notBefore, notAfter, x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth)
}

// IssueUsage is Issue with explicit extended key usages.
func (c *CA) IssueUsage(tb testing.TB, id string, notBefore, notAfter time.Time, usage ...x509.ExtKeyUsage) identity.CertPEM {
	tb.Helper()
	return c.issue(tb, []string{id}, notBefore, notAfter, usage)
}

// IssueURIs issues a leaf valid for the next day whose URI SANs are uris, as
// written (none, several, or ones no Ferry CA would sign), with server and client
// auth: a peer trying to pass an odd identity.
func (c *CA) IssueURIs(tb testing.TB, uris ...string) identity.CertPEM {
	tb.Helper()
	return c.issue(tb, uris, time.Now().Add(-time.Minute), time.Now().Add(24*time.Hour), []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth})
}

func (c *CA) issue(tb testing.TB, ids []string, notBefore, notAfter time.Time, usage []x509.ExtKeyUsage) identity.CertPEM {
	tb.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	var uris []*url.URL
	for _, id := range ids {
		u, err := url.Parse(id)
		if err != nil {
			tb.Fatal(err)
		}
		uris = append(uris, u)
	}
	serial, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 64))
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		NotBefore:    notBefore,
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  usage,
		URIs:         uris,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.cert, &key.PublicKey, c.key)
	if err != nil {
		tb.Fatal(err)
	}
	kd, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		tb.Fatal(err)
	}
	return identity.CertPEM{
		Chain: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		Key:   pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kd}),
	}
}

// Valid issues a leaf for id valid for the next day.
func (c *CA) Valid(tb testing.TB, id string) identity.CertPEM {
	tb.Helper()
	return c.Issue(tb, id, time.Now().Add(-time.Minute), time.Now().Add(24*time.Hour))
}
