package pipe

import (
	"bytes"
	"fmt"
	"io"
	"testing"

	"github.com/ferrymesh/ferry/internal/loopback"
)

// TestJoinHalfClose: a client that shuts its write side still reads the whole reply,
// with and without splice, and the byte counts are those that crossed.
func TestJoinHalfClose(t *testing.T) {
	for _, splice := range []bool{false, true} {
		t.Run(fmt.Sprintf("splice=%v", splice), func(t *testing.T) {
			client, proxyA := loopback.Pair(t)
			proxyB, server := loopback.Pair(t)
			type result struct {
				ab, ba int64
				err    error
			}
			done := make(chan result, 1)
			go func() {
				ab, ba, err := Join(proxyA, proxyB, splice)
				done <- result{ab, ba, err}
			}()
			go func() {
				n, _ := io.Copy(io.Discard, server)
				fmt.Fprintf(server, "got %d", n)
				server.CloseWrite()
			}()
			req := bytes.Repeat([]byte("x"), 300000)
			if _, err := client.Write(req); err != nil {
				t.Fatal(err)
			}
			client.CloseWrite()
			reply, err := io.ReadAll(client)
			if err != nil || string(reply) != "got 300000" {
				t.Fatalf("reply %q, %v", reply, err)
			}
			r := <-done
			if r.err != nil || r.ab != int64(len(req)) || r.ba != int64(len(reply)) {
				t.Fatalf("Join: %d→, %d←, %v", r.ab, r.ba, r.err)
			}
		})
	}
}

// TestCopyFlushesEachWrite: flush runs after every write, and a write error ends the
// copy with the bytes written so far.
func TestCopyFlushesEachWrite(t *testing.T) {
	var dst bytes.Buffer
	flushes := 0
	n, err := Copy(&dst, io.MultiReader(bytes.NewReader([]byte("ab")), bytes.NewReader([]byte("cd"))), func() error {
		flushes++
		return nil
	})
	if err != nil || n != 4 || dst.String() != "abcd" || flushes != 2 {
		t.Fatalf("Copy: %d %q %d flushes, %v", n, dst.String(), flushes, err)
	}
	boom := fmt.Errorf("boom")
	if _, err := Copy(&dst, bytes.NewReader([]byte("x")), func() error { return boom }); err != boom {
		t.Fatalf("flush error: %v", err)
	}
}
