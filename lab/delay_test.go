package lab

import (
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/agent/netns"
	"github.com/ferrymesh/ferry/internal/privileged"
)

// delayNetns is a named network namespace with loopback up and every UDP datagram
// sent on lo queued to the delay line's queue, so that a datagram and its answer
// each wait once; it is removed when the test ends.
func delayNetns(t *testing.T) (path string, h *netns.Handle) {
	t.Helper()
	privileged.Require(t)
	name := fmt.Sprintf("ferrydelay%d", os.Getpid())
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	run("ip", "netns", "add", name)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	run("ip", "-n", name, "link", "set", "lo", "up")
	run("ip", "netns", "exec", name, "iptables", "-w", "-A", "OUTPUT", "-o", "lo", "-p", "udp", "-j", "NFQUEUE", "--queue-num", fmt.Sprint(delayQueueNum), "--queue-bypass")
	path = filepath.Join("/run/netns", name)
	h, err := netns.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return path, h
}

// udpPair is a client and an echo server on loopback inside h; the server echoes
// every datagram until the test ends.
func udpPair(t *testing.T, h *netns.Handle) (client *net.UDPConn) {
	t.Helper()
	var srv *net.UDPConn
	err := h.Do(func() error {
		var err error
		if srv, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}); err != nil {
			return err
		}
		client, err = net.DialUDP("udp4", nil, srv.LocalAddr().(*net.UDPAddr))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 2048)
		for {
			n, from, err := srv.ReadFromUDP(buf)
			if err != nil {
				return
			}
			_, _ = srv.WriteToUDP(buf[:n], from)
		}
	}()
	t.Cleanup(func() { srv.Close(); client.Close(); <-done })
	return client
}

// Each datagram and its echo wait the delay once each, in order, and closing the line
// lets the rest through at once.
func TestDelayLine(t *testing.T) {
	path, h := delayNetns(t)
	const delay = 50 * time.Millisecond
	d, err := newDelayLine(path, delay, 1000)
	if err != nil {
		t.Fatal(err)
	}
	d.start()
	closed := false
	t.Cleanup(func() {
		if !closed {
			d.close()
		}
	})
	c := udpPair(t, h)

	// One at a time: each round trip is at least 2×delay.
	var rtts []time.Duration
	buf := make([]byte, 64)
	for i := range 5 {
		start := time.Now()
		binary.BigEndian.PutUint32(buf, uint32(i))
		if _, err := c.Write(buf[:8]); err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Read(buf); err != nil {
			t.Fatalf("round trip %d: %v", i, err)
		}
		rtt := time.Since(start)
		if rtt < 2*delay {
			t.Fatalf("round trip %d took %s: less than twice the %s delay", i, rtt, delay)
		}
		rtts = append(rtts, rtt)
	}
	t.Logf("round trips through a %s delay line both ways: %v", delay, rtts)

	// 200 at once come back complete and in order.
	const burst = 200
	for i := range burst {
		binary.BigEndian.PutUint32(buf, uint32(1000+i))
		if _, err := c.Write(buf[:8]); err != nil {
			t.Fatal(err)
		}
	}
	for i := range burst {
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		n, err := c.Read(buf)
		if err != nil {
			t.Fatalf("burst datagram %d: %v", i, err)
		}
		if got := binary.BigEndian.Uint32(buf[:n]); got != uint32(1000+i) {
			t.Fatalf("burst datagram %d: got %d: out of order", i, got-1000)
		}
	}
	s, err := d.stats()
	if err != nil {
		t.Fatal(err)
	}
	if want := uint64(2 * (5 + burst)); s.Delayed != want || s.QueueDropped != 0 || s.UserDropped != 0 {
		t.Fatalf("stats %+v, want %d delayed and none dropped", s, want)
	}

	// Closing releases what is held rather than dropping it: a datagram sent just
	// before comes back, its echo passing by the rule's --queue-bypass once the line
	// is gone.
	binary.BigEndian.PutUint32(buf, 7)
	if _, err := c.Write(buf[:8]); err != nil {
		t.Fatal(err)
	}
	if err := d.close(); err != nil {
		t.Fatal(err)
	}
	closed = true
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Read(buf); err != nil {
		t.Fatalf("datagram held when the line closed: %v", err)
	}
}

// A queue full to its length drops, and the drops are counted rather than hidden.
func TestDelayLineFullQueueCounts(t *testing.T) {
	path, h := delayNetns(t)
	d, err := newDelayLine(path, time.Second, 10)
	if err != nil {
		t.Fatal(err)
	}
	d.start()
	defer d.close()
	c := udpPair(t, h)
	for range 50 {
		if _, err := c.Write([]byte("x")); err != nil {
			t.Fatal(err)
		}
	}
	s, err := d.stats()
	if err != nil {
		t.Fatal(err)
	}
	if s.QueueDropped < 40 {
		t.Fatalf("stats %+v: want at least 40 of 50 datagrams counted as dropped by a queue of 10", s)
	}
	t.Logf("50 datagrams into a queue of 10: %+v", s)
}
