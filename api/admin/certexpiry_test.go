package admin

import (
	"testing"
	"time"
)

func TestCertExpiring(t *testing.T) {
	issued := time.Date(2026, 12, 2, 16, 0, 0, 0, time.UTC)
	notAfter := issued.Add(40 * time.Second) // 20% is 8 s
	for _, tc := range []struct {
		name   string
		issued time.Time
		now    time.Time
		want   bool
	}{
		{"half left", issued, issued.Add(20 * time.Second), false},
		{"just over a fifth left", issued, notAfter.Add(-8*time.Second - time.Millisecond), false},
		{"under a fifth left", issued, notAfter.Add(-7 * time.Second), true},
		{"expired", issued, notAfter.Add(time.Second), true},
		{"issue time unknown", time.Time{}, notAfter.Add(-time.Second), false},
		{"issued after it expires", notAfter.Add(time.Second), notAfter, false},
	} {
		if got := CertExpiring(tc.issued, notAfter, tc.now, CertExpiringShare); got != tc.want {
			t.Errorf("%s: CertExpiring = %v, want %v", tc.name, got, tc.want)
		}
	}
}
