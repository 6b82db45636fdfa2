package spiffe

import (
	"crypto/x509"
	"net/url"
	"strings"
	"testing"
)

// FuzzParse checks that Parse accepts only the canonical form: an accepted ID is
// exactly what ID builds from its parts, and those parts are valid on their own.
func FuzzParse(f *testing.F) {
	for _, s := range []string{
		"spiffe://cluster.local/ns/shop/sa/web",
		"spiffe://cluster.local/ns/../sa/b",
		"spiffe://cluster.local/ns/%61/sa/b",
		"SPIFFE://cluster.local/ns/a/sa/b",
		"spiffe://cluster.local/ns/a/sa/b/",
		"spiffe://cluster.local:8080/ns/a/sa/b",
		"spiffe://u@cluster.local/ns/a/sa/b?q#f",
		"spiffe:opaque",
		"spiffe://[::1]/ns/a/sa/b",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, id string) {
		td, ns, sa, err := Parse(id)
		if err != nil {
			if td != "" || ns != "" || sa != "" {
				t.Fatalf("Parse(%q) failed but returned parts %q %q %q", id, td, ns, sa)
			}
			return
		}
		if got := ID(td, ns, sa); got != id {
			t.Fatalf("Parse(%q) accepted a non-canonical ID (canonical %q)", id, got)
		}
		if err := ValidTrustDomain(td); err != nil {
			t.Fatalf("Parse(%q) accepted trust domain: %v", id, err)
		}
		for _, p := range []string{ns, sa} {
			if !validName(p) || strings.ContainsAny(p, "/%") {
				t.Fatalf("Parse(%q) accepted segment %q", id, p)
			}
		}
		td2, ns2, sa2, err := Parse(ID(td, ns, sa))
		if err != nil || td2 != td || ns2 != ns || sa2 != sa {
			t.Fatalf("round trip of %q: %q %q %q %v", id, td2, ns2, sa2, err)
		}
	})
}

// FuzzFromCert checks a certificate's URI SANs as x509 hands them over: the ID it
// returns is one Parse accepts, is the single SAN as written, and a certificate
// with two SANs is never accepted.
func FuzzFromCert(f *testing.F) {
	f.Add("spiffe://cluster.local/ns/shop/sa/web", "")
	f.Add("spiffe://cluster.local/ns/%61/sa/b", "")
	f.Add("spiffe://cluster.local/ns/shop/sa/web", "spiffe://cluster.local/ns/shop/sa/web")
	f.Add("spiffe://cluster.local/ns/shop/sa/web", "spiffe://evil.example/ns/shop/sa/web")
	f.Add("SPIFFE://cluster.local/ns/a/sa/b", "")
	f.Add("https://cluster.local/ns/a/sa/b", "")
	f.Fuzz(func(t *testing.T, first, second string) {
		var uris []*url.URL
		for _, s := range []string{first, second} {
			if s == "" {
				continue
			}
			u, err := url.Parse(s)
			if err != nil {
				return // x509 refuses a certificate whose URI SAN does not parse
			}
			uris = append(uris, u)
		}
		id, err := FromCert(&x509.Certificate{URIs: uris})
		if err != nil {
			return
		}
		if len(uris) != 1 {
			t.Fatalf("accepted %d URI SANs as %q", len(uris), id)
		}
		if _, _, _, err := Parse(id); err != nil {
			t.Fatalf("FromCert returned %q, which Parse refuses: %v", id, err)
		}
		if id != uris[0].String() {
			t.Fatalf("FromCert returned %q for the SAN %q", id, uris[0].String())
		}
	})
}
