package tunnel

import (
	"io"
	"net"
	"testing"

	"github.com/ferrymesh/ferry/internal/loopback"
)

// BenchmarkStreamThroughput echoes 32 KiB chunks through one stream: client write →
// server → app → server → client read, the reader running beside the writer.
func BenchmarkStreamThroughput(b *testing.B) {
	e := newEnv(b, envOpt{})
	s := e.connect(b, loopback.Serve(b, loopback.Echo))
	defer s.Close()
	chunk := make([]byte, 32<<10)
	b.SetBytes(int64(len(chunk)))
	b.ReportAllocs()
	read := make(chan int64)
	go func() {
		// Read in 32 KiB like the proxy does (io.Discard alone would read 8 KiB at a
		// time and inflate the count of WINDOW_UPDATE frames).
		n, _ := io.CopyBuffer(struct{ io.Writer }{io.Discard}, struct{ io.Reader }{s}, make([]byte, 32<<10))
		read <- n
	}()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := s.Write(chunk); err != nil {
			b.Fatal(err)
		}
	}
	s.CloseWrite()
	if n := <-read; n != int64(b.N)*int64(len(chunk)) {
		b.Fatalf("read %d bytes, want %d", n, int64(b.N)*int64(len(chunk)))
	}
}

// BenchmarkConnect opens a stream on a pooled connection, sends one byte, reads the
// echo, and closes: the per-connection cost of the tunnel once the session exists.
func BenchmarkConnect(b *testing.B) {
	e := newEnv(b, envOpt{})
	target := loopback.Serve(b, func(c *net.TCPConn) { loopback.Echo(c) })
	s := e.connect(b, target) // warm the pooled connection
	s.Close()
	one := []byte{1}
	buf := make([]byte, 1)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		s := e.connect(b, target)
		if _, err := s.Write(one); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(s, buf); err != nil {
			b.Fatal(err)
		}
		s.Close()
	}
}
