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

// Peer IDs with tricks are refused, each with a reason naming what is wrong, whether
// read as text or from a certificate's URI SAN.
func TestIDTricksRefused(t *testing.T) {
	for _, tc := range []struct{ id, says string }{
		{"spiffe://cluster.local/ns/../sa/b", `invalid path segment ".."`},
		{"spiffe://cluster.local/ns/a/sa/..", `invalid path segment ".."`},
		{"spiffe://cluster.local/ns/a/../a/sa/b", "path must be"},
		{"spiffe://cluster.local/ns/./sa/b", `invalid path segment "."`},
		{"spiffe://cluster.local/ns/%61/sa/b", "percent-encoding is not allowed"},
		{"spiffe://cluster.local/ns/a/sa/b%2Fc", "percent-encoding is not allowed"},
		{"spiffe://cluster.local/ns/a%2Fsa/sa/b", "percent-encoding is not allowed"},
		{"spiffe://cluster.local/ns/Shop/sa/web", `invalid path segment "Shop"`},
		{"spiffe://cluster.local/ns/shop/sa/WEB", `invalid path segment "WEB"`},
		{"spiffe://Cluster.Local/ns/shop/sa/web", "only lower-case letters"},
		{"spiffe://cluster.local/NS/shop/sa/web", "path must be"},
		{"spiffe://cluster.local/ns/shop/sa/web/", "path must be"},
		{"spiffe://cluster.local//ns/shop/sa/web", "path must be"},
		{"spiffe://cluster.local/ns//sa/web", `invalid path segment ""`},
		{"spiffe://user@cluster.local/ns/shop/sa/web", "must not have user info"},
		{"spiffe://cluster.local/ns/shop/sa/web?x=1", "must not have user info"},
		{"spiffe://cluster.local/ns/shop/sa/web#frag", "must not have user info"},
	} {
		if _, _, _, err := Parse(tc.id); err == nil || !strings.Contains(err.Error(), tc.says) {
			t.Errorf("Parse(%q) = %v; want an error saying %q", tc.id, err, tc.says)
		}
		u, err := url.Parse(tc.id)
		if err != nil {
			continue // x509 would not have parsed the certificate either
		}
		if _, err := FromCert(&x509.Certificate{URIs: []*url.URL{u}}); err == nil || !strings.Contains(err.Error(), tc.says) {
			t.Errorf("FromCert(%q) = %v; want an error saying %q", tc.id, err, tc.says)
		}
	}
	// An upper-case scheme is refused as text; in a certificate Go's URL parser has
	// already lower-cased it, and it names the same identity.
	if _, _, _, err := Parse("SPIFFE://cluster.local/ns/shop/sa/web"); err == nil || !strings.Contains(err.Error(), "canonical form") {
		t.Errorf("upper-case scheme: %v", err)
	}
	// Two URI SANs are refused even when both are the same valid ID, and a valid ID
	// next to an invalid one does not make the certificate acceptable.
	good, _ := url.Parse(ID("cluster.local", "shop", "web"))
	other, _ := url.Parse(ID("evil.example", "shop", "web"))
	for _, uris := range [][]*url.URL{{good, good}, {good, other}, {other, good}} {
		if _, err := FromCert(&x509.Certificate{URIs: uris}); err == nil || !strings.Contains(err.Error(), "2 URI SANs, want exactly 1") {
			t.Errorf("FromCert(%v) = %v; want two URI SANs refused", uris, err)
		}
	}
	// Another trust domain is a well-formed ID: Parse returns its trust domain so
	// the caller (which knows its own) can refuse it.
	if td, _, _, err := Parse(other.String()); err != nil || td != "evil.example" {
		t.Errorf("Parse(%s) = %q, %v", other, td, err)
	}
}
