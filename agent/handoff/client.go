// The new agent's side: it asks the running agent for its sockets, and says when
// it serves on them.

package handoff

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// Taken is what a new agent received: Files[i] is described by Sockets[i]. The
// caller owns the files.
type Taken struct {
	PID     int // the running agent's
	Sockets []Socket
	Files   []*os.File
	conn    *net.UnixConn
}

// Take connects to the running agent's handoff socket at path and receives its
// sockets. A *Error says why none were received: NoPeer when nothing answers.
func Take(ctx context.Context, path, node string) (*Taken, error) {
	d := net.Dialer{Timeout: 5 * time.Second}
	nc, err := d.DialContext(ctx, "unixpacket", path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ECONNREFUSED) {
			return nil, &Error{Reason: NoPeer, Detail: path, Err: err}
		}
		return nil, &Error{Reason: Broken, Detail: "connect", Err: err}
	}
	c := nc.(*net.UnixConn)
	deadline := time.Now().Add(30 * time.Second)
	if dl, ok := ctx.Deadline(); ok && dl.Before(deadline) {
		deadline = dl
	}
	c.SetDeadline(deadline)
	t := &Taken{conn: c}
	fail := func(r Reason, detail string, err error) (*Taken, error) {
		closeAll(t.Files)
		c.Close()
		return nil, &Error{Reason: r, Detail: detail, Err: err}
	}
	if err := send(c, message{Version: Version, Op: OpHello, Node: node, PID: os.Getpid()}, nil); err != nil {
		return fail(Broken, "hello", err)
	}
	for {
		m, files, err := recv(c)
		t.Files = append(t.Files, files...)
		if err != nil {
			return fail(Broken, "receive sockets", err)
		}
		switch {
		case m.Op == OpRefused:
			return fail(Refused, fmt.Sprintf("pid %d: %s", m.PID, m.Reason), nil)
		case m.Version != Version:
			return fail(Refused, fmt.Sprintf("pid %d speaks protocol version %d, this agent %d", m.PID, m.Version, Version), nil)
		case m.Op != OpSockets:
			return fail(Broken, fmt.Sprintf("expected %q, got %q", OpSockets, m.Op), nil)
		case len(files) != len(m.Sockets):
			return fail(Broken, fmt.Sprintf("%d sockets described, %d attached", len(m.Sockets), len(files)), nil)
		}
		t.PID = m.PID
		t.Sockets = append(t.Sockets, m.Sockets...)
		if m.Done {
			return t, nil
		}
	}
}

// Serving tells the running agent this one serves on the sockets, and waits for it
// to say it has stopped accepting.
func (t *Taken) Serving(timeout time.Duration) error {
	t.conn.SetDeadline(time.Now().Add(timeout))
	if err := send(t.conn, message{Version: Version, Op: OpServing, PID: os.Getpid()}, nil); err != nil {
		return &Error{Reason: Broken, Detail: "serving", Err: err}
	}
	m, files, err := recv(t.conn)
	closeAll(files)
	if err != nil {
		return &Error{Reason: Broken, Detail: "wait for draining", Err: err}
	}
	if m.Op != OpDraining {
		return &Error{Reason: Broken, Detail: fmt.Sprintf("expected %q, got %q", OpDraining, m.Op)}
	}
	return nil
}

// Close ends the exchange; before Serving, the running agent goes on as it was.
func (t *Taken) Close() error {
	return t.conn.Close()
}
