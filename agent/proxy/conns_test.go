package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/agent/tunnel"
	"github.com/ferrymesh/ferry/api/admin"
)

// A failure to reach the destination is classified by the error's type, never by
// its text.
func TestDialOutcome(t *testing.T) {
	opErr := func(errno syscall.Errno) error {
		return &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("connect", errno)}
	}
	for _, tc := range []struct {
		name    string
		err     error
		verdict admin.Verdict
		reason  admin.Reason
		status  int
	}{
		{"tunnel 403", fmt.Errorf("outbound: %w", &tunnel.RefusedError{Status: 403, Reason: "target is not this pod"}), admin.VerdictDenied, admin.ReasonForbidden, 403},
		{"tunnel 502", &tunnel.RefusedError{Status: 502, Reason: "connection refused"}, admin.VerdictError, admin.ReasonRefused, 502},
		{"tunnel 504", &tunnel.RefusedError{Status: 504}, admin.VerdictError, admin.ReasonTimeout, 504},
		{"tunnel 400", &tunnel.RefusedError{Status: 400}, admin.VerdictError, admin.ReasonTunnel, 400},
		{"app refused", opErr(syscall.ECONNREFUSED), admin.VerdictError, admin.ReasonRefused, 0},
		{"no route", opErr(syscall.EHOSTUNREACH), admin.VerdictError, admin.ReasonUnreachable, 0},
		{"timeout", fmt.Errorf("tunnel connect: %w", context.DeadlineExceeded), admin.VerdictError, admin.ReasonTimeout, 0},
		{"pool closed", tunnel.ErrPoolClosed, admin.VerdictError, admin.ReasonCanceled, 0},
		// Text that looks like a refusal decides nothing.
		{"403 in the text only", errors.New("refused by destination: status 403: Forbidden"), admin.VerdictError, admin.ReasonOther, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v, r, s := dialOutcome(tc.err)
			if v != tc.verdict || r != tc.reason || s != tc.status {
				t.Errorf("%v, %q, %d; want %v, %q, %d", v, r, s, tc.verdict, tc.reason, tc.status)
			}
		})
	}
}

// The tracker's records carry the outcome as values, with the error text beside it.
func TestTrackerRecordsOutcome(t *testing.T) {
	tr := newTracker(8)
	var closed []admin.Conn
	tr.obs = observerFunc(func(c admin.Conn) { closed = append(closed, c) })
	dst := netip.MustParseAddrPort("10.1.2.10:8080")

	refused := &tunnel.RefusedError{Status: 403, Reason: "target is not this pod"}
	tr.refused(tr.open(Conn{Direction: admin.Outbound, Security: admin.MTLS, Dst: dst}), refused)
	tr.close(tr.open(Conn{Direction: admin.Outbound, Security: admin.MTLS, Dst: dst}), 10, 20, nil)
	tr.close(tr.open(Conn{Direction: admin.Outbound, Security: admin.Plaintext, Dst: dst}), 10, 0, &net.OpError{Op: "read", Err: syscall.ECONNRESET})
	tr.stream(tr.open(Conn{Direction: admin.Inbound, Security: admin.MTLS, Dst: dst}),
		tunnel.StreamInfo{Target: dst, Status: 403, Err: errors.New("403 target is not this pod"), Duration: time.Millisecond})
	tr.stream(tr.open(Conn{Direction: admin.Inbound, Security: admin.MTLS, Dst: dst}),
		tunnel.StreamInfo{Target: dst, Status: 502, Err: errors.New("dial: connection refused")})
	tr.stream(tr.open(Conn{Direction: admin.Inbound, Security: admin.MTLS, Dst: dst}),
		tunnel.StreamInfo{Target: dst, Status: 200, BytesIn: 5, BytesOut: 6})

	want := []struct {
		verdict admin.Verdict
		reason  admin.Reason
		status  int
		err     string
	}{
		{admin.VerdictDenied, admin.ReasonForbidden, 403, refused.Error()},
		{admin.VerdictForwarded, admin.ReasonNone, 200, ""},
		{admin.VerdictForwarded, admin.ReasonReset, 0, "read: connection reset by peer"},
		{admin.VerdictDenied, admin.ReasonForbidden, 403, "403 target is not this pod"},
		{admin.VerdictError, admin.ReasonRefused, 502, "dial: connection refused"},
		{admin.VerdictForwarded, admin.ReasonNone, 200, ""},
	}
	_, ended := tr.snapshot()
	if len(ended) != len(want) || len(closed) != len(want) {
		t.Fatalf("%d ended, %d told the observer; want %d", len(ended), len(closed), len(want))
	}
	for i, w := range want {
		for _, c := range []admin.Conn{ended[i], closed[i]} {
			if c.Verdict != w.verdict || c.Reason != w.reason || c.Status != w.status || c.Error != w.err || c.End.IsZero() {
				t.Errorf("record %d: %v %q %d %q; want %v %q %d %q", i, c.Verdict, c.Reason, c.Status, c.Error, w.verdict, w.reason, w.status, w.err)
			}
		}
	}
	if c := ended[5]; c.BytesSent != 5 || c.BytesRecv != 6 {
		t.Errorf("stream bytes %d/%d", c.BytesSent, c.BytesRecv)
	}
}

type observerFunc func(admin.Conn)

func (observerFunc) ConnOpened(admin.Conn)     {}
func (observerFunc) Request(admin.Conn)        {}
func (f observerFunc) ConnClosed(c admin.Conn) { f(c) }

// TestSnapshotWhileConnectionsEnd reads the table (GET /connections) while records
// get their outcomes: under -race, an outcome written into a live record races
// with the read.
func TestSnapshotWhileConnectionsEnd(t *testing.T) {
	tr := newTracker(64)
	stop, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			default:
				tr.snapshot()
			}
		}
	}()
	var recs []*Conn
	for range 300 {
		recs = append(recs, tr.open(Conn{Security: admin.MTLS}))
	}
	time.Sleep(20 * time.Millisecond) // snapshots read the live records (no sync: the race detector must see it)
	for i, c := range recs {
		switch i % 3 {
		case 0:
			tr.close(c, 1, 1, nil)
		case 1:
			tr.refused(c, errors.New("connection refused"))
		default:
			tr.noEndpoint(c, "default/web")
		}
	}
	close(stop)
	<-done
	live, ended := tr.snapshot()
	if len(live) != 0 || len(ended) != 64 {
		t.Fatalf("%d live and %d ended records, want 0 and 64", len(live), len(ended))
	}
	if last := ended[len(ended)-1]; last.Reason != admin.ReasonNoEndpoints || last.End.IsZero() {
		t.Errorf("last record %+v: want reason %s and an end time", last, admin.ReasonNoEndpoints)
	}
}
