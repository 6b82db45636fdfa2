// What a listener handoff (agent/handoff) needs of the proxy: the listening sockets
// it serves pods on, to pass to a new agent, and a drain that stops accepting on
// them while the connections in progress carry on.

package proxy

import (
	"context"
	"net"
	"time"

	"github.com/ferrymesh/ferry/agent/tunnel"
)

// PodListener is one listening socket the proxy serves a pod on.
type PodListener struct {
	UID, Name string
	Cookie    uint64 // the pod's network namespace
	Listener  net.Listener
}

// Listeners returns every pod listener the proxy serves on.
func (p *Proxy) Listeners() []PodListener {
	p.mu.RLock()
	defer p.mu.RUnlock()
	var out []PodListener
	for _, pd := range p.pods {
		for _, ln := range pd.listeners {
			out = append(out, PodListener{UID: pd.w.UID, Name: pd.w.Name, Cookie: pd.cookie, Listener: ln})
		}
	}
	return out
}

// StopAccepting closes this process's copies of the pods' listeners (a successor
// accepts on the same sockets) and sends a GOAWAY on every tunnel peers opened
// into the pods, so that they open their next streams on new tunnels, which the
// successor accepts. The pods' contexts stay: a connection accepted just before is
// still dialled, and requests and streams in flight go on (Drain waits for them).
func (p *Proxy) StopAccepting() {
	p.mu.RLock()
	pods := make([]*pod, 0, len(p.pods))
	for _, pd := range p.pods {
		pods = append(pods, pd)
	}
	p.mu.RUnlock()
	for _, pd := range pods {
		for _, ln := range pd.listeners {
			ln.Close()
		}
		p.drainTunnel(pd.tunnel)
	}
	// Idle keep-alive connections close; a request in progress gets its response
	// with "Connection: close".
	p.l7.srv.SetKeepAlivesEnabled(false)
}

// Drain waits until no proxied connection and no tunnel stream is left, or ctx
// ends. Stop still follows.
func (p *Proxy) Drain(ctx context.Context) {
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	for {
		// Handlers cover a connection accepted but not yet recorded; the records,
		// those the L7 server carries.
		p.mu.RLock()
		tunnels := len(p.draining)
		p.mu.RUnlock()
		if p.conns.liveCount() == 0 && tunnels == 0 && p.handling.Load() == 0 {
			return
		}
		select {
		case <-ctx.Done():
			p.log.Warn("drain grace passed with connections still carried", "live_records", p.conns.liveCount(), "draining_tunnel_servers", tunnels, "handlers", p.handling.Load())
			return
		case <-t.C:
		}
	}
}

// drainTunnel sends a GOAWAY on ts's connections and forgets ts once their streams
// have ended; Stop closes what is still draining.
func (p *Proxy) drainTunnel(ts *tunnel.Server) {
	if ts == nil {
		return
	}
	p.mu.Lock()
	if _, ok := p.draining[ts]; ok {
		p.mu.Unlock()
		return
	}
	p.draining[ts] = struct{}{}
	p.mu.Unlock()
	go func() {
		// Stop ends the proxy's context, and closes what is still draining.
		_ = ts.Shutdown(p.ctx)
		p.mu.Lock()
		delete(p.draining, ts)
		p.mu.Unlock()
	}()
}

// liveCount is how many connections are open.
func (t *tracker) liveCount() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.live)
}
