// Package adminserver serves the agent's admin API (the documents of api/admin) on a
// unix socket, which pods cannot reach: only processes on the node with access to
// the socket file can. It reads the agent through Source, never its internals.
package adminserver

import (
	"cmp"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"net/http/pprof"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"time"

	"github.com/ferrymesh/ferry/api/admin"
	"github.com/ferrymesh/ferry/api/ferryv1"
	"github.com/ferrymesh/ferry/internal/listener"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

// Source is what the admin API reads from the agent. Every method returns values
// the server may keep and the agent no longer changes.
type Source interface {
	// Snapshot is the agent's state now.
	Snapshot() Snapshot
	// Connections are the live proxied connections and the most recent ended ones.
	Connections() (live, ended []admin.Conn)
	// Certificate is the certificate the agent holds for a SPIFFE ID.
	Certificate(identity string) (*tls.Certificate, error)
	// Explain says what the agent would do with a connection or request; an
	// *admin.ExplainError when it names no pod or Service the agent knows.
	Explain(q admin.ExplainQuery) (admin.Explain, error)
}

// Snapshot is a copy of what the agent knows, taken at once.
type Snapshot struct {
	// State is the applied state (nil before the first), shared read-only: the agent
	// replaces its state whole and never changes one it applied. Applied is when.
	State   *ferryv1.NodeState
	Applied time.Time
	// Enrolled are the pods the agent captures now, by pod UID.
	Enrolled map[string]admin.StatusPod
	// Failing says, by pod UID, why a pod of this node is not enrolled yet.
	Failing map[string]string
	// TunnelConns and TunnelStreams count the tunnels open to other nodes.
	TunnelConns, TunnelStreams int
	// Held are the certificates held from the operator (operator mode only).
	Held []admin.HeldCert
	// Dropped are the entries of the applied state left out as malformed.
	Dropped []string
	// Config is how the agent runs; the fields that come from the state are filled
	// by the server.
	Config admin.AgentConfig
}

// Config configures a Server.
type Config struct {
	// Socket is the unix socket to serve on.
	Socket string
	// Metrics, optional, serves GET /metrics.
	Metrics http.Handler
}

// Server serves the admin API.
type Server struct {
	cfg     Config
	src     Source
	log     *slog.Logger
	srv     *http.Server
	started time.Time
	done    chan struct{}
}

// New returns a server for src on cfg.Socket; nothing is served until Start.
func New(cfg Config, src Source, log *slog.Logger) (*Server, error) {
	if cfg.Socket == "" || src == nil || log == nil {
		return nil, errors.New("admin server config: socket, source and logger are required")
	}
	s := &Server{cfg: cfg, src: src, log: log}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /status", s.status)
	mux.HandleFunc("GET /connections", s.connections)
	mux.HandleFunc("GET /workloads", s.workloads)
	mux.HandleFunc("GET /certs", s.certs)
	mux.HandleFunc("GET /config", s.config)
	mux.HandleFunc("GET /state", s.stateJSON)
	mux.HandleFunc("GET /explain", s.explain)
	mux.HandleFunc("GET /debug/pprof/", pprof.Index)
	// CPU profiles and traces are not named profiles: Index does not serve them.
	mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
	if cfg.Metrics != nil {
		mux.Handle("GET /metrics", cfg.Metrics)
	}
	s.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second, IdleTimeout: 30 * time.Second}
	return s, nil
}

// Start listens on the socket (mode 0600) and serves until Stop.
func (s *Server) Start(ctx context.Context) error {
	p := s.cfg.Socket
	// 0700: the folder holds the agent's sockets and its state cache (keys).
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return fmt.Errorf("admin socket dir: %w", err)
	}
	// A socket file left by a killed agent, or a previous agent's while it hands
	// over, is replaced; closing removes it only while it is still this one.
	ln, err := listener.Unix(ctx, p)
	if err != nil {
		return fmt.Errorf("admin socket: %w", err)
	}
	if err := os.Chmod(p, 0o600); err != nil {
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

// Stop stops serving, waiting until ctx ends for requests in progress, and removes
// the socket.
func (s *Server) Stop(ctx context.Context) error {
	err := s.srv.Shutdown(ctx)
	if err != nil {
		s.srv.Close()
		err = fmt.Errorf("admin server: %w", err)
	}
	if s.done != nil {
		<-s.done
	}
	return err
}

// stateAge is the version and age of the applied state.
func stateAge(sn Snapshot) (uint64, string) {
	if sn.State == nil {
		return 0, "never"
	}
	return sn.State.GetVersion(), time.Since(sn.Applied).Round(time.Millisecond).String()
}

func (s *Server) status(w http.ResponseWriter, _ *http.Request) {
	sn := s.src.Snapshot()
	live, _ := s.src.Connections()
	st := admin.Status{
		Node:          sn.Config.Node,
		Goroutines:    runtime.NumGoroutine(),
		OpenFDs:       countFDs(),
		LiveConns:     len(live),
		TunnelConns:   sn.TunnelConns,
		TunnelStreams: sn.TunnelStreams,
		FastPath:      sn.Config.FastPath,
		Uptime:        time.Since(s.started),
		Certificates:  sn.Held,
		Dropped:       sn.Dropped,
	}
	st.StateVersion = sn.State.GetVersion()
	st.StateAge = time.Since(sn.Applied).Round(time.Millisecond).String()
	for _, p := range sn.Enrolled {
		st.Pods = append(st.Pods, p)
	}
	sort.Slice(st.Pods, func(i, j int) bool { return st.Pods[i].Name < st.Pods[j].Name })
	writeJSON(w, st)
}

func (s *Server) connections(w http.ResponseWriter, _ *http.Request) {
	live, ended := s.src.Connections()
	writeJSON(w, admin.Connections{Live: live, Ended: ended})
}

func (s *Server) workloads(w http.ResponseWriter, _ *http.Request) {
	sn := s.src.Snapshot()
	out := admin.Workloads{}
	out.StateVersion, out.StateAge = stateAge(sn)
	for _, wl := range sn.State.GetWorkloads() {
		p, ok := sn.Enrolled[wl.GetUid()]
		out.Workloads = append(out.Workloads, admin.Workload{
			Name: wl.GetName(), Namespace: wl.GetNamespace(), Node: wl.GetNode(), IPs: wl.GetIps(), Identity: wl.GetIdentity(),
			MTLS: mtlsText(wl), Local: wl.GetNode() == sn.Config.Node, Enrolled: ok, NetnsCookie: p.NetnsCookie, Error: sn.Failing[wl.GetUid()],
		})
	}
	sort.Slice(out.Workloads, func(i, j int) bool {
		x, y := out.Workloads[i], out.Workloads[j]
		return x.Namespace+"/"+x.Name < y.Namespace+"/"+y.Name
	})
	writeJSON(w, out)
}

// mtlsText is a workload's mTLS mode as `ferry agent workloads` shows it.
func mtlsText(wl *ferryv1.Workload) string {
	out := cmp.Or(wl.GetMtlsMode(), "Permissive")
	ports := slices.Sorted(maps.Keys(wl.GetPortMtlsModes()))
	for _, p := range ports {
		out += fmt.Sprintf(", %d %s", p, wl.GetPortMtlsModes()[p])
	}
	return out
}

func (s *Server) certs(w http.ResponseWriter, _ *http.Request) {
	sn := s.src.Snapshot()
	out := admin.Certs{}
	out.StateVersion, out.StateAge = stateAge(sn)
	ids := map[string]bool{}
	for _, wl := range sn.State.GetWorkloads() {
		if wl.GetNode() == sn.Config.Node {
			ids[wl.GetIdentity()] = true
		}
	}
	for id := range ids {
		ci := admin.CertInfo{Identity: id}
		c, err := s.src.Certificate(id)
		switch {
		case err != nil:
			ci.Error = err.Error()
		case c.Leaf == nil:
			ci.Error = "certificate not parsed"
		default:
			ci.Serial, ci.Issuer = c.Leaf.SerialNumber.Text(16), c.Leaf.Issuer.String()
			ci.NotBefore, ci.NotAfter = c.Leaf.NotBefore, c.Leaf.NotAfter
		}
		out.Workloads = append(out.Workloads, ci)
	}
	sort.Slice(out.Workloads, func(i, j int) bool { return out.Workloads[i].Identity < out.Workloads[j].Identity })
	bundle := sn.State.GetTrustBundlePem()
	for len(bundle) > 0 {
		var blk *pem.Block
		blk, bundle = pem.Decode(bundle)
		if blk == nil {
			break
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			out.TrustBundle = append(out.TrustBundle, admin.CertInfo{Error: err.Error()})
			continue
		}
		out.TrustBundle = append(out.TrustBundle, admin.CertInfo{Identity: c.Subject.String(), Serial: c.SerialNumber.Text(16),
			Issuer: c.Issuer.String(), NotBefore: c.NotBefore, NotAfter: c.NotAfter})
	}
	writeJSON(w, out)
}

func (s *Server) config(w http.ResponseWriter, _ *http.Request) {
	sn := s.src.Snapshot()
	out := sn.Config
	out.TrustDomain, out.ExcludedPorts = sn.State.GetTrustDomain(), sn.State.GetMesh().GetExcludedPorts()
	out.StateVersion, out.StateAge = stateAge(sn)
	writeJSON(w, out)
}

// stateJSON serves the applied NodeState as protobuf JSON, without private keys.
func (s *Server) stateJSON(w http.ResponseWriter, _ *http.Request) {
	st := &ferryv1.NodeState{}
	if applied := s.src.Snapshot().State; applied != nil {
		st = proto.Clone(applied).(*ferryv1.NodeState)
	}
	for _, c := range st.GetCertificates() {
		c.PrivateKeyPem = nil
	}
	b, err := protojson.MarshalOptions{Multiline: true}.Marshal(st)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Write(b)
}

// explain answers GET /explain?src=&dst=[&method=&path=]: 400 for a question
// without its parts, 404 for a pod or Service the agent does not know.
func (s *Server) explain(w http.ResponseWriter, r *http.Request) {
	v := r.URL.Query()
	q := admin.ExplainQuery{Src: v.Get("src"), Dst: v.Get("dst"), Method: v.Get("method"), Path: v.Get("path"), Request: v.Get("request") == "1"}
	if q.Src == "" || q.Dst == "" {
		http.Error(w, "explain needs src (a pod or IP) and dst (host:port)", http.StatusBadRequest)
		return
	}
	ex, err := s.src.Explain(q)
	var ee *admin.ExplainError
	switch {
	case errors.As(err, &ee):
		http.Error(w, ee.Why, http.StatusNotFound)
		return
	case err != nil:
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	writeJSON(w, ex)
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
