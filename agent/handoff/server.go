// The running agent's side: it offers its sockets to one successor at a time and
// is told once one serves.

package handoff

import (
	"context"
	"errors"
	"fmt"
	"github.com/ferrymesh/ferry/internal/listener"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// ServerConfig configures a Server.
type ServerConfig struct {
	// Path is the unix socket, in the agent's state folder (handoff.sock).
	Path string
	// Node is this agent's node: a successor for another node is refused.
	Node string
	// Offer returns the sockets to pass and a descriptor of each (copies, which the
	// server closes once sent).
	Offer func() ([]Socket, []*os.File, error)
	// Handed is called once a successor serves on them: the agent stops accepting
	// and drains. It is called at most once, before the successor hears "draining".
	Handed func(pid int)
	Log    *slog.Logger
	// HelloTimeout bounds the wait for a connected successor's hello, and
	// ServingTimeout the wait for its "serving" after the sockets were sent.
	HelloTimeout, ServingTimeout time.Duration
}

// Server is the running agent's end of the handoff socket.
type Server struct {
	cfg  ServerConfig
	ln   *net.UnixListener
	fi   os.FileInfo
	done chan struct{}

	mu     sync.Mutex
	handed bool
	closed bool
}

// NewServer validates cfg; nothing is opened until Start.
func NewServer(cfg ServerConfig) (*Server, error) {
	if cfg.Path == "" || cfg.Node == "" || cfg.Offer == nil || cfg.Handed == nil || cfg.Log == nil {
		return nil, errors.New("handoff server config: path, node, offer, handed and logger are required")
	}
	if cfg.HelloTimeout == 0 {
		cfg.HelloTimeout = 10 * time.Second
	}
	if cfg.ServingTimeout == 0 {
		cfg.ServingTimeout = 2 * time.Minute
	}
	return &Server{cfg: cfg}, nil
}

// Start listens on the socket (mode 0600), replacing one a previous agent left: the
// caller holds the node's lock, so no live agent answers there.
func (s *Server) Start(context.Context) error {
	p := s.cfg.Path
	if err := os.MkdirAll(filepath.Dir(p), 0o750); err != nil {
		return fmt.Errorf("handoff socket: %w", err)
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("handoff socket: %w", err)
	}
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: p, Net: "unixpacket"})
	if err != nil {
		return fmt.Errorf("handoff socket: %w", err)
	}
	ln.SetUnlinkOnClose(false) // the successor's socket may be at the path by then
	if err := os.Chmod(p, 0o600); err != nil {
		ln.Close()
		return fmt.Errorf("handoff socket: %w", err)
	}
	if s.fi, err = os.Lstat(p); err != nil {
		ln.Close()
		return fmt.Errorf("handoff socket: %w", err)
	}
	s.ln = ln
	s.done = make(chan struct{})
	go s.serve()
	return nil
}

// Stop closes the socket, removing its file while it is still this server's, and
// waits for an exchange in progress to end.
func (s *Server) Stop(context.Context) error {
	if s.ln == nil {
		return nil
	}
	s.closeListener()
	<-s.done
	return nil
}

func (s *Server) closeListener() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	s.closed = true
	s.ln.Close()
	if fi, err := os.Lstat(s.cfg.Path); err == nil && listener.SameFile(fi, s.fi) {
		os.Remove(s.cfg.Path)
	}
}

// serve handles successors one at a time until one serves or the socket closes.
func (s *Server) serve() {
	defer close(s.done)
	for {
		c, err := s.ln.AcceptUnix()
		if err != nil {
			return
		}
		handed, err := s.exchange(c)
		c.Close()
		if handed {
			return
		}
		if err != nil {
			s.cfg.Log.Warn("handoff to a new agent failed; this agent goes on serving", "error", err)
		}
	}
}

// exchange runs the protocol with one successor and says whether it took over.
func (s *Server) exchange(c *net.UnixConn) (bool, error) {
	c.SetDeadline(time.Now().Add(s.cfg.HelloTimeout))
	hello, files, err := recv(c)
	closeAll(files)
	if err != nil {
		return false, fmt.Errorf("hello: %w", err)
	}
	refuse := func(reason string) (bool, error) {
		_ = send(c, message{Version: Version, Op: OpRefused, PID: os.Getpid(), Reason: reason}, nil)
		return false, fmt.Errorf("refused pid %d: %s", hello.PID, reason)
	}
	switch {
	case hello.Op != OpHello:
		return refuse(fmt.Sprintf("expected %q, got %q", OpHello, hello.Op))
	case hello.Version != Version:
		return refuse(fmt.Sprintf("protocol version %d, this agent speaks %d", hello.Version, Version))
	case hello.Node != s.cfg.Node:
		return refuse(fmt.Sprintf("node %q, this agent is node %q", hello.Node, s.cfg.Node))
	}
	socks, fds, err := s.cfg.Offer()
	if err != nil {
		return refuse(fmt.Sprintf("listing sockets: %v", err))
	}
	defer closeAll(fds)
	s.cfg.Log.Info("handing the listeners over to a new agent", "pid", hello.PID, "sockets", len(socks))
	for i := 0; ; i += maxFDs {
		end := min(i+maxFDs, len(socks))
		m := message{Version: Version, Op: OpSockets, PID: os.Getpid(), Sockets: socks[i:end], Done: end == len(socks)}
		if err := send(c, m, fds[i:end]); err != nil {
			return false, fmt.Errorf("send sockets: %w", err)
		}
		if m.Done {
			break
		}
	}
	c.SetDeadline(time.Now().Add(s.cfg.ServingTimeout))
	m, files, err := recv(c)
	closeAll(files)
	if err != nil {
		return false, fmt.Errorf("wait for pid %d to serve: %w", hello.PID, err)
	}
	if m.Op != OpServing {
		return false, fmt.Errorf("pid %d: expected %q, got %q (%s)", hello.PID, OpServing, m.Op, m.Reason)
	}
	s.mu.Lock()
	s.handed = true
	s.mu.Unlock()
	s.closeListener() // one successor: the next one asks that one
	s.cfg.Handed(hello.PID)
	c.SetDeadline(time.Now().Add(s.cfg.HelloTimeout))
	if err := send(c, message{Version: Version, Op: OpDraining, PID: os.Getpid()}, nil); err != nil {
		s.cfg.Log.Warn("handoff: telling the new agent we drain", "error", err)
	}
	return true, nil
}

// Handed says whether a successor took over.
func (s *Server) Handed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.handed
}
