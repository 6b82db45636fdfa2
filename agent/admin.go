package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"time"

	"github.com/ferrymesh/ferry/agent/proxy"
)

// Status is what GET /status on the admin API returns.
type Status struct {
	Node          string        `json:"node"`
	StateVersion  uint64        `json:"state_version"`
	StateAge      string        `json:"state_age"`
	Goroutines    int           `json:"goroutines"`
	OpenFDs       int           `json:"open_fds"`
	LiveConns     int           `json:"live_connections"`
	TunnelConns   int           `json:"tunnel_connections"`
	TunnelStreams int           `json:"tunnel_streams"`
	FastPath      bool          `json:"fast_path"`
	Pods          []StatusPod   `json:"pods"`
	Uptime        time.Duration `json:"uptime_ns"`
}

// StatusPod is one enrolled pod in Status.
type StatusPod struct {
	Name        string `json:"name"`
	IP          string `json:"ip"`
	Identity    string `json:"identity"`
	NetnsCookie uint64 `json:"netns_cookie"`
}

// Connections is what GET /connections on the admin API returns.
type Connections struct {
	Live  []proxy.Conn `json:"live"`
	Ended []proxy.Conn `json:"ended"`
}

// adminServer serves the agent's admin API on a unix socket, which pods cannot
// reach: only processes on the node with access to the socket file can.
type adminServer struct {
	path    string
	a       *Agent
	log     *slog.Logger
	srv     *http.Server
	started time.Time
	done    chan struct{}
}

func newAdminServer(path string, a *Agent, log *slog.Logger) *adminServer {
	s := &adminServer{path: path, a: a, log: log}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /status", s.status)
	mux.HandleFunc("GET /connections", s.connections)
	mux.HandleFunc("GET /debug/pprof/", pprof.Index)
	s.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second, IdleTimeout: 30 * time.Second}
	return s
}

func (s *adminServer) Start() error {
	if err := os.MkdirAll(filepath.Dir(s.path), 0o750); err != nil {
		return fmt.Errorf("admin socket dir: %w", err)
	}
	os.Remove(s.path) // a socket file left by a killed agent
	ln, err := net.Listen("unix", s.path)
	if err != nil {
		return fmt.Errorf("admin socket: %w", err)
	}
	if err := os.Chmod(s.path, 0o600); err != nil {
		ln.Close()
		return fmt.Errorf("admin socket: %w", err)
	}
	s.started = time.Now()
	s.done = make(chan struct{})
	go func() {
		defer close(s.done)
		if err := s.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("admin API stopped", "error", err)
		}
	}()
	return nil
}

func (s *adminServer) Stop() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	s.srv.Shutdown(ctx)
	if s.done != nil {
		<-s.done
	}
	os.Remove(s.path)
}

func (s *adminServer) status(w http.ResponseWriter, _ *http.Request) {
	a := s.a
	live, _ := a.proxy.Connections()
	ts := a.proxy.TunnelStats()
	st := Status{
		Node:          a.cfg.Node,
		Goroutines:    runtime.NumGoroutine(),
		OpenFDs:       countFDs(),
		LiveConns:     len(live),
		TunnelConns:   ts.Conns,
		TunnelStreams: ts.Streams,
		FastPath:      a.cfg.Datapath.FastPath,
		Uptime:        time.Since(s.started),
	}
	a.mu.Lock()
	st.StateVersion = a.state.GetVersion()
	st.StateAge = time.Since(a.applied).Round(time.Millisecond).String()
	for _, p := range a.enrolled {
		st.Pods = append(st.Pods, StatusPod{Name: p.w.Name, IP: p.w.IPs[0].String(), Identity: p.w.Identity, NetnsCookie: p.cookie})
	}
	a.mu.Unlock()
	sort.Slice(st.Pods, func(i, j int) bool { return st.Pods[i].Name < st.Pods[j].Name })
	writeJSON(w, st)
}

func (s *adminServer) connections(w http.ResponseWriter, _ *http.Request) {
	live, ended := s.a.proxy.Connections()
	writeJSON(w, Connections{Live: live, Ended: ended})
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

func countFDs() int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return -1
	}
	return len(ents)
}

// AdminClient talks to an agent's admin API over its unix socket.
type AdminClient struct{ hc *http.Client }

// NewAdminClient returns a client for the admin API at socket.
func NewAdminClient(socket string) *AdminClient {
	return &AdminClient{hc: &http.Client{
		Timeout: 5 * time.Second,
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", socket)
			},
			// A unix socket is cheap to dial, and an idle kept-alive connection would
			// hold a goroutine and a file in the agent per client ever made.
			DisableKeepAlives: true,
		},
	}}
}

// Status fetches the agent's status.
func (c *AdminClient) Status(ctx context.Context) (Status, error) {
	var st Status
	return st, c.get(ctx, "/status", &st)
}

// Connections fetches the agent's live and recently ended connections.
func (c *AdminClient) Connections(ctx context.Context) (Connections, error) {
	var cs Connections
	return cs, c.get(ctx, "/connections", &cs)
}

func (c *AdminClient) get(ctx context.Context, path string, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://agent"+path, nil)
	if err != nil {
		return err
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return fmt.Errorf("agent admin API: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("agent admin API %s: %s", path, resp.Status)
	}
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		return fmt.Errorf("agent admin API %s: %w", path, err)
	}
	return nil
}
