package bench

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// TestRRLoadAgainstServer runs the client against the server over loopback TCP:
// every exchange is counted, and the reported figures are consistent.
func TestRRLoadAgainstServer(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- RRServe(ctx, ln) }()
	res, err := RRLoad(context.Background(), ln.Addr().String(), 8, 300*time.Millisecond)
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("server: %v", err)
	}
	t.Logf("loopback, 8 conns: %.0f exchanges/s, p50 %.3f ms, p99 %.3f ms", res.Rate(), res.P50, res.P99)
	if res.Exchanges < 8 {
		t.Errorf("%d exchanges over 8 connections in 300 ms", res.Exchanges)
	}
	if res.Seconds < 0.3 {
		t.Errorf("ran %.3f s, want at least the 300 ms asked for", res.Seconds)
	}
	if res.P50 <= 0 || res.P99 < res.P50 {
		t.Errorf("p50 %.4f, p99 %.4f: want 0 < p50 ≤ p99", res.P50, res.P99)
	}
	var b strings.Builder
	if err := WriteRRResult(&b, res); err != nil {
		t.Fatal(err)
	}
	var back RRResult
	if err := json.Unmarshal([]byte(b.String()), &back); err != nil || back != res {
		t.Errorf("JSON round trip: %v, %+v != %+v", err, back, res)
	}
}

// TestRRServerSizes checks the wire format: 16 bytes in, exactly 64 out, the
// first 8 echoed, and nothing sent before a whole request has arrived.
func TestRRServerSizes(t *testing.T) {
	cli, srv := net.Pipe()
	defer cli.Close()
	go func() { rrAnswer(srv); srv.Close() }()
	req := make([]byte, RRRequestSize)
	putRRHeader(req, 7, 42)
	// Half a request first: the server must wait for the rest.
	if _, err := cli.Write(req[:5]); err != nil {
		t.Fatal(err)
	}
	cli.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if n, err := cli.Read(make([]byte, 1)); err == nil {
		t.Fatalf("server answered (%d bytes) before the whole request arrived", n)
	}
	cli.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := cli.Write(req[5:]); err != nil {
		t.Fatal(err)
	}
	reply := make([]byte, RRReplySize)
	if _, err := io.ReadFull(cli, reply); err != nil {
		t.Fatal(err)
	}
	if string(reply[:8]) != string(req[:8]) {
		t.Errorf("reply starts %x, want the request's %x", reply[:8], req[:8])
	}
	// One request, one reply: nothing more arrives.
	cli.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if n, err := cli.Read(make([]byte, 1)); err == nil {
		t.Errorf("%d extra bytes after the reply", n)
	}
}

// TestRRLoadRejectsWrongReply: a server that does not echo the request is an error,
// not a figure.
func TestRRLoadRejectsWrongReply(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		req := make([]byte, RRRequestSize)
		for {
			if _, err := io.ReadFull(c, req); err != nil {
				return
			}
			if _, err := c.Write(make([]byte, RRReplySize)); err != nil {
				return
			}
		}
	}()
	_, err = RRLoad(context.Background(), ln.Addr().String(), 1, 200*time.Millisecond)
	if err == nil || !strings.Contains(err.Error(), "does not echo") {
		t.Errorf("err = %v, want a reply that does not echo its request", err)
	}
}

func TestPercentileMs(t *testing.T) {
	var ds []time.Duration
	for i := 1; i <= 100; i++ {
		ds = append(ds, time.Duration(101-i)*time.Millisecond)
	}
	if got := percentileMs(ds, 50); got != 50 {
		t.Errorf("p50 = %v, want 50", got)
	}
	if got := percentileMs(ds, 99); got != 99 {
		t.Errorf("p99 = %v, want 99", got)
	}
	if got := percentileMs(nil, 99); got != 0 {
		t.Errorf("p99 of nothing = %v, want 0", got)
	}
}
