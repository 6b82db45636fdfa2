package bench

import (
	"net/netip"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/api/admin"
)

// h2loadOut is the summary h2load 1.52 prints (-c 4 -m 100 -D 1s, trimmed).
const h2loadOut = `starting benchmark...
spawning thread #0: 4 total client(s). Timing-based test with 0s of warm-up time and 1s of main duration for measurements.
Application protocol: h2c

finished in 1.00s, 15181.00 req/s, 15.14MB/s
requests: 15181 total, 15185 started, 15181 done, 15170 succeeded, 11 failed, 11 errored, 0 timeout
status codes: 15163 2xx, 0 3xx, 4 4xx, 3 5xx
traffic: 15.14MB (15878716) total, 151.36KB (154988) headers (space savings 95.87%), 37.63MB (39459840) data
                     min         max         mean         sd        +/- sd
time for request:       43us    173.45ms     26.35ms     28.81ms    89.34%
`

func TestParseH2load(t *testing.T) {
	s, err := parseH2load([]byte(h2loadOut))
	if err != nil {
		t.Fatal(err)
	}
	if s.QPS != 15181 || s.Requests != 15181 || s.Errors != 11+4+3 {
		t.Errorf("got %+v, want 15181 req/s, 15181 requests, 18 errors", s)
	}
	if _, err := parseH2load([]byte("connect to 10.96.104.1 port 80 failed\n")); err == nil {
		t.Error("no error for output without a summary")
	}
}

func TestH2loadLatencies(t *testing.T) {
	log := "1796168094373821\t200\t8857\n1796168094373834\t-1\t99999\n1796168094373835\t0\t99999\n1796168094373848\t200\t1000\n1796168094373849\t503\t3000\n"
	lat, err := h2loadLatencies([]byte(log))
	if err != nil {
		t.Fatal(err)
	}
	// The failed stream (-1) and the one begun in the warm-up (0) are left out; the
	// others, sorted, in ms.
	if want := []float64{1, 3, 8.857}; len(lat) != 3 || lat[0] != want[0] || lat[1] != want[1] || lat[2] != want[2] {
		t.Errorf("got %v, want %v", lat, want)
	}
	if p := percentile(lat, 50); p != 3 {
		t.Errorf("p50 %v, want 3", p)
	}
	if p := percentile(lat, 99.9); p != 8.857 {
		t.Errorf("p99.9 %v, want 8.857", p)
	}
	if p := percentile(nil, 50); p != 0 {
		t.Errorf("p50 of nothing %v, want 0", p)
	}
}

func TestCarriedBy(t *testing.T) {
	svc := netip.MustParseAddrPort("10.96.104.1:80")
	other := netip.MustParseAddrPort("10.96.104.2:50051")
	start := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	before, after := start.Add(-time.Second), start.Add(time.Second)
	for _, tc := range []struct {
		name  string
		conns []admin.Conn
		want  string
	}{
		{"no record", nil, ""},
		{"byte stream", []admin.Conn{{Service: svc, Start: after, Protocol: admin.TCP}}, "L4"},
		{"before the run", []admin.Conn{{Service: svc, Start: before, Protocol: admin.HTTP2}}, ""},
		{"another Service", []admin.Conn{{Service: other, Start: after, Protocol: admin.GRPC}}, ""},
		{"requests", []admin.Conn{{Service: svc, Start: after}, {Service: svc, Start: after, Protocol: admin.HTTP2, HTTP: &admin.HTTP{Method: "GET"}}}, "L7 http2"},
		{"grpc", []admin.Conn{{Service: svc, Start: after, Protocol: admin.GRPC}}, "L7 grpc"},
	} {
		if got := carriedBy(tc.conns, svc, start); got != tc.want {
			t.Errorf("%s: got %q, want %q", tc.name, got, tc.want)
		}
	}
}
