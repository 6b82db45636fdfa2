package spiffe

import (
	"crypto/x509"
	"net/url"
	"strings"
	"testing"
)

func TestIDParse(t *testing.T) {
	id := ID("cluster.local", "shop", "web")
	if id != "spiffe://cluster.local/ns/shop/sa/web" {
		t.Fatalf("ID = %s", id)
	}
	td, ns, sa, err := Parse(id)
	if err != nil || td != "cluster.local" || ns != "shop" || sa != "web" {
		t.Fatalf("Parse = %q %q %q %v", td, ns, sa, err)
	}
	for _, bad := range []string{
		"", "https://cluster.local/ns/a/sa/b", "spiffe://cluster.local/ns/a",
		"spiffe:///ns/a/sa/b", "spiffe://cluster.local/ns/a/sa/b/c", "spiffe://cluster.local/sa/b/ns/a",
		"spiffe://cluster.local/ns/A/sa/b", "spiffe://cluster.local:80/ns/a/sa/b", "spiffe://Cluster/ns/a/sa/b",
	} {
		if _, _, _, err := Parse(bad); err == nil {
			t.Errorf("Parse(%q) accepted", bad)
		}
	}
}

func TestFromCert(t *testing.T) {
	u, _ := url.Parse("spiffe://cluster.local/ns/default/sa/server")
	c := &x509.Certificate{URIs: []*url.URL{u}}
	if id, err := FromCert(c); err != nil || id != u.String() {
		t.Fatalf("FromCert = %q, %v", id, err)
	}
	two := &x509.Certificate{URIs: []*url.URL{u, u}}
	if _, err := FromCert(two); err == nil || !strings.Contains(err.Error(), "2 URI SANs") {
		t.Errorf("two URI SANs: %v", err)
	}
	if _, err := FromCert(&x509.Certificate{}); err == nil {
		t.Error("no URI SAN accepted")
	}
	other, _ := url.Parse("https://cluster.local/ns/default/sa/server")
	if _, err := FromCert(&x509.Certificate{URIs: []*url.URL{other}}); err == nil {
		t.Error("https URI accepted")
	}
}
