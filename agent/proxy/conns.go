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
	Start       time.Time      `json:"start"`
	End         time.Time      `json:"end,omitzero"`
	BytesSent   int64          `json:"bytes_sent"`
	BytesRecv   int64          `json:"bytes_received"`
	Error       string         `json:"error,omitempty"`
}

// tracker keeps the live connections and a bounded ring of ended ones.
type tracker struct {
	nextID atomic.Uint64
	mu     sync.Mutex
	live   map[uint64]*Conn
	ended  []Conn // ring
	next   int
	full   bool
}

func newTracker(keep int) *tracker {
	return &tracker{live: map[uint64]*Conn{}, ended: make([]Conn, keep)}
}

func (t *tracker) open(c Conn) *Conn {
	c.ID = t.nextID.Add(1)
	c.Start = time.Now()
	p := &c
	t.mu.Lock()
	t.live[c.ID] = p
	t.mu.Unlock()
	return p
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
