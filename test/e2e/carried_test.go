package e2e

// How the agents carried a test's connections, read from their connection records:
// a capture that silently bypassed an agent leaves no record, and one that took the
// wrong path (plaintext for mTLS, the tunnel for same-node) leaves the wrong one.

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/api/admin"
)

// carryWait bounds how long the tests wait for a record; it only stops a hung test.
const carryWait = 30 * time.Second

// carriage is one record an agent must hold for a connection between two lab pods.
type carriage struct {
	node         string
	dir          admin.Direction
	security     admin.Security
	srcID, dstID string
}

func (c carriage) String() string {
	return fmt.Sprintf("%s %s %s (%s -> %s)", c.node, c.dir, c.security, orNone(c.srcID), orNone(c.dstID))
}

func orNone(s string) string {
	if s == "" {
		return "no identity"
	}
	return s
}

// carriages are the records the agents keep for one connection from pod from to pod
// to: across nodes both ends record mTLS with both identities; on one node the
// source's agent records it as same-node; from outside the mesh the destination's
// agent records inbound plaintext; out of the mesh the source's agent records
// outbound plaintext. Between two pods outside the mesh no agent records anything.
func (e *env) carriages(from, to string) []carriage {
	f, d := e.pod(from), e.pod(to)
	switch {
	case f.Enrolled && d.Enrolled && f.Node == d.Node:
		return []carriage{{f.Node, admin.Outbound, admin.SameNode, f.Identity, d.Identity}}
	case f.Enrolled && d.Enrolled:
		return []carriage{
			{f.Node, admin.Outbound, admin.MTLS, f.Identity, d.Identity},
			{d.Node, admin.Inbound, admin.MTLS, f.Identity, d.Identity},
		}
	case f.Enrolled:
		return []carriage{{f.Node, admin.Outbound, admin.Plaintext, f.Identity, ""}}
	case d.Enrolled:
		return []carriage{{d.Node, admin.Inbound, admin.Plaintext, "", d.Identity}}
	}
	return nil
}

// carried waits until, for each of carriages(from, to), the agent holds n records
// of connections from pod from to to's port that started at or after since and pass
// ok (nil: any), and fails if a record of such a connection shows another carriage.
// It returns the matching records.
func (e *env) carried(t *testing.T, since time.Time, from, to string, port, n int, ok func(connRecord) bool) []connRecord {
	t.Helper()
	want := e.carriages(from, to)
	if len(want) == 0 {
		t.Fatalf("%s → %s: neither pod is in the mesh, no agent records it", from, to)
	}
	src, dst := e.pod(from).IP, netip.AddrPortFrom(e.pod(to).IP, uint16(port))
	ours := func(c connRecord) bool {
		return c.Src.Addr() == src && c.Dst == dst && !c.Start.Before(since)
	}
	var all []connRecord
	deadline := time.Now().Add(carryWait)
	for {
		all = all[:0]
		done := true
		for _, w := range want {
			got := 0
			for _, c := range e.conns(w.node) {
				if !ours(c) {
					continue
				}
				if c.Direction != w.dir {
					continue // the other end's record, on a node that holds both ends
				}
				if c.Security != w.security || c.SrcIdentity != w.srcID || c.DstIdentity != w.dstID {
					t.Fatalf("%s → %s:%d was carried as %s %s (%s -> %s), want %s", from, to, port,
						c.Direction, c.Security, orNone(c.SrcIdentity), orNone(c.DstIdentity), w)
				}
				if ok == nil || ok(c) {
					got++
					all = append(all, c)
				}
			}
			done = done && got >= n
		}
		if done {
			return all
		}
		if time.Now().After(deadline) {
			var b strings.Builder
			for _, node := range e.lab.Nodes() {
				var mine []connRecord
				for _, c := range e.conns(node) {
					if !c.Start.Before(since) {
						mine = append(mine, c)
					}
				}
				fmt.Fprintf(&b, "%s since the test began:\n%s", node, formatConns(mine))
			}
			t.Fatalf("%s → %s:%d: want %d records as each of %v within %v; the agents hold:\n%s", from, to, port, n, want, carryWait, b.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// echoed accepts a record of a connection that carried n bytes each way.
func echoed(n int64) func(connRecord) bool {
	return func(c connRecord) bool { return c.BytesSent == n && c.BytesRecv == n && !c.End.IsZero() }
}

// refusedRecord accepts a record of a connection the destination refused: the typed
// outcome, never the error text (across nodes the tunnel answers 502).
func refusedRecord(c connRecord) bool {
	return c.Verdict == admin.VerdictError && c.Reason == admin.ReasonRefused && !c.End.IsZero()
}

// waitLive waits until node's agent holds a live connection from pod from to to's port.
func (e *env) waitLive(t *testing.T, node, from, to string, port int) connRecord {
	t.Helper()
	src, dst := e.pod(from).IP, netip.AddrPortFrom(e.pod(to).IP, uint16(port))
	deadline := time.Now().Add(carryWait)
	for {
		cs, err := e.admin(node).Connections(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range cs.Live {
			if c.Src.Addr() == src && c.Dst == dst {
				return c
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent on %s shows no live connection %s → %s:%d within %v; live:\n%s", node, from, to, port, carryWait, formatConns(cs.Live))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// localSocks counts the entries of node's local_socks, and those of them in pod's
// network namespace.
func (e *env) localSocks(t *testing.T, node, pod string) (all, pods int) {
	t.Helper()
	cookie := e.cookie(t, node, "default/"+pod)
	for _, s := range e.maps(t, node).LocalSockets {
		all++
		if s.NetnsCookie == cookie {
			pods++
		}
	}
	return all, pods
}
