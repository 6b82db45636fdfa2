// Bulk TCP throughput: a sink that reads and discards, and a sender that writes as
// fast as it can for a while. Both run inside lab pods as `ferry bench tcp-sink` and
// `ferry bench tcp-send`.

package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// SendResult is what tcp-send prints, as JSON.
type SendResult struct {
	Bytes   int64   `json:"bytes"`
	Seconds float64 `json:"seconds"`
}

// Sink accepts connections on ln and discards what they send until ctx ends.
func Sink(ctx context.Context, ln net.Listener) error {
	go func() {
		<-ctx.Done()
		ln.Close()
	}()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("sink accept: %w", err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			buf := make([]byte, 256<<10)
			_, _ = io.CopyBuffer(io.Discard, struct{ io.Reader }{c}, buf)
		}()
	}
}

// Send writes to addr over conns connections for d and reports the bytes the
// sink took (written before the deadline) and the time it took.
func Send(ctx context.Context, addr string, conns int, d time.Duration) (SendResult, error) {
	var total atomic.Int64
	errs := make([]error, conns)
	var wg sync.WaitGroup
	start := time.Now()
	deadline := start.Add(d)
	for i := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var dl net.Dialer
			dl.SetMultipathTCP(false)
			c, err := dl.DialContext(ctx, "tcp", addr)
			if err != nil {
				errs[i] = err
				return
			}
			defer c.Close()
			buf := make([]byte, 256<<10)
			c.SetWriteDeadline(deadline)
			for ctx.Err() == nil {
				n, err := c.Write(buf)
				total.Add(int64(n))
				if err != nil {
					if !errors.Is(err, os.ErrDeadlineExceeded) {
						errs[i] = err
					}
					return
				}
			}
		}()
	}
	wg.Wait()
	res := SendResult{Bytes: total.Load(), Seconds: time.Since(start).Seconds()}
	return res, errors.Join(errs...)
}

// WriteSendResult prints r as JSON.
func WriteSendResult(w io.Writer, r SendResult) error {
	return json.NewEncoder(w).Encode(r)
}
