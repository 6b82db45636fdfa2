// This file tracks proxied connections: the live ones, a ring of recently ended
// ones for the admin API, and the observer (flows and metrics) told of each one.

package proxy

import (
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// Security says how a proxied connection was carried.
type Security string

const (
	// MTLS: through the mutual-TLS tunnel between nodes.
	MTLS Security = "mtls"
	// SameNode: both ends on this node; the agent delivered it without leaving the
	// host, and knows both identities from the listeners it owns.
	SameNode Security = "same-node"
	// Plaintext: a destination or source outside the mesh.
	Plaintext Security = "plaintext"
)

// Direction says which side of the agent a connection entered.
type Direction string

const (
	Outbound Direction = "outbound"
	Inbound  Direction = "inbound"
)

// Conn describes one proxied connection, live or recently ended.
type Conn struct {
	ID          uint64         `json:"id"`
	Direction   Direction      `json:"direction"`
	Pod         string         `json:"pod"`
	Src         netip.AddrPort `json:"src"`
	Dst         netip.AddrPort `json:"dst"`
	SrcIdentity string         `json:"src_identity,omitempty"`
	DstIdentity string         `json:"dst_identity,omitempty"`
	Security    Security       `json:"security"`
	// SrcPod and DstPod name the mesh workloads ("namespace/name") at either end,
	// when the address is one; SrcNode and DstNode the nodes they run on.
	SrcPod    string    `json:"src_pod,omitempty"`
	DstPod    string    `json:"dst_pod,omitempty"`
	SrcNode   string    `json:"src_node,omitempty"`
	DstNode   string    `json:"dst_node,omitempty"`
	Start     time.Time `json:"start"`
	End       time.Time `json:"end,omitzero"`
	BytesSent int64     `json:"bytes_sent"`
	BytesRecv int64     `json:"bytes_received"`
	Error     string    `json:"error,omitempty"`
}

// ConnObserver is told of every proxied connection when it opens and when it ends.
// Both calls run on the connection's goroutine: they must be quick and must not block.
type ConnObserver interface {
	ConnOpened(Conn)
	ConnClosed(Conn)
}

// tracker keeps the live connections and a bounded ring of ended ones.
type tracker struct {
	obs     ConnObserver                      // nil: nobody to tell
	resolve func(netip.Addr) (Workload, bool) // mesh workload at an address
	nextID  atomic.Uint64
	mu      sync.Mutex
	live    map[uint64]*Conn
	ended   []Conn // ring
	next    int
	full    bool
}

func newTracker(keep int) *tracker {
	return &tracker{live: map[uint64]*Conn{}, ended: make([]Conn, keep)}
}

func (t *tracker) open(c Conn) *Conn {
	c.ID = t.nextID.Add(1)
	c.Start = time.Now()
	t.fill(&c)
	p := &c
	t.mu.Lock()
	t.live[c.ID] = p
	t.mu.Unlock()
	if t.obs != nil {
		t.obs.ConnOpened(c)
	}
	return p
}

// fill names the workloads at both ends from the mesh directory. The pod a listener
// belongs to is known already; the other end is looked up by address.
func (t *tracker) fill(c *Conn) {
	if t.resolve == nil {
		return
	}
	if w, ok := t.resolve(c.Src.Addr().Unmap()); ok && c.SrcPod == "" {
		c.SrcPod, c.SrcNode = w.Name, w.Node
	}
	if w, ok := t.resolve(c.Dst.Addr().Unmap()); ok && c.DstPod == "" {
		c.DstPod, c.DstNode = w.Name, w.Node
	}
}

func (t *tracker) close(c *Conn, sent, recv int64, err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.live, c.ID)
	c.End = time.Now()
	c.BytesSent, c.BytesRecv = sent, recv
	if err != nil {
		c.Error = err.Error()
	}
	t.ended[t.next] = *c
	t.next = (t.next + 1) % len(t.ended)
	if t.next == 0 {
		t.full = true
	}
	if t.obs != nil {
		t.obs.ConnClosed(*c)
	}
}

// workloadAt returns the mesh workload with address ip.
func (p *Proxy) workloadAt(ip netip.Addr) (Workload, bool) {
	p.mu.RLock()
	defer p.mu.RUnlock()
	w, ok := p.byIP[ip]
	return w, ok
}

// snapshot returns live connections, then ended ones oldest first.
func (t *tracker) snapshot() (live, ended []Conn) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, c := range t.live {
		live = append(live, *c)
	}
	if t.full {
		ended = append(ended, t.ended[t.next:]...)
	}
	ended = append(ended, t.ended[:t.next]...)
	return live, ended
}

// countedConn counts the bytes through a connection that something else copies,
// and reports them once when it is closed.
type countedConn struct {
	*net.TCPConn
	in, out atomic.Int64
	once    sync.Once
	done    func(in, out int64)
}

func (c *countedConn) Read(b []byte) (int, error) {
	n, err := c.TCPConn.Read(b)
	c.in.Add(int64(n))
	return n, err
}

func (c *countedConn) Write(b []byte) (int, error) {
	n, err := c.TCPConn.Write(b)
	c.out.Add(int64(n))
	return n, err
}

func (c *countedConn) Close() error {
	err := c.TCPConn.Close()
	c.once.Do(func() { c.done(c.in.Load(), c.out.Load()) })
	return err
}
