package e2e

// Client scenarios run as real processes inside a lab pod: the test binary re-executes
// itself with FERRY_E2E_SCENARIO set, through the lab, so the process sits in the
// pod's network namespace and its node's cgroup exactly as an app would, and Ferry's
// capture applies to it. Each scenario prints one JSON result line and exits non-zero
// with the reason on failure.

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"sync"
	"syscall"
	"time"
)

const scenarioEnv = "FERRY_E2E_SCENARIO"

// Marker fills every payload the scenarios send, so a capture can look for it.
const Marker = "ferry-e2e-plaintext-marker:"

// scenarioResult is what a scenario prints.
type scenarioResult struct {
	Bytes    int64   `json:"bytes"`
	Seconds  float64 `json:"seconds"`
	Local    string  `json:"local,omitempty"`
	Err      string  `json:"error,omitempty"`
	Duration float64 `json:"duration_ms,omitempty"`
	// Latency: isolation_test.go's latency and flood scenarios.
	Latency *latencyResult `json:"latency,omitempty"`
	// Counts are a scenario's own tallies (churn: connections ok and failed).
	Counts map[string]int64 `json:"counts,omitempty"`
}

// runScenario is called from TestMain in the re-executed child: args are
// scenario name, target address, and an optional number.
func runScenario(args []string) int {
	res, err := scenario(args)
	if err != nil {
		res.Err = err.Error()
	}
	json.NewEncoder(os.Stdout).Encode(res)
	if err != nil {
		return 1
	}
	return 0
}

func scenario(args []string) (scenarioResult, error) {
	if len(args) < 2 {
		return scenarioResult{}, fmt.Errorf("usage: scenario NAME ADDR [N]")
	}
	name, addr := args[0], args[1]
	n := 0
	if len(args) > 2 {
		n, _ = strconv.Atoi(args[2])
	}
	start := time.Now()
	switch name {
	case "many": // n connections held at once (load_test.go)
		return manyScenario(addr, n)
	case "echo": // n bytes echoed intact
		conn, err := dial(addr)
		if err != nil {
			return scenarioResult{}, err
		}
		defer conn.Close()
		err = echo(conn, n)
		return scenarioResult{Bytes: int64(n), Seconds: time.Since(start).Seconds(), Local: conn.LocalAddr().String()}, err
	case "concurrent": // n connections at once, each 64 KiB echoed
		var wg sync.WaitGroup
		errs := make([]error, n)
		for i := range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				conn, err := dial(addr)
				if err != nil {
					errs[i] = err
					return
				}
				defer conn.Close()
				errs[i] = echo(conn, 64<<10)
			}()
		}
		wg.Wait()
		return scenarioResult{Bytes: int64(n) * 64 << 10, Seconds: time.Since(start).Seconds()}, errors.Join(errs...)
	case "banner": // the server speaks first: read its banner before writing a byte
		conn, err := dial(addr)
		if err != nil {
			return scenarioResult{}, err
		}
		defer conn.Close()
		conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		buf := make([]byte, 64)
		k, err := conn.Read(buf)
		if err != nil {
			return scenarioResult{}, fmt.Errorf("read banner: %w", err)
		}
		return scenarioResult{Bytes: int64(k)}, checkBanner(string(buf[:k]))
	case "halfclose": // write, shut the write side, and still read the whole reply
		conn, err := dial(addr)
		if err != nil {
			return scenarioResult{}, err
		}
		defer conn.Close()
		want := payload(n)
		if _, err := conn.Write(want); err != nil {
			return scenarioResult{}, fmt.Errorf("write: %w", err)
		}
		if err := conn.CloseWrite(); err != nil {
			return scenarioResult{}, fmt.Errorf("close write: %w", err)
		}
		conn.SetReadDeadline(time.Now().Add(30 * time.Second))
		got, err := io.ReadAll(conn)
		if err != nil {
			return scenarioResult{}, fmt.Errorf("read after half-close: %w (got %d of %d bytes)", err, len(got), n)
		}
		return scenarioResult{Bytes: int64(len(got))}, compare(got, want)
	case "idle": // echo, sit idle n seconds, echo again on the same connection
		conn, err := dial(addr)
		if err != nil {
			return scenarioResult{}, err
		}
		defer conn.Close()
		if err := echo(conn, 1024); err != nil {
			return scenarioResult{}, fmt.Errorf("before idle: %w", err)
		}
		time.Sleep(time.Duration(n) * time.Second)
		if err := echo(conn, 1024); err != nil {
			return scenarioResult{}, fmt.Errorf("after %ds idle: %w", n, err)
		}
		return scenarioResult{Bytes: 2048, Seconds: time.Since(start).Seconds()}, nil
	case "hold": // echo, hold the connection until stdin ends, echo again
		conn, err := dial(addr)
		if err != nil {
			return scenarioResult{}, err
		}
		defer conn.Close()
		if err := echo(conn, 1024); err != nil {
			return scenarioResult{}, fmt.Errorf("before holding: %w", err)
		}
		io.Copy(io.Discard, os.Stdin)
		if err := echo(conn, 1024); err != nil {
			return scenarioResult{}, fmt.Errorf("after holding %v: %w", time.Since(start).Round(time.Millisecond), err)
		}
		return scenarioResult{Bytes: 2048, Seconds: time.Since(start).Seconds()}, nil
	case "bytewise": // n writes of one byte each arrive in order
		conn, err := dial(addr)
		if err != nil {
			return scenarioResult{}, err
		}
		defer conn.Close()
		conn.SetNoDelay(true)
		want := payload(n)
		errc := make(chan error, 1)
		go func() {
			got := make([]byte, n)
			conn.SetReadDeadline(time.Now().Add(60 * time.Second))
			_, err := io.ReadFull(conn, got)
			if err == nil {
				err = compare(got, want)
			}
			errc <- err
		}()
		for i := range want {
			if _, err := conn.Write(want[i : i+1]); err != nil {
				return scenarioResult{}, fmt.Errorf("write byte %d: %w", i, err)
			}
		}
		return scenarioResult{Bytes: int64(n)}, <-errc
	case "probe": // a new connection echoing 64 bytes every 50 ms, for n seconds
		deadline := time.Now().Add(time.Duration(n) * time.Second)
		var sent int64
		for time.Now().Before(deadline) {
			if conn, err := dial(addr); err == nil {
				if echo(conn, 64) == nil {
					sent += 64
				}
				conn.Close()
			}
			time.Sleep(50 * time.Millisecond)
		}
		return scenarioResult{Bytes: sent}, nil
	case "refused": // the destination refuses: the client sees refused or reset, never a hang
		conn, err := dial(addr)
		if err != nil {
			// On loopback the agent's reset can beat connect() back to the app.
			if errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET) {
				return scenarioResult{Duration: float64(time.Since(start).Milliseconds())}, nil
			}
			return scenarioResult{}, fmt.Errorf("dial: %w", err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		// A reset is reported once, to the first call that meets it: a write after
		// the reset arrived takes it, and the read then sees EOF.
		if _, err = conn.Write([]byte("hello?")); err == nil {
			_, err = conn.Read(make([]byte, 16))
		}
		var ne net.Error
		switch {
		case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.ECONNREFUSED), errors.Is(err, syscall.EPIPE):
			return scenarioResult{Duration: float64(time.Since(start).Milliseconds())}, nil
		case errors.As(err, &ne) && ne.Timeout():
			return scenarioResult{}, fmt.Errorf("hung for 10 s instead of a reset")
		default:
			return scenarioResult{}, fmt.Errorf("want refused or reset, got %v", err)
		}
	}
	if res, ok, err := churnScenario(name, addr, args[2:]); ok {
		return res, err
	}
	if res, ok, err := l7Scenario(name, addr, args[2:]); ok {
		return res, err
	}
	if res, ok, err := tunnelScenario(name, addr, n); ok {
		return res, err
	}
	if res, ok, err := isolationScenario(name, addr, n); ok {
		return res, err
	}
	return scenarioResult{}, fmt.Errorf("unknown scenario %q", name)
}

func dial(addr string) (*net.TCPConn, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", addr, err)
	}
	return c.(*net.TCPConn), nil
}

// echo writes n marker bytes while reading them back, and checks them.
func echo(conn *net.TCPConn, n int) error {
	want := payload(n)
	errc := make(chan error, 1)
	go func() {
		_, err := conn.Write(want)
		errc <- err
	}()
	got := make([]byte, n)
	conn.SetReadDeadline(time.Now().Add(60 * time.Second))
	if _, err := io.ReadFull(conn, got); err != nil {
		return fmt.Errorf("read echo: %w", err)
	}
	conn.SetReadDeadline(time.Time{})
	if err := <-errc; err != nil {
		return fmt.Errorf("write: %w", err)
	}
	return compare(got, want)
}

func payload(n int) []byte {
	var b bytes.Buffer
	for i := 0; b.Len() < n; i++ {
		fmt.Fprintf(&b, "%s%09d\n", Marker, i)
	}
	return b.Bytes()[:n]
}

func compare(got, want []byte) error {
	if len(got) != len(want) {
		return fmt.Errorf("got %d bytes, want %d", len(got), len(want))
	}
	for i := range got {
		if got[i] != want[i] {
			return fmt.Errorf("first difference at byte %d", i)
		}
	}
	return nil
}

// banner is what the speak-first echo server sends on accept.
const banner = "220 ferry-e2e speaks first\r\n"

func checkBanner(got string) error {
	if got != banner {
		return fmt.Errorf("banner %q, want %q", got, banner)
	}
	return nil
}
