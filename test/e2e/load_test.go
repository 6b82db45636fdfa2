package e2e

// Load held through one agent: 10,000 concurrent long-lived connections from a
// (node1) to c (node2), each echoing before and after the hold, with the agents'
// memory per connection measured and their resources back to the baseline after.

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// loadConns is how many connections TestLoadConcurrentConnections holds at once.
const loadConns = 10000

// heldMarker is what the "many" scenario writes on stderr once every connection is
// open and has echoed.
const heldMarker = "held: all connections open"

// manyScenario opens n connections to addr (64 at a time), echoes 64 bytes on each,
// says so on stderr, holds them until stdin ends, echoes 64 bytes on each again and
// closes them all.
func manyScenario(addr string, n int) (scenarioResult, error) {
	start := time.Now()
	conns := make([]*net.TCPConn, n)
	defer func() {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
	}()
	each := func(fn func(i int) error) error {
		var wg sync.WaitGroup
		var mu sync.Mutex
		var first error
		next := make(chan int)
		for range 64 {
			wg.Go(func() {
				for i := range next {
					if err := fn(i); err != nil {
						mu.Lock()
						if first == nil {
							first = fmt.Errorf("connection %d: %w", i, err)
						}
						mu.Unlock()
					}
				}
			})
		}
		for i := range n {
			next <- i
		}
		close(next)
		wg.Wait()
		return first
	}
	err := each(func(i int) error {
		c, err := dial(addr)
		if err != nil {
			return err
		}
		conns[i] = c
		return echo(c, 64)
	})
	if err != nil {
		return scenarioResult{}, fmt.Errorf("opening: %w", err)
	}
	fmt.Fprintf(os.Stderr, "%s (%d in %s)\n", heldMarker, n, time.Since(start).Round(time.Millisecond))
	io.Copy(io.Discard, os.Stdin)
	if err := each(func(i int) error { return echo(conns[i], 64) }); err != nil {
		return scenarioResult{}, fmt.Errorf("after holding: %w", err)
	}
	return scenarioResult{Bytes: int64(n) * 128, Seconds: time.Since(start).Seconds()}, nil
}

// ouWarm returns the outage lab with its pods enrolled and the tunnel a→c pooled
// (so a baseline read next has it), and c's echo address.
func ouWarm(t *testing.T) (*env, string) {
	t.Helper()
	e := ouSetup(t)
	e.waitEnrolled(t, "node1", "ops/a", "ops/b")
	e.waitEnrolled(t, "node2", "ops/c")
	addr := e.addr("c", echoPort)
	if err := e.echoClient(t.Context(), "a", addr, "64KiB", 30*time.Second); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	return e, addr
}

// rssKiB is the resident memory of pid, from /proc.
func rssKiB(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			n, err := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
			if err != nil {
				t.Fatalf("VmRSS %q: %v", v, err)
			}
			return n
		}
	}
	t.Fatalf("no VmRSS for pid %d", pid)
	return 0
}

// 10,000 connections a→c held at once through node1's agent (and node2's on the
// other side of the tunnels): every one echoes before and after the hold; the
// agents' memory per connection is measured; once they close both agents are back
// to their baseline of goroutines, fds and map entries.
func TestLoadConcurrentConnections(t *testing.T) {
	e, addr := ouWarm(t)
	nodes := []string{"node1", "node2"}
	base, rss := map[string]agentResources{}, map[string]int{}
	for _, n := range nodes {
		base[n], rss[n] = e.resources(t, n), rssKiB(t, e.lab.AgentPID(n))
		t.Logf("%s before: %s, RSS %d KiB; %s", n, base[n], rss[n], openFilesLimit(t, e.lab.AgentPID(n)))
	}

	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	cmd := e.scenarioCommand(ctx, "a", "many", addr, strconv.Itoa(loadConns))
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stdout bytes.Buffer
	cmd.Stdout = &stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	held := make(chan string, 1)
	var rest strings.Builder
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			if strings.HasPrefix(sc.Text(), heldMarker) {
				held <- sc.Text()
			} else {
				rest.WriteString(sc.Text() + "\n")
			}
		}
		close(held)
	}()
	select {
	case line, ok := <-held:
		if !ok {
			stdin.Close()
			werr := cmd.Wait()
			_, err := scenarioOutcome("a", []string{"many"}, stdout.Bytes(), rest.String(), werr)
			t.Fatalf("the client did not hold its connections: %v", err)
		}
		t.Log(line)
	case <-ctx.Done():
		t.Fatal("the client did not open its connections in time")
	}
	for _, n := range nodes {
		r, now := e.resources(t, n), rssKiB(t, e.lab.AgentPID(n))
		t.Logf("%s holding %d connections: %s, RSS %d KiB: %.1f KiB per connection", n, loadConns, r, now, float64(now-rss[n])/loadConns)
		if r.FDs < base[n].FDs+loadConns/2 && n == "node1" {
			t.Errorf("node1's agent holds %d fds with %d connections open through it: they are not carried by it", r.FDs, loadConns)
		}
	}
	stdin.Close()
	werr := cmd.Wait()
	if _, err := scenarioOutcome("a", []string{"many"}, stdout.Bytes(), rest.String(), werr); err != nil {
		t.Fatalf("after the hold: %v", err)
	}
	for _, n := range nodes {
		r := e.backToBaseline(t, n, base[n])
		t.Logf("%s after they closed: %s", n, r)
	}
}

// openFilesLimit is pid's "Max open files" line from /proc (Go raises the soft
// limit to the hard one at start-up, so the agent needs no code for it).
func openFilesLimit(t *testing.T, pid int) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/limits", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "Max open files") {
			return strings.Join(strings.Fields(l), " ")
		}
	}
	return "no open files limit"
}
