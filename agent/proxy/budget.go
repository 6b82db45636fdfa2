// This file keeps one tenant of the shared node proxy from taking what the others
// need: per-pod budgets of concurrent connections, pending requests and buffer
// memory, refused at once when spent, and the recovery of a panic in one
// connection's or one request's handler.

package proxy

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/ferrymesh/ferry/agent/pipe"
	"github.com/ferrymesh/ferry/agent/tunnel"
	"github.com/ferrymesh/ferry/api/admin"
	"github.com/spf13/pflag"
)

// Budgets bound what one tenant of the node proxy may hold at once. A tenant is a
// local pod for what its apps send (outbound, at 15001), and a source identity for
// what reaches this node's pods (inbound: tunnel streams at 15008 by the peer's
// verified SPIFFE ID, plaintext at 15006 by source address, which is all plaintext
// says of its sender). A value of 0 or less means no limit.
type Budgets struct {
	// OutboundConns is the most connections one local pod's apps may have open
	// through the proxy at once.
	OutboundConns int
	// InboundConns is the most connections and tunnel streams one source identity
	// may have open into this node's pods at once.
	InboundConns int
	// PendingRequests is the most L7 requests one tenant may have in flight (sent,
	// response not ended) at once.
	PendingRequests int
	// BufferBytes is the most copy and body buffer memory one tenant's connections
	// and requests may hold in the proxy: each carried connection holds two copy
	// buffers (pipe.BufSize each), each request one body copy buffer.
	BufferBytes int64
}

// DefaultBudgets are generous: far above what a well-behaved pod holds, so they
// only bind a pod that floods the proxy. 16384 connections of one pod hold 2 GiB of
// copy buffers, which is where the buffer budget stops them.
func DefaultBudgets() Budgets {
	return Budgets{OutboundConns: 16384, InboundConns: 16384, PendingRequests: 4096, BufferBytes: 2 << 30}
}

// Flags registers the budgets' flags on fs, with b's values as their defaults.
func (b *Budgets) Flags(fs *pflag.FlagSet) {
	d := *b
	fs.IntVar(&b.OutboundConns, "budget-outbound-connections", d.OutboundConns, "most concurrent connections one local pod may have through the proxy (0: no limit)")
	fs.IntVar(&b.InboundConns, "budget-inbound-connections", d.InboundConns, "most concurrent connections and tunnel streams one source identity may have into this node's pods (0: no limit)")
	fs.IntVar(&b.PendingRequests, "budget-pending-requests", d.PendingRequests, "most L7 requests in flight per source pod (outbound) or source identity (inbound) (0: no limit)")
	fs.Int64Var(&b.BufferBytes, "budget-buffer-bytes", d.BufferBytes, "most copy and body buffer memory, in bytes, one pod's connections and requests may hold (0: no limit)")
}

// Budget names, as records (Conn.Budget) and metrics name them.
const (
	BudgetOutboundConns   = "outbound_connections"
	BudgetInboundConns    = "inbound_connections"
	BudgetPendingRequests = "pending_requests"
	BudgetBufferMemory    = "buffer_memory"
)

// What a carried connection and a request in flight hold of the buffer budget.
const (
	connBufferCost    = 2 * pipe.BufSize // a copy buffer per direction
	requestBufferCost = 32 << 10         // the body copy buffer (copyBuffers)
)

// BudgetExceeded is a connection or request refused because its tenant is over one
// of its budgets.
type BudgetExceeded struct {
	Tenant string // the pod (namespace/name), source identity or source address
	Budget string // one of the Budget* names
	Limit  int64
}

// budgetPrefix starts a BudgetExceeded's text, which a tunnel's refusal carries
// (tunnel.ReasonHeader) back to the source node.
const budgetPrefix = "pod_budget: "

func (e *BudgetExceeded) Error() string {
	return fmt.Sprintf("%s%s is over its %s budget (%d)", budgetPrefix, e.Tenant, e.Budget, e.Limit)
}

// refusedByBudget says whether err is a destination's tunnel refusing a stream
// because the source is over a budget there, and which budget.
func refusedByBudget(err error) (string, bool) {
	var re *tunnel.RefusedError
	if !errors.As(err, &re) || re.Status != http.StatusServiceUnavailable || !strings.HasPrefix(re.Reason, budgetPrefix) {
		return "", false
	}
	for _, b := range []string{BudgetInboundConns, BudgetPendingRequests, BudgetBufferMemory} {
		if strings.Contains(re.Reason, " its "+b+" budget") {
			return b, true
		}
	}
	return "", true
}

// BudgetObserver, when the Config's Observer is one too, is told of every refusal
// by a budget (pod names the tenant) and of every recovered panic.
type BudgetObserver interface {
	BudgetRefused(pod, budget string)
	Panicked(pod string)
}

// IsolationStats counts what the budgets refused and the panics recovered.
type IsolationStats struct {
	// Refusals by tenant and budget name.
	Refusals map[string]map[string]uint64
	Panics   uint64
}

// charge is what one connection or request takes of its tenant's budgets.
type charge struct {
	conns, requests int
	bytes           int64
}

// ledger is what every tenant holds now, and what the budgets refused.
type ledger struct {
	limits Budgets
	mu     sync.Mutex
	use    map[string]*charge // by tenant key; gone when nothing is held
	// refusals by tenant name and budget, for IsolationStats; bounded by the
	// tenants that were ever refused, which the budgets themselves make rare.
	refusals map[string]map[string]uint64
	panics   atomic.Uint64
}

func newLedger(b Budgets) *ledger {
	return &ledger{limits: b, use: map[string]*charge{}, refusals: map[string]map[string]uint64{}}
}

// hold is a charge taken; release gives it back, once.
type hold struct {
	l     *ledger
	key   string
	c     charge
	freed atomic.Bool
}

func (h *hold) release() {
	if h == nil || h.freed.Swap(true) {
		return
	}
	h.l.mu.Lock()
	defer h.l.mu.Unlock()
	u := h.l.use[h.key]
	u.conns -= h.c.conns
	u.requests -= h.c.requests
	u.bytes -= h.c.bytes
	if *u == (charge{}) {
		delete(h.l.use, h.key)
	}
}

// take charges c to the tenant at key (named name in refusals), whose connection
// limit is connLimit under the budget connBudget; over any budget it takes nothing
// and says which.
func (l *ledger) take(key, name string, c charge, connLimit int, connBudget string) (*hold, *BudgetExceeded) {
	l.mu.Lock()
	defer l.mu.Unlock()
	u := l.use[key]
	if u == nil {
		u = &charge{}
	}
	var over *BudgetExceeded
	switch {
	case c.conns > 0 && connLimit > 0 && u.conns+c.conns > connLimit:
		over = &BudgetExceeded{Tenant: name, Budget: connBudget, Limit: int64(connLimit)}
	case c.requests > 0 && l.limits.PendingRequests > 0 && u.requests+c.requests > l.limits.PendingRequests:
		over = &BudgetExceeded{Tenant: name, Budget: BudgetPendingRequests, Limit: int64(l.limits.PendingRequests)}
	case c.bytes > 0 && l.limits.BufferBytes > 0 && u.bytes+c.bytes > l.limits.BufferBytes:
		over = &BudgetExceeded{Tenant: name, Budget: BudgetBufferMemory, Limit: l.limits.BufferBytes}
	}
	if over != nil {
		byBudget := l.refusals[name]
		if byBudget == nil {
			byBudget = map[string]uint64{}
			l.refusals[name] = byBudget
		}
		byBudget[over.Budget]++
		return nil, over
	}
	u.conns += c.conns
	u.requests += c.requests
	u.bytes += c.bytes
	l.use[key] = u
	return &hold{l: l, key: key, c: c}, nil
}

// Tenant keys: a local pod's outbound use and a source's inbound use never share a
// budget, even when a pod's identity is also a source's.
func outboundTenant(pd *pod) string   { return "out " + pd.w.Name }
func inboundTenant(src string) string { return "in " + src }

// takeOutbound charges one connection of pod pd's apps.
func (p *Proxy) takeOutbound(pd *pod) (*hold, *BudgetExceeded) {
	return p.charged(p.budgets.take(outboundTenant(pd), pd.w.Name, charge{conns: 1, bytes: connBufferCost}, p.budgets.limits.OutboundConns, BudgetOutboundConns))
}

// takeInbound charges one connection or tunnel stream into this node from src (a
// verified identity, or a plaintext source's address).
func (p *Proxy) takeInbound(src string) (*hold, *BudgetExceeded) {
	return p.charged(p.budgets.take(inboundTenant(src), src, charge{conns: 1, bytes: connBufferCost}, p.budgets.limits.InboundConns, BudgetInboundConns))
}

// takeRequest charges one request in flight: of pod pd's apps (outbound), or from
// source identity src into pd (inbound, src not empty).
func (p *Proxy) takeRequest(pd *pod, src string) (*hold, *BudgetExceeded) {
	key, name := outboundTenant(pd), pd.w.Name
	if src != "" {
		key, name = inboundTenant(src), src
	}
	return p.charged(p.budgets.take(key, name, charge{requests: 1, bytes: requestBufferCost}, 0, ""))
}

// charged tells the observer of a refusal.
func (p *Proxy) charged(h *hold, over *BudgetExceeded) (*hold, *BudgetExceeded) {
	if over != nil {
		p.log.Debug("refused by a pod budget", "pod", over.Tenant, "budget", over.Budget, "limit", over.Limit)
		if obs, ok := p.cfg.Observer.(BudgetObserver); ok {
			obs.BudgetRefused(over.Tenant, over.Budget)
		}
	}
	return h, over
}

// IsolationStats returns the refusals by budget and the panics recovered so far.
func (p *Proxy) IsolationStats() IsolationStats {
	l := p.budgets
	l.mu.Lock()
	defer l.mu.Unlock()
	out := IsolationStats{Refusals: make(map[string]map[string]uint64, len(l.refusals)), Panics: l.panics.Load()}
	for name, byBudget := range l.refusals {
		m := make(map[string]uint64, len(byBudget))
		for b, n := range byBudget {
			m[b] = n
		}
		out.Refusals[name] = m
	}
	return out
}

// budgetRefused records c as refused by a budget.
func (t *tracker) budgetRefused(c *Conn, over *BudgetExceeded) {
	c = t.take(c)
	c.Verdict, c.Reason, c.Budget = admin.VerdictDenied, admin.ReasonPodBudget, over.Budget
	t.end(c, 0, 0, over)
}

// asBudgetExceeded finds a budget refusal in err.
func asBudgetExceeded(err error) (*BudgetExceeded, bool) {
	var be *BudgetExceeded
	ok := errors.As(err, &be)
	return be, ok
}

// panicked logs and counts a panic recovered from a handler of pod pd's traffic.
func (p *Proxy) panicked(pd *pod, v any) {
	p.budgets.panics.Add(1)
	p.log.Error("proxy handler panicked; connection closed", "pod", pd.w.Name, "panic", fmt.Sprint(v), "stack", string(debug.Stack()))
	if obs, ok := p.cfg.Observer.(BudgetObserver); ok {
		obs.Panicked(pd.w.Name)
	}
}

// serveConn runs handle for connection c of pod pd, recovering a panic in it: the
// panic is logged and counted, c is reset, and the rest of the proxy carries on.
func (p *Proxy) serveConn(pd *pod, c *net.TCPConn, handle func(*net.TCPConn)) {
	defer func() {
		if v := recover(); v != nil {
			p.panicked(pd, v)
			pipe.Abort(c)
			p.conns.end(&Conn{Pod: pd.w.Name, Verdict: admin.VerdictError, Reason: admin.ReasonPanic}, 0, 0, fmt.Errorf("proxy panic: %v", v))
		}
	}()
	handle(c)
}

// recoverRequest is deferred first in a request's handler: a panic other than
// http.ErrAbortHandler (how ReverseProxy ends a response whose upstream failed) is
// logged and counted, then the request is aborted the quiet way, which closes its
// connection (HTTP/1.1) or resets its stream (HTTP/2).
func (p *Proxy) recoverRequest(pd *pod) {
	v := recover()
	if v == nil {
		return
	}
	if v != http.ErrAbortHandler { //nolint:errorlint // the sentinel itself is what is panicked
		p.panicked(pd, v)
	}
	panic(http.ErrAbortHandler)
}
