package echo

import (
	"bytes"
	"context"
	"errors"
	"regexp"
	"testing"
)

func TestParseSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int
	}{
		{"4096", 4096}, {"10MiB", 10 << 20}, {"1GB", 1e9}, {"2K", 2048}, {"3 KiB", 3 << 10}, {"7B", 7}, {"1024GiB", 1 << 40},
	} {
		got, err := ParseSize(tc.in)
		if err != nil || got != tc.want {
			t.Errorf("ParseSize(%q) = %d, %v, want %d", tc.in, got, err, tc.want)
		}
	}
	for _, in := range []string{"", "x", "-1", "1.5MiB", "1025GiB", "MiB"} {
		if _, err := ParseSize(in); !errors.Is(err, ErrSize) {
			t.Errorf("ParseSize(%q): %v, want ErrSize", in, err)
		}
	}
}

func TestRunVerifies(t *testing.T) {
	addr := start(t, Options{Banner: "hi"})
	var out bytes.Buffer
	if err := Run(context.Background(), &out, Load{To: addr, Bytes: 100 << 10, Conns: 3, Banner: "hi", Seed: 5}); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	want := regexp.MustCompile(`^to=\S+ conns=3 bytes=307200 \(each way\) duration=\S+ throughput=[0-9.]+ MiB/s verify=ok\n$`)
	if !want.MatchString(out.String()) {
		t.Errorf("output %q, want a line like %s", out.String(), want)
	}
}

func TestRunReportsFailures(t *testing.T) {
	addr := start(t, Options{Banner: "other"})
	var out bytes.Buffer
	err := Run(context.Background(), &out, Load{To: addr, Bytes: 10, Conns: 2, Banner: "hi"})
	if err == nil {
		t.Fatal("a wrong banner passed")
	}
	if !regexp.MustCompile(`(?m)^conn 0: .*\n(?s:.*)verify=FAILED on 2 of 2 connections\n$`).MatchString(out.String()) {
		t.Errorf("output %q does not name the failed connections", out.String())
	}
	if err := Run(context.Background(), &out, Load{To: addr}); err == nil {
		t.Error("a load with no connections passed")
	}
}

func TestMeasureRoundTrips(t *testing.T) {
	addr := start(t, Options{})
	var out bytes.Buffer
	if err := MeasureRoundTrips(context.Background(), &out, addr, 20, 64); err != nil {
		t.Fatal(err)
	}
	want := regexp.MustCompile(`^to=\S+ round_trips=20 bytes=64 connect\+first=\S+ p50=\S+ p90=\S+ p99=\S+ max=\S+\n$`)
	if !want.MatchString(out.String()) {
		t.Errorf("output %q, want a line like %s", out.String(), want)
	}
}
