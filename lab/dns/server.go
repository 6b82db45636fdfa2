package dns

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ferrymesh/ferry/agent/netns"
	"github.com/ferrymesh/ferry/internal/listener"
)

// Port is the DNS port.
const Port = 53

// tcpIdle is how long a DNS-over-TCP connection may sit idle between queries
// (RFC 7766 suggests seconds, not minutes).
const tcpIdle = 10 * time.Second

// Endpoint is one address the server answers on, inside a network namespace.
type Endpoint struct {
	// Netns is the path of the namespace to listen in; "" is the caller's.
	Netns string
	Addr  netip.AddrPort
}

// Config is what a Server serves and where.
type Config struct {
	Zone      *Zone
	Endpoints []Endpoint
}

// Server answers queries for one Zone over UDP and TCP on each of its endpoints.
type Server struct {
	cfg Config
	log *slog.Logger

	zone atomic.Pointer[Zone] // cfg.Zone, then what SetZone gave

	cancel context.CancelFunc
	wg     sync.WaitGroup
	mu     sync.Mutex
	closer []io.Closer // listeners and open TCP connections, closed by Stop
}

// New checks cfg; Start opens the sockets.
func New(cfg Config, log *slog.Logger) (*Server, error) {
	if cfg.Zone == nil {
		return nil, errors.New("dns server: no zone")
	}
	if len(cfg.Endpoints) == 0 {
		return nil, errors.New("dns server: no endpoint")
	}
	for _, e := range cfg.Endpoints {
		if !e.Addr.IsValid() {
			return nil, fmt.Errorf("dns server: endpoint in %q: no address", e.Netns)
		}
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Server{cfg: cfg, log: log}
	s.zone.Store(cfg.Zone)
	return s, nil
}

// SetZone replaces the zone served: queries answered from now on see z, as an
// authoritative server reloading its zone would. z must hold the same domain.
func (s *Server) SetZone(z *Zone) { s.zone.Store(z) }

// Start opens a UDP socket and a TCP listener on every endpoint and serves them until
// Stop. On error nothing stays open.
func (s *Server) Start(ctx context.Context) error {
	ctx, s.cancel = context.WithCancel(ctx)
	type socks struct {
		pc  net.PacketConn
		ln  net.Listener
		end Endpoint
	}
	var opened []socks
	for _, e := range s.cfg.Endpoints {
		var so socks
		so.end = e
		open := func() error {
			lc := listener.Config()
			var err error
			if so.pc, err = lc.ListenPacket(ctx, "udp", e.Addr.String()); err != nil {
				return fmt.Errorf("listen udp %s: %w", e.Addr, err)
			}
			if so.ln, err = lc.Listen(ctx, "tcp", e.Addr.String()); err != nil {
				so.pc.Close()
				return fmt.Errorf("listen tcp %s: %w", e.Addr, err)
			}
			return nil
		}
		var err error
		if e.Netns == "" {
			err = open()
		} else {
			var h *netns.Handle
			if h, err = netns.Open(e.Netns); err == nil {
				// A socket stays in the namespace it was created in.
				err = h.Do(open)
				h.Close()
			}
		}
		if err != nil {
			for _, o := range opened {
				o.pc.Close()
				o.ln.Close()
			}
			s.cancel()
			return fmt.Errorf("dns server: %w", err)
		}
		opened = append(opened, so)
	}
	for _, o := range opened {
		s.track(o.pc)
		s.track(o.ln)
		s.wg.Add(2)
		go s.serveUDP(o.pc)
		go s.serveTCP(ctx, o.ln)
		s.log.Info("dns listening", "netns", o.end.Netns, "addr", o.end.Addr.String(), "zone", s.zone.Load().Domain())
	}
	return nil
}

// Stop closes every socket and waits for the goroutines.
func (s *Server) Stop() {
	if s.cancel != nil {
		s.cancel()
	}
	s.mu.Lock()
	for _, c := range s.closer {
		c.Close()
	}
	s.closer = nil
	s.mu.Unlock()
	s.wg.Wait()
}

func (s *Server) track(c io.Closer) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closer = append(s.closer, c)
}

func (s *Server) untrack(c io.Closer) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, x := range s.closer {
		if x == c {
			s.closer = append(s.closer[:i], s.closer[i+1:]...)
			return
		}
	}
}

func (s *Server) serveUDP(pc net.PacketConn) {
	defer s.wg.Done()
	buf := make([]byte, 65535)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				s.log.Warn("dns udp read", "error", err)
			}
			return
		}
		out, err := s.zone.Load().Answer(buf[:n], true)
		if err != nil {
			s.log.Debug("dns query dropped", "from", from.String(), "error", err)
			continue
		}
		if _, err := pc.WriteTo(out, from); err != nil {
			s.log.Debug("dns udp write", "to", from.String(), "error", err)
		}
	}
}

func (s *Server) serveTCP(ctx context.Context, ln net.Listener) {
	defer s.wg.Done()
	for {
		c, err := ln.Accept()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) && ctx.Err() == nil {
				s.log.Warn("dns tcp accept", "error", err)
			}
			return
		}
		s.track(c)
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer s.untrack(c)
			defer c.Close()
			s.serveConn(c)
		}()
	}
}

// serveConn answers length-prefixed queries on one TCP connection (RFC 1035 4.2.2)
// until the client closes it or it idles.
func (s *Server) serveConn(c net.Conn) {
	var size [2]byte
	buf := make([]byte, 65535)
	for {
		_ = c.SetReadDeadline(time.Now().Add(tcpIdle))
		if _, err := io.ReadFull(c, size[:]); err != nil {
			return
		}
		n := int(binary.BigEndian.Uint16(size[:]))
		if _, err := io.ReadFull(c, buf[:n]); err != nil {
			return
		}
		out, err := s.zone.Load().Answer(buf[:n], false)
		if err != nil {
			s.log.Debug("dns query dropped", "from", c.RemoteAddr().String(), "error", err)
			return
		}
		msg := binary.BigEndian.AppendUint16(make([]byte, 0, 2+len(out)), uint16(len(out)))
		if _, err := c.Write(append(msg, out...)); err != nil {
			return
		}
	}
}
