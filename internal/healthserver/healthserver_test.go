package healthserver

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
)

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, strings.TrimSpace(string(b))
}

func TestHealthAndMetrics(t *testing.T) {
	var ready atomic.Bool
	s := New("127.0.0.1:0", Routes{
		Ready: func() error {
			if !ready.Load() {
				return errors.New("no state applied yet")
			}
			return nil
		},
		Metrics: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "up 1\n") }),
	}, slog.New(slog.DiscardHandler))
	if err := s.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	base := "http://" + s.Addr().String()
	for _, tc := range []struct {
		path   string
		ready  bool
		status int
		body   string
	}{
		{"/healthz", false, 200, "ok"},
		{"/readyz", false, 503, "no state applied yet"},
		{"/readyz", true, 200, "ok"},
		{"/metrics", true, 200, "up 1"},
		{"/other", true, 404, "404 page not found"},
	} {
		ready.Store(tc.ready)
		status, body := get(t, base+tc.path)
		if status != tc.status || body != tc.body {
			t.Errorf("GET %s (ready %t): %d %q, want %d %q", tc.path, tc.ready, status, body, tc.status, tc.body)
		}
	}
	if err := s.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := s.Stop(context.Background()); err != nil {
		t.Fatalf("second stop: %v", err)
	}
	if _, err := http.Get(base + "/healthz"); err == nil {
		t.Error("server answers after Stop")
	}
}

// A server with only Metrics does not answer probes, and the reverse.
func TestRoutesApart(t *testing.T) {
	s := New("127.0.0.1:0", Routes{Metrics: http.NotFoundHandler()}, slog.New(slog.DiscardHandler))
	if err := s.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer s.Stop(context.Background())
	if status, _ := get(t, "http://"+s.Addr().String()+"/healthz"); status != http.StatusNotFound {
		t.Errorf("metrics-only server answers /healthz with %d", status)
	}
}

func TestStartBadAddress(t *testing.T) {
	s := New("256.0.0.1:1", Routes{}, slog.New(slog.DiscardHandler))
	if err := s.Start(context.Background()); err == nil {
		s.Stop(context.Background())
		t.Fatal("start on a bad address succeeded")
	}
	if err := s.Stop(context.Background()); err != nil {
		t.Fatalf("stop of a server that never started: %v", err)
	}
}
