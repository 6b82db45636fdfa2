package echo

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// Pattern is a deterministic byte stream: the byte at each offset depends on the
// offset and Seed and does not repeat with a short period, so a lost, duplicated or
// reordered chunk shows as a mismatch.
type Pattern struct {
	Seed uint64
}

// Fill writes the pattern's bytes for offsets off..off+len(b) into b.
func (p Pattern) Fill(b []byte, off int64) {
	var word [8]byte
	for i := 0; i < len(b); {
		pos := off + int64(i)
		binary.LittleEndian.PutUint64(word[:], splitmix(p.Seed^uint64(pos/8)))
		n := copy(b[i:], word[pos%8:])
		i += n
	}
}

// At returns the pattern's byte at off.
func (p Pattern) At(off int64) byte {
	var b [1]byte
	p.Fill(b[:], off)
	return b[0]
}

func splitmix(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9
	x = (x ^ (x >> 27)) * 0x94d049bb133111eb
	return x ^ (x >> 31)
}

// MismatchError reports the first byte that came back different from what was sent.
type MismatchError struct {
	Offset    int64
	Got, Want byte
}

func (e *MismatchError) Error() string {
	return fmt.Sprintf("echo differs at byte %d: got 0x%02x, want 0x%02x", e.Offset, e.Got, e.Want)
}

// SendAndVerify writes nbytes of pattern to conn while concurrently reading the echo
// and checking it byte for byte. When conn can half-close (TCP), it closes its write
// side after the last byte and then requires EOF after exactly nbytes: the server must
// echo everything and then close. It returns a *MismatchError (wrapped) for the first
// wrong byte. ctx ending aborts both directions.
func SendAndVerify(ctx context.Context, conn net.Conn, nbytes int, pattern Pattern) error {
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	var wg sync.WaitGroup
	var werr error
	wg.Add(1)
	go func() {
		defer wg.Done()
		buf := make([]byte, 32*1024)
		for off := 0; off < nbytes; {
			chunk := buf[:min(len(buf), nbytes-off)]
			pattern.Fill(chunk, int64(off))
			n, err := conn.Write(chunk)
			off += n
			if err != nil {
				werr = fmt.Errorf("write at byte %d: %w", off, err)
				return
			}
		}
		if cw, ok := conn.(interface{ CloseWrite() error }); ok {
			if err := cw.CloseWrite(); err != nil {
				werr = fmt.Errorf("close write: %w", err)
			}
		}
	}()
	rerr := verifyStream(conn, int64(nbytes), pattern)
	if rerr != nil {
		// Unblock the writer, which may wait on a peer that stopped reading.
		conn.SetDeadline(time.Unix(1, 0))
	}
	wg.Wait()
	_, halfClose := conn.(interface{ CloseWrite() error })
	if rerr == nil && werr == nil && halfClose {
		rerr = expectEOF(conn)
	}
	if err := ctx.Err(); err != nil && (rerr != nil || werr != nil) {
		return fmt.Errorf("send and verify: %w", err)
	}
	if rerr != nil {
		return rerr
	}
	return werr
}

// verifyStream reads n bytes and compares them with pattern.
func verifyStream(r io.Reader, n int64, pattern Pattern) error {
	buf := make([]byte, 32*1024)
	want := make([]byte, len(buf))
	for off := int64(0); off < n; {
		chunk := buf[:min(int64(len(buf)), n-off)]
		got, err := r.Read(chunk)
		if got > 0 {
			pattern.Fill(want[:got], off)
			for i := 0; i < got; i++ {
				if chunk[i] != want[i] {
					return fmt.Errorf("verify: %w", &MismatchError{Offset: off + int64(i), Got: chunk[i], Want: want[i]})
				}
			}
			off += int64(got)
		}
		if err != nil {
			if off >= n {
				return nil // every byte arrived with the final read
			}
			if errors.Is(err, io.EOF) {
				return fmt.Errorf("verify: stream ended after %d of %d bytes", off, n)
			}
			return fmt.Errorf("verify: read at byte %d of %d: %w", off, n, err)
		}
	}
	return nil
}

// expectEOF requires the peer to close after the expected bytes.
func expectEOF(conn net.Conn) error {
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	var b [512]byte
	n, err := conn.Read(b[:])
	if n > 0 {
		return fmt.Errorf("verify: %d unexpected bytes after the echo", n)
	}
	if errors.Is(err, io.EOF) {
		return nil
	}
	return fmt.Errorf("verify: no EOF after the echo (server did not close its side): %w", err)
}

// ByteWrites sends n bytes of the zero-seed pattern as n separate 1-byte writes while
// reading the echo, and checks that every byte comes back in order. It exercises
// paths that coalesce or split small segments.
func ByteWrites(conn net.Conn, n int) error {
	var p Pattern
	errc := make(chan error, 1)
	go func() {
		var b [1]byte
		for i := 0; i < n; i++ {
			b[0] = p.At(int64(i))
			if _, err := conn.Write(b[:]); err != nil {
				errc <- fmt.Errorf("write byte %d: %w", i, err)
				return
			}
		}
		errc <- nil
	}()
	conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	rerr := verifyStream(conn, int64(n), p)
	conn.SetReadDeadline(time.Time{})
	if rerr != nil {
		conn.SetWriteDeadline(time.Unix(1, 0))
	}
	werr := <-errc
	if rerr != nil {
		return rerr
	}
	return werr
}

// ReadBanner reads exactly len(banner) bytes and checks they are the banner, for
// servers that speak first.
func ReadBanner(conn net.Conn, banner string) error {
	got := make([]byte, len(banner))
	if _, err := io.ReadFull(conn, got); err != nil {
		return fmt.Errorf("read banner: %w", err)
	}
	if string(got) != banner {
		return fmt.Errorf("banner: got %q, want %q", got, banner)
	}
	return nil
}

// RoundTrips writes size bytes and reads the echo back, n times in turn on one
// connection, and returns how long each round trip took: request-response latency
// through whatever sits between the client and the echo server.
func RoundTrips(conn net.Conn, n, size int) ([]time.Duration, error) {
	buf := make([]byte, size)
	Pattern{}.Fill(buf, 0)
	got := make([]byte, size)
	out := make([]time.Duration, 0, n)
	for i := range n {
		start := time.Now()
		if _, err := conn.Write(buf); err != nil {
			return out, fmt.Errorf("round trip %d: write: %w", i, err)
		}
		if _, err := io.ReadFull(conn, got); err != nil {
			return out, fmt.Errorf("round trip %d: read: %w", i, err)
		}
		out = append(out, time.Since(start))
	}
	return out, nil
}
