package e2e

import (
	"context"
	"encoding/json"
	"net/netip"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/api/admin"
)

// The tunnels lab: node1 has pod a, node2 pod c, both enrolled, fed from state files;
// its pods are in 10.114.0.0/16.
const (
	tnPrefix = "tn"
	tnPodNet = 114
)

// tnConns is what the "tn-conns" scenario prints: per-connection outcomes.
type tnConns struct {
	OK     int      `json:"ok"`
	Failed int      `json:"failed"`
	Errors []string `json:"errors,omitempty"`
}

// tunnelScenario runs the tunnels scenarios; ok is false for a name it does not know.
//
// tn-conns: a new connection every 20 ms for n seconds, each echoing 1 KiB, at most
// 200 at once; it prints tnConns (as the result's error text when any failed).
func tunnelScenario(name, addr string, n int) (scenarioResult, bool, error) {
	if name != "tn-conns" {
		return scenarioResult{}, false, nil
	}
	var mu sync.Mutex
	var out tnConns
	var wg sync.WaitGroup
	slots := make(chan struct{}, 200)
	deadline := time.Now().Add(time.Duration(n) * time.Second)
	for time.Now().Before(deadline) {
		slots <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-slots }()
			err := func() error {
				c, err := dial(addr)
				if err != nil {
					return err
				}
				defer c.Close()
				c.SetDeadline(time.Now().Add(30 * time.Second))
				return echo(c, 1024)
			}()
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				out.Failed++
				if len(out.Errors) < 20 {
					out.Errors = append(out.Errors, err.Error())
				}
				return
			}
			out.OK++
		}()
		time.Sleep(20 * time.Millisecond)
	}
	wg.Wait()
	b, _ := json.Marshal(out)
	return scenarioResult{Local: string(b)}, true, nil
}

// newTunnelsLab brings up the tunnels lab with an echo server on c.
func newTunnelsLab(t *testing.T) *env { return newACLab(t, tnPrefix, tnPodNet) }

// TestTunnelsDestinationCrash: while a opens a connection to c every 20 ms, node2's
// agent (the destination side) is killed with SIGKILL and started again as a
// supervisor would. Connections whose bytes were in flight through the dead tunnel
// are reset; every other one gets through: a connection whose CONNECT was pending,
// or made while node2 had no agent, is retried on a fresh tunnel once node2 serves
// again. Node1's records show it: every connection it failed had sent bytes upstream.
func TestTunnelsDestinationCrash(t *testing.T) {
	e := newTunnelsLab(t)
	caddr := e.addr("c", echoPort)
	e.mustRun(t, "a", "echo", caddr, "4096") // the tunnel is up and pooled

	type ran struct {
		res scenarioResult
		err error
	}
	done := make(chan ran, 1)
	go func() {
		res, err := e.run(t, "a", "tn-conns", caddr, "8")
		done <- ran{res, err}
	}()
	time.Sleep(2500 * time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	r, err := e.lab.RestartAgent(ctx, "node2", syscall.SIGKILL)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("node2's agent killed and restarted: exited %s after the signal, ready after %s", r.Stopped, r.Ready)
	got := <-done
	if got.err != nil {
		t.Fatal(got.err)
	}
	var client tnConns
	if err := json.Unmarshal([]byte(got.res.Local), &client); err != nil {
		t.Fatalf("scenario output %q: %v", got.res.Local, err)
	}

	cs, err := e.admin("node1").Connections(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	src, dst := e.pod("a").IP, e.pod("c").IP
	var carried, inFlight, timedOut int
	for _, c := range cs.Ended {
		if c.Direction != admin.Outbound || c.Src.Addr() != src || c.Dst.Addr() != dst {
			continue
		}
		carried++
		if c.Verdict == admin.VerdictForwarded && c.Error == "" {
			continue
		}
		switch {
		case c.BytesSent > 0:
			inFlight++
		case c.End.Sub(c.Start) >= 4500*time.Millisecond:
			// Waited the whole connect timeout (5 s) for node2 to come back.
			timedOut++
		default:
			t.Errorf("node1 failed a connection before sending a byte (no retry): %s %s: %s", c.Verdict, c.Reason, c.Error)
		}
	}
	t.Logf("client: %d connections ok, %d failed %v; node1 carried %d to c, %d failed with bytes in flight, %d waited out the connect timeout",
		client.OK, client.Failed, client.Errors, carried, inFlight, timedOut)
	if client.OK == 0 {
		t.Fatal("no connection got through")
	}
	if client.Failed > inFlight+timedOut {
		t.Errorf("the client saw %d failures, node1 only %d with bytes in flight (and %d timeouts)", client.Failed, inFlight, timedOut)
	}
	// The tunnel is back: a new connection goes through at once.
	e.mustRun(t, "a", "echo", caddr, "4096")
}

// TestTunnelsSideDoors: from inside a pod, none of the agent's own endpoints answer:
// connecting to the admin, metrics, health and observer ports on 127.0.0.1 and on
// the pod's own address is refused (the agent listens only in the node's namespace
// and on unix sockets). The admin socket is 0600 in a 0700 folder.
func TestTunnelsSideDoors(t *testing.T) {
	e := newTunnelsLab(t)
	a := e.pod("a")
	for _, ip := range []netip.Addr{netip.MustParseAddr("127.0.0.1"), a.IP} {
		for _, port := range []int{15000, 15020, 15021, 4245} {
			addr := netip.AddrPortFrom(ip, uint16(port)).String()
			if _, err := e.run(t, "a", "refused", addr); err != nil {
				t.Errorf("%s from inside pod a: %v", addr, err)
			}
		}
	}
	sock := e.lab.AgentSocket("node1")
	checkMode(t, sock, 0o600)
	checkMode(t, sock[:strings.LastIndexByte(sock, '/')], 0o700)
}

func checkMode(t *testing.T, path string, want os.FileMode) {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != want {
		t.Errorf("%s: mode %v, want %v", path, fi.Mode().Perm(), want)
	}
}
