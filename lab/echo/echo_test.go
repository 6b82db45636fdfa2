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
