// Small request-response exchanges: a server that answers every 16-byte request
// with a 64-byte reply, and a client that keeps many connections each doing one
// exchange at a time (the next request only after the reply) as fast as it can.
// Both run inside lab pods as `ferry bench rr-server` and `ferry bench rr-client`.
// This is the per-message cost of a proxy with nothing to amortise it over: no
// HTTP parsing, no pipelining, tiny payloads.

package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"sync"
	"time"
)

// Sizes of one exchange: what the client sends and what the server answers.
const (
	RRRequestSize = 16
	RRReplySize   = 64
)

// RRResult is what rr-client prints, as JSON.
type RRResult struct {
	Exchanges int64   `json:"exchanges"`
	Seconds   float64 `json:"seconds"`
	// Latency percentiles of one exchange (request written to reply read), in ms.
	P50 float64 `json:"p50_ms"`
	P99 float64 `json:"p99_ms"`
}

// Rate is exchanges per second.
func (r RRResult) Rate() float64 {
	if r.Seconds <= 0 {
		return 0
	}
	return float64(r.Exchanges) / r.Seconds
}

// RRServe accepts connections on ln and answers each RRRequestSize-byte request
// with an RRReplySize-byte reply until ctx ends.
func RRServe(ctx context.Context, ln net.Listener) error {
	return serveConns(ctx, ln, "rr", func(c net.Conn) { _ = rrAnswer(c) })
}

// rrAnswer answers requests on c until the peer closes it.
func rrAnswer(c io.ReadWriter) error {
	req := make([]byte, RRRequestSize)
	reply := make([]byte, RRReplySize)
	for i := range reply {
		reply[i] = byte('a' + i%26)
	}
	for {
		if _, err := io.ReadFull(c, req); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		// The reply carries the request's first bytes so a client can tell an
		// answer from stale or misrouted data.
		copy(reply, req[:8])
		if _, err := c.Write(reply); err != nil {
			return err
		}
	}
}

// RRLoad opens conns connections to addr and, on each, does one exchange after
// another for d. An exchange that started before the deadline is waited for.
func RRLoad(ctx context.Context, addr string, conns int, d time.Duration) (RRResult, error) {
	if conns < 1 || d <= 0 {
		return RRResult{}, errors.New("rr load: need at least one connection and a positive duration")
	}
	lats := make([][]time.Duration, conns)
	errs := make([]error, conns)
	cs := make([]net.Conn, conns)
	// Connect first, so connection set-up is not in the figures.
	for i := range cs {
		c, err := dialSink(ctx, addr, nil)
		if err != nil {
			for _, c := range cs[:i] {
				c.Close()
			}
			return RRResult{}, fmt.Errorf("rr: %w", err)
		}
		cs[i] = c
	}
	var wg sync.WaitGroup
	start := time.Now()
	deadline := start.Add(d)
	for i, c := range cs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			lats[i], errs[i] = rrExchanges(ctx, c, i, deadline)
		}()
	}
	wg.Wait()
	res := RRResult{Seconds: time.Since(start).Seconds()}
	all := slices.Concat(lats...)
	res.Exchanges = int64(len(all))
	res.P50, res.P99 = percentileMs(all, 50), percentileMs(all, 99)
	return res, errors.Join(errs...)
}

// rrExchanges does exchanges on c until deadline and returns their latencies. Each
// request carries the connection number and a sequence number, and the reply must
// echo them.
func rrExchanges(ctx context.Context, c net.Conn, id int, deadline time.Time) ([]time.Duration, error) {
	req := make([]byte, RRRequestSize)
	reply := make([]byte, RRReplySize)
	lats := make([]time.Duration, 0, 4096)
	// A reply that never comes must not hang the run.
	c.SetDeadline(deadline.Add(5 * time.Second))
	for seq := uint32(0); ctx.Err() == nil; seq++ {
		t0 := time.Now()
		if !t0.Before(deadline) {
			return lats, nil
		}
		putRRHeader(req, uint32(id), seq)
		if _, err := c.Write(req); err != nil {
			return lats, fmt.Errorf("rr write: %w", err)
		}
		if _, err := io.ReadFull(c, reply); err != nil {
			return lats, fmt.Errorf("rr read: %w", err)
		}
		lats = append(lats, time.Since(t0))
		if string(reply[:8]) != string(req[:8]) {
			return lats, fmt.Errorf("rr reply %d on connection %d does not echo its request", seq, id)
		}
	}
	return lats, ctx.Err()
}

func putRRHeader(b []byte, id, seq uint32) {
	for i := range 4 {
		b[i] = byte(id >> (8 * i))
		b[4+i] = byte(seq >> (8 * i))
	}
}

// percentileMs is the p-th percentile (nearest rank) of ds in milliseconds; ds is
// sorted in place.
func percentileMs(ds []time.Duration, p float64) float64 {
	if len(ds) == 0 {
		return 0
	}
	slices.Sort(ds)
	k := int(float64(len(ds))*p/100+0.999999) - 1
	k = min(max(k, 0), len(ds)-1)
	return float64(ds[k]) / float64(time.Millisecond)
}

// WriteRRResult prints r as JSON.
func WriteRRResult(w io.Writer, r RRResult) error {
	return json.NewEncoder(w).Encode(r)
}
