package metrics

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/promcheck"
)

// Each held certificate's NotAfter is a gauge by identity, read at scrape time:
// a renewed certificate shows its new expiry on the next scrape.
func TestCertificateExpiry(t *testing.T) {
	notAfter := time.Unix(1_900_000_000, 0)
	held := map[string]time.Time{
		"spiffe://cluster.local/ns/shop/sa/web": notAfter,
		"spiffe://cluster.local/ns/shop/sa/api": notAfter.Add(time.Hour),
	}
	m := New("node1", Sources{Certificates: func() map[string]time.Time { return held }})
	text := scrape(t, m)
	for id, na := range held {
		want := fmt.Sprintf(`ferry_certificate_expiry_timestamp_seconds{identity=%q} %s`, id, fmt.Sprintf("%g", float64(na.Unix())))
		if !strings.Contains(text, want) {
			t.Errorf("scrape lacks %s:\n%s", want, text)
		}
	}
	promcheck.Check(t, text)

	held = map[string]time.Time{"spiffe://cluster.local/ns/shop/sa/web": notAfter.Add(24 * time.Hour)}
	text = scrape(t, m)
	if strings.Contains(text, "sa/api") {
		t.Errorf("a certificate no longer held is still exported:\n%s", text)
	}
	if !strings.Contains(text, fmt.Sprintf("%g", float64(notAfter.Add(24*time.Hour).Unix()))) {
		t.Errorf("the renewed certificate's expiry is not exported:\n%s", text)
	}
}
