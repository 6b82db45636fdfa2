package echo

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Load is what Run sends: Conns parallel connections to To, Bytes of pattern each.
type Load struct {
	// To is the echo server, IP:PORT.
	To    string
	Bytes int
	Conns int
	// Banner, when set, is what the server sends first; it is checked before sending.
	Banner string
	// Seed is the pattern seed of connection 0; connection i uses Seed+i.
	Seed uint64
}

// Run sends l, verifies every byte that comes back, and prints one line to out with
// the bytes, duration, throughput and result (and a line per failed connection). It
// fails when any connection did.
func Run(ctx context.Context, out io.Writer, l Load) error {
	if l.Conns < 1 {
		return errors.New("echo load: no connections")
	}
	start := time.Now()
	errs := make([]error, l.Conns)
	var wg sync.WaitGroup
	for i := range l.Conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = echoOnce(ctx, l.To, l.Banner, l.Bytes, Pattern{Seed: l.Seed + uint64(i)})
		}()
	}
	wg.Wait()
	d := time.Since(start)
	failed := 0
	for i, err := range errs {
		if err != nil {
			failed++
			fmt.Fprintf(out, "conn %d: %v\n", i, err)
		}
	}
	// Only verified connections count towards bytes and throughput.
	total := int64(l.Bytes) * int64(l.Conns-failed)
	result := "ok"
	if failed > 0 {
		result = fmt.Sprintf("FAILED on %d of %d connections", failed, l.Conns)
	}
	fmt.Fprintf(out, "to=%s conns=%d bytes=%d (each way) duration=%s throughput=%.1f MiB/s verify=%s\n",
		l.To, l.Conns, total, d.Round(time.Millisecond), float64(total)/d.Seconds()/(1<<20), result)
	if failed > 0 {
		return fmt.Errorf("echo verification failed on %d of %d connections", failed, l.Conns)
	}
	return nil
}

func echoOnce(ctx context.Context, to, banner string, n int, p Pattern) error {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", to)
	if err != nil {
		return err
	}
	defer c.Close()
	if banner != "" {
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if err := ReadBanner(c, banner); err != nil {
			return err
		}
		c.SetReadDeadline(time.Time{})
	}
	return SendAndVerify(ctx, c, n, p)
}

// MeasureRoundTrips measures the connect time and n round trips of size bytes to
// addr on one connection, and prints them to out with the percentiles.
func MeasureRoundTrips(ctx context.Context, out io.Writer, addr string, n, size int) error {
	start := time.Now()
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	if _, err := RoundTrips(conn, 1, size); err != nil { // the first byte also waits for the far side's set-up
		return err
	}
	setup := time.Since(start)
	rtts, err := RoundTrips(conn, n, size)
	if err != nil {
		return err
	}
	slices.Sort(rtts)
	pct := func(p float64) time.Duration { return rtts[int(p*float64(len(rtts)-1))] }
	fmt.Fprintf(out, "to=%s round_trips=%d bytes=%d connect+first=%s p50=%s p90=%s p99=%s max=%s\n",
		addr, n, size, setup.Round(time.Microsecond), pct(0.5).Round(time.Microsecond), pct(0.9).Round(time.Microsecond),
		pct(0.99).Round(time.Microsecond), rtts[len(rtts)-1].Round(time.Microsecond))
	return nil
}

// ErrSize is ParseSize's complaint.
var ErrSize = errors.New("want a size such as 4096, 10MiB or 1GB (at most 1TiB)")

// ParseSize reads sizes such as 10MiB, 1GB or 4096, at most 1TiB.
func ParseSize(s string) (int, error) {
	units := []struct {
		suffix string
		mult   int64
	}{
		{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30},
		{"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9},
		{"K", 1 << 10}, {"M", 1 << 20}, {"G", 1 << 30}, {"B", 1},
	}
	num, mult := strings.TrimSpace(s), int64(1)
	for _, u := range units {
		if rest, ok := strings.CutSuffix(num, u.suffix); ok {
			num, mult = strings.TrimSpace(rest), u.mult
			break
		}
	}
	v, err := strconv.ParseInt(num, 10, 64)
	if err != nil || v < 0 || v*mult > 1<<40 {
		return 0, ErrSize
	}
	return int(v * mult), nil
}
