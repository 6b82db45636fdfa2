// Package ca is the mesh certificate authority: it holds a root key and issues the
// short-lived SPIFFE workload certificates that the agents present in the tunnel.
package ca

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"github.com/ferrymesh/ferry/api/spiffe"
	"math/big"
	"net/url"
	"time"
)

const (
	// RootTTL is how long a root created by New is valid.
	RootTTL = 10 * 365 * 24 * time.Hour
	// DefaultTTL is the default lifetime of a workload certificate.
	DefaultTTL = 24 * time.Hour
	// backdate absorbs clock skew between the operator and the nodes.
	backdate = 5 * time.Minute
)

// CA signs workload certificates for one trust domain.
type CA struct {
	trustDomain string
	cert        *x509.Certificate
	key         crypto.Signer
	rootPEM     []byte
}

// New creates a CA with a fresh self-signed ECDSA P-256 root valid for RootTTL.
func New(trustDomain string) (*CA, error) {
	if err := spiffe.ValidTrustDomain(trustDomain); err != nil {
		return nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate root key: %w", err)
	}
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	now := time.Now()
	td := &url.URL{Scheme: "spiffe", Host: trustDomain}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{"ferry"}, CommonName: "ferry root CA " + trustDomain},
		NotBefore:             now.Add(-backdate),
		NotAfter:              now.Add(RootTTL),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		URIs:                  []*url.URL{td},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("create root: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parse root: %w", err)
	}
	return &CA{
		trustDomain: trustDomain,
		cert:        cert,
		key:         key,
		rootPEM:     pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
	}, nil
}

// Load builds a CA from a user-supplied CA certificate and private key (PEM). The trust
// domain is taken from the certificate's spiffe:// URI SAN, or must be given with
// LoadWithTrustDomain when the certificate has none.
func Load(certPEM, keyPEM []byte) (*CA, error) {
	return LoadWithTrustDomain(certPEM, keyPEM, "")
}

// LoadWithTrustDomain is Load with an explicit trust domain; an empty trustDomain means
// "read it from the certificate".
func LoadWithTrustDomain(certPEM, keyPEM []byte, trustDomain string) (*CA, error) {
	block, _ := pem.Decode(certPEM)
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, errors.New("load ca: no CERTIFICATE block in certificate PEM")
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("load ca: parse certificate: %w", err)
	}
	if !cert.IsCA || !cert.BasicConstraintsValid {
		return nil, errors.New("load ca: certificate is not a CA (basic constraints)")
	}
	if cert.KeyUsage != 0 && cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, errors.New("load ca: certificate lacks the certSign key usage")
	}
	key, err := parsePrivateKey(keyPEM)
	if err != nil {
		return nil, fmt.Errorf("load ca: %w", err)
	}
	if !publicKeysEqual(key.Public(), cert.PublicKey) {
		return nil, errors.New("load ca: private key does not match certificate")
	}
	if trustDomain == "" {
		for _, u := range cert.URIs {
			if u.Scheme == "spiffe" {
				trustDomain = u.Host
				break
			}
		}
		if trustDomain == "" {
			return nil, errors.New("load ca: certificate has no spiffe:// URI SAN; give the trust domain explicitly")
		}
	}
	if err := spiffe.ValidTrustDomain(trustDomain); err != nil {
		return nil, fmt.Errorf("load ca: %w", err)
	}
	return &CA{
		trustDomain: trustDomain,
		cert:        cert,
		key:         key,
		rootPEM:     pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw}),
	}, nil
}

// TrustDomain is the trust domain this CA issues for.
func (c *CA) TrustDomain() string { return c.trustDomain }

// RootPEM is the CA certificate, the trust bundle agents verify peers against.
func (c *CA) RootPEM() []byte { return append([]byte(nil), c.rootPEM...) }

// Sign issues a leaf certificate for the SPIFFE ID id over pub, valid for ttl (DefaultTTL
// when ttl is zero). It returns the leaf followed by the CA certificate when the CA is not
// self-signed (an intermediate), so peers can build the chain to the bundle.
func (c *CA) Sign(id string, pub crypto.PublicKey, ttl time.Duration) ([]byte, error) {
	u, err := c.checkID(id)
	if err != nil {
		return nil, err
	}
	ek, ok := pub.(*ecdsa.PublicKey)
	if !ok || ek.Curve != elliptic.P256() {
		return nil, fmt.Errorf("sign %s: public key must be ECDSA P-256, got %T", id, pub)
	}
	if ttl == 0 {
		ttl = DefaultTTL
	}
	if ttl < 0 {
		return nil, fmt.Errorf("sign %s: negative ttl %s", id, ttl)
	}
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	now := time.Now()
	notAfter := now.Add(ttl)
	if notAfter.After(c.cert.NotAfter) {
		// A leaf outliving its issuer would fail verification anyway; cap it.
		notAfter = c.cert.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{"ferry"}},
		NotBefore:             now.Add(-backdate),
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		IsCA:                  false,
		URIs:                  []*url.URL{u},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.cert, ek, c.key)
	if err != nil {
		return nil, fmt.Errorf("sign %s: %w", id, err)
	}
	out := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	if !selfSigned(c.cert) {
		out = append(out, c.rootPEM...)
	}
	return out, nil
}

// Issue generates an ECDSA P-256 key and signs a certificate for id over it. The key is
// returned as PKCS#8 PEM.
func (c *CA) Issue(id string, ttl time.Duration) (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("issue %s: generate key: %w", id, err)
	}
	certPEM, err = c.Sign(id, &key.PublicKey, ttl)
	if err != nil {
		return nil, nil, err
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, fmt.Errorf("issue %s: marshal key: %w", id, err)
	}
	return certPEM, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// checkID validates a workload SPIFFE ID in this CA's trust domain.
func (c *CA) checkID(id string) (*url.URL, error) {
	td, _, _, err := spiffe.Parse(id)
	if err != nil {
		return nil, err
	}
	if td != c.trustDomain {
		return nil, fmt.Errorf("spiffe id %q: trust domain %q, want %q", id, td, c.trustDomain)
	}
	return url.Parse(id)
}

func newSerial() (*big.Int, error) {
	s, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, fmt.Errorf("serial number: %w", err)
	}
	return s, nil
}

func parsePrivateKey(keyPEM []byte) (crypto.Signer, error) {
	block, _ := pem.Decode(keyPEM)
	if block == nil {
		return nil, errors.New("no PEM block in key")
	}
	switch block.Type {
	case "PRIVATE KEY":
		k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("parse pkcs8 key: %w", err)
		}
		s, ok := k.(crypto.Signer)
		if !ok {
			return nil, fmt.Errorf("key type %T cannot sign", k)
		}
		return s, nil
	case "EC PRIVATE KEY":
		k, err := x509.ParseECPrivateKey(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("parse ec key: %w", err)
		}
		return k, nil
	case "RSA PRIVATE KEY":
		k, err := x509.ParsePKCS1PrivateKey(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("parse rsa key: %w", err)
		}
		return k, nil
	default:
		return nil, fmt.Errorf("unsupported key PEM type %q", block.Type)
	}
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	ka, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && ka.Equal(b)
}

func selfSigned(c *x509.Certificate) bool {
	return c.CheckSignatureFrom(c) == nil
}
