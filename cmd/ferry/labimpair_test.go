package main

import "testing"

func TestParsePercent(t *testing.T) {
	for in, want := range map[string]float64{"5%": 0.05, "0.05": 0.05, "50%": 0.5} {
		if got, err := parsePercent(in); err != nil || got != want {
			t.Errorf("parsePercent(%q) = %v, %v, want %v", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "0%", "100%", "1.5", "-1%", "five"} {
		if _, err := parsePercent(bad); err == nil {
			t.Errorf("parsePercent(%q) accepted", bad)
		}
	}
}
