package ca

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"strings"
	"testing"
	"time"
)

const td = "cluster.local"

func parseCert(t *testing.T, p []byte) *x509.Certificate {
	t.Helper()
	b, _ := pem.Decode(p)
	if b == nil {
		t.Fatal("no PEM block")
	}
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestNewRoot(t *testing.T) {
	c, err := New(td)
	if err != nil {
		t.Fatal(err)
	}
	root := parseCert(t, c.RootPEM())
	if !root.IsCA {
		t.Error("root is not a CA")
	}
	if _, ok := root.PublicKey.(*ecdsa.PublicKey); !ok {
		t.Errorf("root key %T, want ECDSA", root.PublicKey)
	}
	if d := time.Until(root.NotAfter); d < RootTTL-time.Hour {
		t.Errorf("root valid for %s, want about %s", d, RootTTL)
	}
	if c.TrustDomain() != td {
		t.Errorf("trust domain %q", c.TrustDomain())
	}
}

func TestIssue(t *testing.T) {
	c, err := New(td)
	if err != nil {
		t.Fatal(err)
	}
	id := "spiffe://cluster.local/ns/default/sa/web"
	certPEM, keyPEM, err := c.Issue(id, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	leaf := parseCert(t, certPEM)
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != id {
		t.Fatalf("URIs %v, want exactly [%s]", leaf.URIs, id)
	}
	if len(leaf.DNSNames) != 0 || len(leaf.IPAddresses) != 0 || len(leaf.EmailAddresses) != 0 {
		t.Error("leaf has SANs other than the URI")
	}
	pub, ok := leaf.PublicKey.(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P256() {
		t.Fatalf("leaf key %T, want ECDSA P-256", leaf.PublicKey)
	}
	if leaf.KeyUsage != x509.KeyUsageDigitalSignature {
		t.Errorf("key usage %v", leaf.KeyUsage)
	}
	if len(leaf.ExtKeyUsage) != 2 {
		t.Errorf("ext key usage %v", leaf.ExtKeyUsage)
	}
	if leaf.IsCA {
		t.Error("leaf is a CA")
	}
	if !leaf.NotBefore.Before(time.Now().Add(-time.Minute)) {
		t.Errorf("NotBefore %s not backdated", leaf.NotBefore)
	}
	if d := time.Until(leaf.NotAfter); d > time.Hour || d < 59*time.Minute {
		t.Errorf("leaf valid for %s, want 1h", d)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(c.RootPEM())
	for _, eku := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{eku}}); err != nil {
			t.Errorf("verify for %v: %v", eku, err)
		}
	}
	kb, _ := pem.Decode(keyPEM)
	if kb == nil || kb.Type != "PRIVATE KEY" {
		t.Fatal("key is not PKCS#8 PEM")
	}
	k, err := x509.ParsePKCS8PrivateKey(kb.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if !k.(*ecdsa.PrivateKey).PublicKey.Equal(leaf.PublicKey) {
		t.Error("key does not match certificate")
	}
}

func TestSignRejects(t *testing.T) {
	c, err := New(td)
	if err != nil {
		t.Fatal(err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	for _, tc := range []struct{ id, want string }{
		{"spiffe://other.local/ns/a/sa/b", `trust domain "other.local", want "cluster.local"`},
		{"https://cluster.local/ns/a/sa/b", "scheme must be spiffe"},
		{"spiffe://cluster.local/ns/a", "path must be /ns/<namespace>/sa/<serviceaccount>"},
		{"spiffe://cluster.local/ns/a/sa/b/c", "path must be"},
		{"spiffe://cluster.local/ns/a/xx/b", "path must be"},
		{"spiffe://cluster.local/ns//sa/b", "invalid path segment"},
		{"spiffe://cluster.local/ns/A/sa/b", "invalid path segment"},
		{"spiffe://cluster.local:8443/ns/a/sa/b", "port"},
		{"spiffe://cluster.local/ns/a/sa/b?x=1", "query"},
	} {
		_, err := c.Sign(tc.id, &key.PublicKey, time.Hour)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Sign(%q) error %v, want it to mention %q", tc.id, err, tc.want)
		}
	}
	rk, _ := rsa.GenerateKey(rand.Reader, 2048)
	if _, err := c.Sign("spiffe://cluster.local/ns/a/sa/b", &rk.PublicKey, time.Hour); err == nil || !strings.Contains(err.Error(), "ECDSA P-256") {
		t.Errorf("RSA key accepted: %v", err)
	}
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if _, err := c.Sign("spiffe://cluster.local/ns/a/sa/b", &p384.PublicKey, time.Hour); err == nil {
		t.Error("P-384 key accepted")
	}
}

func TestNewRejectsTrustDomain(t *testing.T) {
	for _, bad := range []string{"", "Cluster.Local", "a/b", "a:1"} {
		if _, err := New(bad); err == nil {
			t.Errorf("New(%q) accepted", bad)
		}
	}
}

func TestLoad(t *testing.T) {
	orig, err := New(td)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(orig.key)
	if err != nil {
		t.Fatal(err)
	}
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
	loaded, err := Load(orig.RootPEM(), keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	if loaded.TrustDomain() != td {
		t.Errorf("trust domain %q", loaded.TrustDomain())
	}
	certPEM, _, err := loaded.Issue("spiffe://cluster.local/ns/a/sa/b", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(orig.RootPEM())
	if _, err := parseCert(t, certPEM).Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("leaf from loaded CA does not verify against original root: %v", err)
	}

	other, _ := New(td)
	otherDER, _ := x509.MarshalPKCS8PrivateKey(other.key)
	if _, err := Load(orig.RootPEM(), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: otherDER})); err == nil || !strings.Contains(err.Error(), "does not match") {
		t.Errorf("mismatched key: %v", err)
	}
	if _, err := Load([]byte("junk"), keyPEM); err == nil {
		t.Error("junk certificate accepted")
	}
	leafPEM, leafKey, _ := orig.Issue("spiffe://cluster.local/ns/a/sa/b", time.Hour)
	if _, err := Load(leafPEM, leafKey); err == nil || !strings.Contains(err.Error(), "not a CA") {
		t.Errorf("leaf accepted as CA: %v", err)
	}
}
