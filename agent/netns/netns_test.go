package netns_test

import (
	"net"
	"runtime"
	"sync"
	"testing"

	"github.com/ferrymesh/ferry/agent/netns"
	"github.com/ferrymesh/ferry/internal/privileged"
	"golang.org/x/sys/unix"
)

// cpuPerOp reports the process's CPU time (user+system, all threads) per op, a
// figure that survives other load on the machine better than ns/op does.
func cpuPerOp(b *testing.B) func() {
	var ru unix.Rusage
	cpu := func() float64 {
		unix.Getrusage(unix.RUSAGE_SELF, &ru)
		return float64(ru.Utime.Nano() + ru.Stime.Nano())
	}
	start := cpu()
	return func() { b.ReportMetric((cpu()-start)/float64(b.N), "cpu-ns/op") }
}

// hostCookie is the netns cookie of a fresh locked thread outside any Do.
func hostCookie(t testing.TB) uint64 {
	t.Helper()
	type res struct {
		c   uint64
		err error
	}
	ch := make(chan res, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		c, err := netns.CurrentCookie()
		ch <- res{c, err}
	}()
	r := <-ch
	if r.err != nil {
		t.Fatal(r.err)
	}
	return r.c
}

// listenInside opens a TCP listener on 127.0.0.1 inside h, closed when t ends.
func listenInside(t testing.TB, h *netns.Handle) net.Listener {
	t.Helper()
	var ln net.Listener
	if err := h.Do(func() error {
		var err error
		ln, err = net.Listen("tcp", "127.0.0.1:0")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// TestDoRunsInsideAndLeavesTheRestOutside: calls run in the namespace, at once when
// several are made together, a listener opened there is reachable only there, and
// after Close no thread of the process is left inside.
func TestDoRunsInsideAndLeavesTheRestOutside(t *testing.T) {
	h := privileged.NewNetns(t)
	host := hostCookie(t)
	inside, err := h.Cookie()
	if err != nil {
		t.Fatal(err)
	}
	if inside == host {
		t.Fatalf("cookie inside Do = host's %d", host)
	}

	// Eight calls that each wait for all eight to have started: they must run on
	// eight threads, all inside.
	const n = 8
	var started sync.WaitGroup
	started.Add(n)
	errs := make(chan error, n)
	cookies := make(chan uint64, n)
	for range n {
		go func() {
			errs <- h.Do(func() error {
				started.Done()
				started.Wait()
				c, err := netns.CurrentCookie()
				cookies <- c
				return err
			})
		}()
	}
	for range n {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
		if c := <-cookies; c != inside {
			t.Fatalf("concurrent Do ran in cookie %d, want %d", c, inside)
		}
	}

	// A socket made inside stays there: a listener on 127.0.0.1 in the namespace
	// answers a dial made inside.
	ln := listenInside(t, h)
	go func() {
		if c, err := ln.Accept(); err == nil {
			c.Write([]byte("hi"))
			c.Close()
		}
	}()
	var got []byte
	if err := h.Do(func() error {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			return err
		}
		defer c.Close()
		buf := make([]byte, 2)
		_, err = c.Read(buf)
		got = buf
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if string(got) != "hi" {
		t.Fatalf("read %q through the namespace's loopback, want hi", got)
	}

	// The caller's own threads never moved.
	if c := hostCookie(t); c != host {
		t.Fatalf("caller's thread cookie %d after Do, want host %d", c, host)
	}
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	if err := h.Do(func() error { return nil }); err == nil {
		t.Fatal("Do on a closed handle succeeded")
	}
	// Parked threads went home: every thread the runtime hands out now is outside.
	for range 4 * runtime.GOMAXPROCS(0) {
		if c := hostCookie(t); c != host {
			t.Fatalf("a thread is in cookie %d after Close, want host %d", c, host)
		}
	}
}

// TestDoNestsAndSurvivesPanic: a Do inside another Do's fn runs in its own
// namespace and hands the thread back to the outer one; a panic in fn still puts the
// thread back before it unwinds.
func TestDoNestsAndSurvivesPanic(t *testing.T) {
	a, b := privileged.NewNetns(t), privileged.NewNetns(t)
	ca, err := a.Cookie()
	if err != nil {
		t.Fatal(err)
	}
	cb, err := b.Cookie()
	if err != nil {
		t.Fatal(err)
	}
	var inner, after uint64
	if err := a.Do(func() error {
		if err := b.Do(func() error {
			var err error
			inner, err = netns.CurrentCookie()
			return err
		}); err != nil {
			return err
		}
		var err error
		after, err = netns.CurrentCookie()
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if inner != cb || after != ca {
		t.Fatalf("nested Do ran in %d (want %d), then outer in %d (want %d)", inner, cb, after, ca)
	}

	host := hostCookie(t)
	got := make(chan uint64, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		func() {
			defer func() { recover() }()
			a.Do(func() error { panic("boom") })
		}()
		c, _ := netns.CurrentCookie()
		got <- c
	}()
	if c := <-got; c != host {
		t.Fatalf("after a panic in Do the thread is in %d, want host %d", c, host)
	}
}

// BenchmarkDo is the cost of running a trivial function inside a pod's namespace,
// as every dial to a pod does.
func BenchmarkDo(b *testing.B) {
	h := privileged.NewNetns(b)
	b.ReportAllocs()
	defer cpuPerOp(b)()
	for b.Loop() {
		if err := h.Do(func() error { return nil }); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkDoDial opens a TCP connection to a listener inside the namespace through
// Do and closes it: the netns part of a dial to a pod with the connect it wraps.
func BenchmarkDoDial(b *testing.B) {
	h := privileged.NewNetns(b)
	ln := listenInside(b, h)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	addr := ln.Addr().String()
	b.ReportAllocs()
	defer cpuPerOp(b)()
	for b.Loop() {
		if err := h.Do(func() error {
			c, err := net.Dial("tcp", addr)
			if err == nil {
				c.Close()
			}
			return err
		}); err != nil {
			b.Fatal(err)
		}
	}
}
