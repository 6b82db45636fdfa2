// This file bounds a server-side tunnel connection's life by the certificates that
// made it: the connection is retired (GOAWAY; its streams drain) when this side's
// certificate is replaced or either side's reaches its NotAfter, and every new
// stream is checked against the identity and certificates as they are now.

package tunnel

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ferrymesh/ferry/agent/identity"
)

// ticketCertPrefix marks, in a session ticket's Extra, the serial of the certificate
// the server presented when it issued the ticket: a ticket from before a rotation
// does not resume, so the client sees the new certificate.
var ticketCertPrefix = []byte("ferry-server-cert:")

// tunnelConn is one accepted tunnel connection's lifetime.
type tunnelConn struct {
	mu         sync.Mutex
	own        *tls.Certificate // presented, or the one a resumed session was made with
	current    func() *tls.Certificate
	peerSerial string
	expires    time.Time
	timer      *time.Timer
	conn       *h2conn // once HTTP/2 runs on it
	retired    atomic.Bool
}

// serve records the connection's HTTP/2 side; one retired meanwhile is drained.
func (tc *tunnelConn) serve(c *h2conn) {
	tc.mu.Lock()
	tc.conn = c
	tc.mu.Unlock()
	if tc.retired.Load() {
		c.drain()
	}
}

// bindLifetime makes c, one connection's TLS configuration cloned from base, record
// the certificate it presents in tc and carry that certificate's serial in the
// session tickets it issues; a ticket issued with another certificate than the
// current one does not resume. outer is the listener's configuration, whose ticket
// keys the connection uses.
func bindLifetime(c, outer, base *tls.Config, hello *tls.ClientHelloInfo, tc *tunnelConn) {
	current := func() *tls.Certificate {
		if base.GetCertificate != nil {
			cert, err := base.GetCertificate(hello)
			if err != nil {
				return nil
			}
			return cert
		}
		if len(base.Certificates) > 0 {
			return &base.Certificates[0]
		}
		return nil
	}
	tc.mu.Lock()
	tc.current = current
	tc.mu.Unlock()
	c.GetCertificate = func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
		cert := current()
		if cert == nil {
			return nil, errors.New("tunnel: no certificate for this pod")
		}
		tc.mu.Lock()
		tc.own = cert
		tc.mu.Unlock()
		return cert, nil
	}
	c.Certificates = nil
	c.WrapSession = func(cs tls.ConnectionState, ss *tls.SessionState) ([]byte, error) {
		tc.mu.Lock()
		own := tc.own
		tc.mu.Unlock()
		ss.Extra = append(ss.Extra, append(bytes.Clone(ticketCertPrefix), identity.Serial(own)...))
		return outer.EncryptTicket(cs, ss)
	}
	c.UnwrapSession = func(ticket []byte, cs tls.ConnectionState) (*tls.SessionState, error) {
		ss, err := outer.DecryptTicket(ticket, cs)
		if err != nil || ss == nil {
			return ss, err
		}
		cert := current()
		want := append(bytes.Clone(ticketCertPrefix), identity.Serial(cert)...)
		for _, x := range ss.Extra {
			if bytes.Equal(x, want) {
				tc.mu.Lock()
				tc.own = cert
				tc.mu.Unlock()
				return ss, nil
			}
		}
		return nil, nil // made with another certificate: a full handshake instead
	}
}

// begin schedules tc's retirement at the first of both certificates' expiry, once
// the handshake is done.
func (s *Server) begin(tc *tunnelConn, cs tls.ConnectionState) {
	peer := cs.PeerCertificates[0]
	tc.mu.Lock()
	defer tc.mu.Unlock()
	tc.peerSerial = identity.Serial(&tls.Certificate{Leaf: peer})
	tc.expires = peer.NotAfter
	if tc.own != nil && tc.own.Leaf != nil && tc.own.Leaf.NotAfter.Before(tc.expires) {
		tc.expires = tc.own.Leaf.NotAfter
	}
	tc.timer = time.AfterFunc(time.Until(tc.expires), func() { s.retireConn(tc, "certificate expiry") })
}

// end stops tc's timer once the connection is gone.
func (tc *tunnelConn) end() {
	tc.mu.Lock()
	defer tc.mu.Unlock()
	if tc.timer != nil {
		tc.timer.Stop()
	}
}

// retireConn sends tc a GOAWAY: its streams carry on, no new one opens.
func (s *Server) retireConn(tc *tunnelConn, why string) {
	if tc.retired.Swap(true) {
		return
	}
	tc.end()
	tc.mu.Lock()
	c, serial := tc.conn, tc.peerSerial
	tc.mu.Unlock()
	s.log.Info("tunnel retired", "peer_serial", serial, "reason", why)
	if c != nil {
		c.drain()
	}
}

// rotated says this side no longer presents the certificate tc was made with.
func (tc *tunnelConn) rotated() bool {
	tc.mu.Lock()
	own, current := tc.own, tc.current
	tc.mu.Unlock()
	if current == nil {
		return false
	}
	return identity.Serial(current()) != identity.Serial(own)
}

// streamRefusal decides a new stream on tc before the configuration's Admit: a
// retired connection (the client will retry on a new one: 503), an expired
// certificate, a rotated one, or a peer that is no longer the workload at its
// address. Nil admits it.
func (s *Server) streamRefusal(tc *tunnelConn, ci *connInfo) (int, error) {
	if tc == nil {
		return 0, nil
	}
	tc.mu.Lock()
	expires := tc.expires
	tc.mu.Unlock()
	switch {
	case tc.retired.Load():
		return http.StatusServiceUnavailable, errors.New("tunnel retired")
	case !time.Now().Before(expires):
		s.retireConn(tc, "certificate expired")
		return http.StatusServiceUnavailable, errors.New("tunnel certificate expired")
	case tc.rotated():
		s.retireConn(tc, "certificate rotated")
		return http.StatusServiceUnavailable, errors.New("tunnel certificate rotated")
	}
	if s.cfg.Authorize != nil {
		if err := s.cfg.Authorize(ci.peerID, ci.remote); err != nil {
			return http.StatusForbidden, err
		}
	}
	return 0, nil
}

// watchRotations retires, at each change of the local certificates (Changes), the
// connections whose certificate is no longer this side's current one, until the
// server closes.
func (s *Server) watchRotations() {
	follow(s.ctx, &s.watcher, s.cfg.Changes, func() {
		s.mu.Lock()
		var stale []*tunnelConn
		for _, tc := range s.tconns {
			if tc.rotated() {
				stale = append(stale, tc)
			}
		}
		s.mu.Unlock()
		for _, tc := range stale {
			s.retireConn(tc, "certificate rotated")
		}
	})
}

// follow calls fn after each change changes reports (nil: none), on a goroutine wg
// owns, until ctx ends. The next change's channel is taken before fn runs, so a
// change during fn is not missed.
func follow(ctx context.Context, wg *sync.WaitGroup, changes func() <-chan struct{}, fn func()) {
	if changes == nil {
		return
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		ch := changes()
		for {
			select {
			case <-ch:
				ch = changes()
				fn()
			case <-ctx.Done():
				return
			}
		}
	}()
}

// retireAll sends every connection a GOAWAY (Shutdown).
func (s *Server) retireAll(why string) {
	s.mu.Lock()
	all := make([]*tunnelConn, 0, len(s.tconns))
	for _, tc := range s.tconns {
		all = append(all, tc)
	}
	s.mu.Unlock()
	for _, tc := range all {
		s.retireConn(tc, why)
	}
}

// tunnelConnOf is the lifetime record of the raw connection c (serveConn's).
func (s *Server) tunnelConnOf(c net.Conn) *tunnelConn {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.tconns[c]
}
