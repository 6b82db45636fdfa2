package main

import (
	"context"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The operator in local mode on the sample manifests answers /readyz and stops
// cleanly when its context ends.
func TestLocalModeRuns(t *testing.T) {
	dir := t.TempDir()
	health := filepath.Join(dir, "health.sock")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"--local", "../../deploy/examples/local", "--state-dir", dir,
			"--grpc-addr", "unix://" + filepath.Join(dir, "grpc.sock"), "--health-addr", "unix://" + health, "--metrics-addr", ""})
	}()
	client := &http.Client{Timeout: time.Second, Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", health)
	}}}
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := client.Get("http://operator/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		select {
		case err := <-done:
			t.Fatalf("operator exited: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("operator never ready")
		}
		time.Sleep(20 * time.Millisecond)
	}
	client.CloseIdleConnections()
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestFlagErrors(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--local", dir, "--state-dir", dir, "--leader-elect"}, "leader election needs a cluster"},
		{[]string{"--local", filepath.Join(dir, "missing"), "--state-dir", dir}, "manifests folder"},
		{[]string{"--local", dir, "--state-dir", dir, "--cert-ttl", "-1h"}, "negative certificate ttl"},
	} {
		err := run(context.Background(), tc.args)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ferry-operator %s: %v, want an error about %q", strings.Join(tc.args, " "), err, tc.want)
		}
	}
}
