package echo

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/listener"
)

// start serves opts on a loopback listener (MPTCP off, as in Ferry) until the test ends.
func start(t *testing.T, opts Options) string {
	t.Helper()
	ln, err := listener.TCP(context.Background(), "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, ln, opts) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("serve: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Error("serve did not return after cancel")
		}
	})
	return ln.Addr().String()
}

func dial(t *testing.T, addr string) *net.TCPConn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

func TestEchoSendAndVerify(t *testing.T) {
	addr := start(t, Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for _, n := range []int{0, 1, 100_000, 10 << 20} {
		if err := SendAndVerify(ctx, dial(t, addr), n, Pattern{Seed: uint64(n)}); err != nil {
			t.Errorf("%d bytes: %v", n, err)
		}
	}
}

func TestEchoBannerAndByteWrites(t *testing.T) {
	addr := start(t, Options{Banner: "hello from c\n"})
	c := dial(t, addr)
	// The server speaks first: the banner arrives before the client writes anything.
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if err := ReadBanner(c, "hello from c\n"); err != nil {
		t.Fatal(err)
	}
	if err := ByteWrites(c, 2000); err != nil {
		t.Fatal(err)
	}
	// Half-close: after CloseWrite the server finishes and closes its side.
	c.CloseWrite()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if rest, err := io.ReadAll(c); err != nil || len(rest) != 0 {
		t.Errorf("after half-close: %q, %v", rest, err)
	}
}

// corrupter echoes but flips one byte at offset at.
func corrupter(t *testing.T, at int) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		buf := make([]byte, 4096)
		off := 0
		for {
			n, err := c.Read(buf)
			for i := 0; i < n; i++ {
				if off+i == at {
					buf[i] ^= 0xff
				}
			}
			off += n
			if _, werr := c.Write(buf[:n]); werr != nil || err != nil {
				c.(*net.TCPConn).CloseWrite()
				return
			}
		}
	}()
	return ln.Addr().String()
}

func TestSendAndVerifyReportsMismatch(t *testing.T) {
	addr := corrupter(t, 12345)
	err := SendAndVerify(context.Background(), dial(t, addr), 100_000, Pattern{})
	var m *MismatchError
	if !errors.As(err, &m) || m.Offset != 12345 {
		t.Fatalf("got %v, want a mismatch at byte 12345", err)
	}
	if !strings.Contains(err.Error(), "byte 12345") {
		t.Errorf("error does not name the offset: %v", err)
	}
}

func TestSendAndVerifyShortEcho(t *testing.T) {
	// A server that reads a little and closes: the client reports how far it got.
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
		buf := make([]byte, 10)
		n, _ := io.ReadFull(c, buf)
		c.Write(buf[:n])
		c.Close()
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err = SendAndVerify(ctx, dial(t, ln.Addr().String()), 1<<20, Pattern{})
	if err == nil || !strings.Contains(err.Error(), "10 of 1048576") {
		t.Fatalf("got %v, want a short stream error", err)
	}
}

func TestHTTPMode(t *testing.T) {
	addr := start(t, Options{Mode: ModeHTTP, Pod: "c"})
	resp, err := http.Get("http://" + addr + "/")
	if err != nil {
		t.Fatal(err)
	}
	var who map[string]string
	json.NewDecoder(resp.Body).Decode(&who)
	resp.Body.Close()
	if who["pod"] != "c" || !strings.HasPrefix(who["remote_addr"], "127.0.0.1:") {
		t.Errorf("/: %v", who)
	}

	resp, err = http.Post("http://"+addr+"/echo", "text/plain", strings.NewReader("ping pong"))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "ping pong" {
		t.Errorf("/echo: %q", body)
	}

	resp, err = http.Get("http://" + addr + "/bytes?n=100000")
	if err != nil {
		t.Fatal(err)
	}
	if err := verifyStream(resp.Body, 100000, Pattern{}); err != nil {
		t.Errorf("/bytes: %v", err)
	}
	if extra, _ := io.ReadAll(resp.Body); len(extra) != 0 {
		t.Errorf("/bytes: %d extra bytes", len(extra))
	}
	resp.Body.Close()

	resp, err = http.Get("http://" + addr + "/bytes?n=-1")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Errorf("/bytes?n=-1: %s", resp.Status)
	}
}

func TestPatternIsPositional(t *testing.T) {
	var p Pattern
	whole := make([]byte, 1000)
	p.Fill(whole, 0)
	part := make([]byte, 13)
	p.Fill(part, 501)
	if string(part) != string(whole[501:514]) || p.At(777) != whole[777] {
		t.Fatal("Fill at an offset differs from the whole stream")
	}
	if q := (Pattern{Seed: 1}); q.At(0) == p.At(0) && q.At(1) == p.At(1) {
		t.Error("seed does not change the pattern")
	}
}

// A gRPC client of the health service gets SERVING, and GRPCCalls says which pod
// answered each call.
func TestGRPCMode(t *testing.T) {
	addr := start(t, Options{Mode: ModeGRPC, Pod: "c"})
	var out strings.Builder
	if err := GRPCCalls(context.Background(), &out, addr, 3); err != nil {
		t.Fatal(err)
	}
	if want := "3 gRPC calls over one channel to " + addr + ", answered by: c 3\n"; out.String() != want {
		t.Errorf("got %q, want %q", out.String(), want)
	}
}

func getStats(t *testing.T, addr string) Stats {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/stats")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var st Stats
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		t.Fatal(err)
	}
	return st
}

func status(t *testing.T, url string) (int, http.Header) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode, resp.Header
}

// /fail fails exactly its share, spread so that no two failures are adjacent; every
// answer names the pod; /stats counts requests by tag and not itself.
func TestHTTPFailShare(t *testing.T) {
	addr := start(t, Options{Mode: ModeHTTP, Pod: "c"})
	failed, prev := 0, false
	for i := range 100 {
		code, h := status(t, "http://"+addr+"/fail?percent=30&code=503&tag=x")
		if h.Get(PodHTTPHeader) != "c" {
			t.Fatalf("request %d: %s header %q", i, PodHTTPHeader, h.Get(PodHTTPHeader))
		}
		if code == 503 {
			failed++
			if prev {
				t.Errorf("requests %d and %d both failed", i-1, i)
			}
		} else if code != 200 {
			t.Fatalf("request %d: %d", i, code)
		}
		prev = code == 503
	}
	if failed != 30 {
		t.Errorf("%d of 100 failed, want 30", failed)
	}
	// Another query counts on its own: all of its requests fail.
	if code, _ := status(t, "http://"+addr+"/fail?percent=100&code=500&tag=y"); code != 500 {
		t.Errorf("percent=100: %d", code)
	}
	if code, _ := status(t, "http://"+addr+"/fail?percent=101&code=500"); code != 400 {
		t.Errorf("percent=101: %d, want 400", code)
	}
	st := getStats(t, addr)
	if st.Pod != "c" || st.Requests["x"] != 100 || st.Requests["y"] != 1 || st.Requests[""] != 1 || len(st.Canceled) != 0 {
		t.Errorf("stats %+v", st)
	}
}

// A client that gives up on /delay is counted as canceled, and one that waits gets
// its answer after the delay.
func TestHTTPDelayCanceled(t *testing.T) {
	addr := start(t, Options{Mode: ModeHTTP, Pod: "c"})
	client := &http.Client{Timeout: 100 * time.Millisecond}
	if _, err := client.Get("http://" + addr + "/delay/2s?tag=t"); err == nil {
		t.Fatal("a 2 s answer came within 100 ms")
	}
	start := time.Now()
	if code, _ := status(t, "http://"+addr+"/delay/50ms?tag=u"); code != 200 || time.Since(start) < 50*time.Millisecond {
		t.Errorf("/delay/50ms: %d after %v", code, time.Since(start))
	}
	deadline := time.Now().Add(5 * time.Second)
	for getStats(t, addr).Canceled["t"] != 1 {
		if time.Now().After(deadline) {
			t.Fatalf("the canceled request is not counted: %+v", getStats(t, addr))
		}
		time.Sleep(10 * time.Millisecond)
	}
	if st := getStats(t, addr); st.Requests["t"] != 1 || st.Requests["u"] != 1 || st.Canceled["u"] != 0 {
		t.Errorf("stats %+v", st)
	}
}

// /request/ shows the request as the app got it; FailStatus and Delay apply to
// every path but /stats.
func TestHTTPRequestAndServerKnobs(t *testing.T) {
	addr := start(t, Options{Mode: ModeHTTP, Pod: "c"})
	req, _ := http.NewRequest("GET", "http://"+addr+"/request/a/b?x=1", nil)
	req.Host = "web.example"
	req.Header.Set("X-Marked", "yes")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var got Request
	json.NewDecoder(resp.Body).Decode(&got)
	resp.Body.Close()
	if got.Pod != "c" || got.Host != "web.example" || got.Path != "/request/a/b" || got.Query != "x=1" || got.Headers.Get("X-Marked") != "yes" {
		t.Errorf("/request/: %+v", got)
	}

	failing := start(t, Options{Mode: ModeHTTP, Pod: "e", FailStatus: 500})
	if code, _ := status(t, "http://"+failing+"/"); code != 500 {
		t.Errorf("FailStatus 500: / answered %d", code)
	}
	if st := getStats(t, failing); st.Requests[""] != 1 {
		t.Errorf("FailStatus: stats %+v", st)
	}
	slow := start(t, Options{Mode: ModeHTTP, Pod: "f", Delay: 50 * time.Millisecond})
	begin := time.Now()
	if code, _ := status(t, "http://"+slow+"/"); code != 200 || time.Since(begin) < 50*time.Millisecond {
		t.Errorf("Delay 50ms: %d after %v", code, time.Since(begin))
	}
}
