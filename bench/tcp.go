// Bulk TCP throughput: a sink that reads and discards, and a sender that writes as
// fast as it can for a while. Both run inside lab pods as `ferry bench tcp-sink` and
// `ferry bench tcp-send`.

package bench

import (
	"context"
	"crypto/tls"
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
	return serveConns(ctx, ln, "sink", func(c net.Conn) {
		buf := make([]byte, 256<<10)
		_, _ = io.CopyBuffer(io.Discard, struct{ io.Reader }{c}, buf)
	})
}

// serveConns accepts connections on ln until ctx ends and runs handle on each in
// its own goroutine, closing the connection after; it returns when all are done.
func serveConns(ctx context.Context, ln net.Listener, what string, handle func(net.Conn)) error {
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
			return fmt.Errorf("%s accept: %w", what, err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			handle(c)
		}()
	}
}

// Send writes to addr over conns connections for d and reports the bytes the
// sink took (written before the deadline) and the time it took. With tlsCfg it
// speaks TLS (the handshake is done before the clock starts).
func Send(ctx context.Context, addr string, conns int, d time.Duration, tlsCfg *tls.Config) (SendResult, error) {
	var total atomic.Int64
	errs := make([]error, conns)
	cs := make([]net.Conn, conns)
	for i := range cs {
		c, err := dialSink(ctx, addr, tlsCfg)
		if err != nil {
			for _, c := range cs[:i] {
				c.Close()
			}
			return SendResult{}, err
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

func dialSink(ctx context.Context, addr string, tlsCfg *tls.Config) (net.Conn, error) {
	var dl net.Dialer
	dl.SetMultipathTCP(false)
	c, err := dl.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("dial sink: %w", err)
	}
	if tlsCfg == nil {
		return c, nil
	}
	tc := tls.Client(c, tlsCfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		c.Close()
		return nil, fmt.Errorf("sink tls handshake: %w", err)
	}
	return tc, nil
}

// WriteSendResult prints r as JSON.
func WriteSendResult(w io.Writer, r SendResult) error {
	return json.NewEncoder(w).Encode(r)
}
