// Package server is the operator's gRPC side: the Discovery stream that gives each
// agent its NodeState, and the Certificates service that signs workload
// certificates for pods on the caller's node.
package server

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"github.com/ferrymesh/ferry/api/spiffe"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/ferrymesh/ferry/api/ferryv1"
	"github.com/ferrymesh/ferry/operator/mesh"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// Authenticator maps an agent's bearer token to its node.
type Authenticator interface {
	Authenticate(ctx context.Context, token string) (node string, err error)
}

// Snapshots is the mesh view the streams read.
type Snapshots interface {
	Current() (*mesh.Snapshot, <-chan struct{})
	HasPod(node, namespace, serviceAccount string) bool
}

// Signer is the CA.
type Signer interface {
	Sign(id string, pub crypto.PublicKey, ttl time.Duration) ([]byte, error)
	RootPEM() []byte
	TrustDomain() string
}

// Config configures a Server.
type Config struct {
	Auth    Authenticator
	View    Snapshots
	CA      Signer
	CertTTL time.Duration
	// Mesh is the MeshConfig every state carries (shared, never changed); nil is
	// the defaults.
	Mesh *ferryv1.MeshConfig
	// Metrics registers the server's metrics; nil registers none.
	Metrics prometheus.Registerer
	Log     *slog.Logger
}

// Server implements ferryv1.DiscoveryServer and ferryv1.CertificatesServer.
type Server struct {
	ferryv1.UnimplementedDiscoveryServer
	ferryv1.UnimplementedCertificatesServer

	cfg Config
	log *slog.Logger

	streams  prometheus.Gauge
	pushes   prometheus.Counter
	acks     *prometheus.CounterVec
	signs    *prometheus.CounterVec
	mu       sync.Mutex
	nodeAcks map[string]uint64 // node -> last acknowledged version
	deltas   deltas
	full     chan struct{} // fullSends tokens
}

// New validates cfg.
func New(cfg Config) (*Server, error) {
	if cfg.Auth == nil || cfg.View == nil || cfg.CA == nil {
		return nil, errors.New("server config: auth, view and ca are required")
	}
	if cfg.CertTTL <= 0 {
		return nil, errors.New("server config: certificate ttl must be positive")
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	s := &Server{
		cfg:      cfg,
		log:      cfg.Log,
		nodeAcks: map[string]uint64{},
		full:     make(chan struct{}, fullSends),
		streams:  prometheus.NewGauge(prometheus.GaugeOpts{Name: "ferry_operator_streams", Help: "Agents connected to the state stream."}),
		pushes:   prometheus.NewCounter(prometheus.CounterOpts{Name: "ferry_operator_state_pushes_total", Help: "NodeStates sent to agents."}),
		acks:     prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ferry_operator_state_responses_total", Help: "Agent responses to NodeStates, by result (ack or nack)."}, []string{"result"}),
		signs:    prometheus.NewCounterVec(prometheus.CounterOpts{Name: "ferry_operator_certificates_total", Help: "Certificate requests, by result (signed or refused)."}, []string{"result"}),
	}
	if cfg.Metrics != nil {
		for _, c := range []prometheus.Collector{s.streams, s.pushes, s.acks, s.signs} {
			if err := cfg.Metrics.Register(c); err != nil {
				return nil, fmt.Errorf("server metrics: %w", err)
			}
		}
	}
	return s, nil
}

// Register adds both services to g.
func (s *Server) Register(g *grpc.Server) {
	ferryv1.RegisterDiscoveryServer(g, s)
	ferryv1.RegisterCertificatesServer(g, s)
}

// authenticate returns the caller's node from its bearer token.
func (s *Server) authenticate(ctx context.Context) (string, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	vals := md.Get("authorization")
	if len(vals) != 1 {
		return "", status.Error(codes.Unauthenticated, "missing authorization: Bearer <service-account token>")
	}
	token, ok := strings.CutPrefix(vals[0], "Bearer ")
	if !ok || token == "" {
		return "", status.Error(codes.Unauthenticated, "authorization is not a bearer token")
	}
	node, err := s.cfg.Auth.Authenticate(ctx, token)
	if err != nil {
		if errors.Is(err, ErrUnauthenticated) {
			return "", status.Error(codes.Unauthenticated, err.Error())
		}
		return "", status.Error(codes.Unavailable, err.Error())
	}
	return node, nil
}

// StreamState sends the node's state, then a new one on every change (only what
// changed, to an agent that accepts deltas), and reads the agent's ACKs and NACKs.
func (s *Server) StreamState(stream grpc.BidiStreamingServer[ferryv1.StateRequest, ferryv1.NodeState]) error {
	ctx := stream.Context()
	node, err := s.authenticate(ctx)
	if err != nil {
		return err
	}
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	if first.GetNode() != node {
		return status.Errorf(codes.PermissionDenied, "stream for node %q with a token of node %q", first.GetNode(), node)
	}
	log := s.log.With("node", node)
	log.Info("agent connected", "version_ack", first.GetVersionAck())
	s.streams.Inc()
	defer s.streams.Dec()
	defer log.Info("agent disconnected")

	recvErr := make(chan error, 1)
	go func() {
		for {
			req, err := stream.Recv()
			if err != nil {
				recvErr <- err
				return
			}
			s.response(log, node, req)
		}
	}()

	// With deltas, every state after the first carries only the workloads and
	// services that changed since the last one this stream sent.
	deltas := first.GetAcceptDeltas()
	var sent *mesh.Snapshot
	for {
		snap, changed := s.cfg.View.Current()
		if snap != nil && (sent == nil || snap.Version != sent.Version) {
			st := s.nodeState(node, snap)
			if deltas && sent != nil {
				d := s.deltas.get(sent, snap)
				st.Delta, st.BaseVersion = true, sent.Version
				st.Workloads, st.Services = d.workloads, d.services
				st.RemovedWorkloads, st.RemovedServices = d.removedWorkloads, d.removedServices
			}
			if err := s.send(ctx, stream, st); err != nil {
				return err
			}
			s.pushes.Inc()
			sent = snap
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case err := <-recvErr:
			if status.Code(err) == codes.Canceled {
				return nil
			}
			return err
		case <-changed:
		}
	}
}

// fullSends bounds how many full states are being encoded and written at once:
// each is the whole mesh (2.4 MiB at 10,000 pods), and 100 agents connecting
// together otherwise hold 100 encodings at once.
const fullSends = 8

func (s *Server) send(ctx context.Context, stream grpc.ServerStream, st *ferryv1.NodeState) error {
	if !st.GetDelta() {
		select {
		case s.full <- struct{}{}:
			defer func() { <-s.full }()
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return stream.SendMsg(st)
}

func (s *Server) response(log *slog.Logger, node string, req *ferryv1.StateRequest) {
	if req.GetError() != "" {
		s.acks.WithLabelValues("nack").Inc()
		log.Warn("agent rejected state", "version", req.GetResponseTo(), "version_applied", req.GetVersionAck(), "error", req.GetError())
		return
	}
	s.acks.WithLabelValues("ack").Inc()
	s.mu.Lock()
	s.nodeAcks[node] = req.GetVersionAck()
	s.mu.Unlock()
	log.Debug("agent applied state", "version", req.GetVersionAck())
}

// Acked returns the last version each node acknowledged.
func (s *Server) Acked() map[string]uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string]uint64, len(s.nodeAcks))
	for k, v := range s.nodeAcks {
		out[k] = v
	}
	return out
}

func (s *Server) nodeState(node string, snap *mesh.Snapshot) *ferryv1.NodeState {
	return &ferryv1.NodeState{
		Version:        snap.Version,
		Node:           node,
		TrustDomain:    s.cfg.CA.TrustDomain(),
		TrustBundlePem: s.cfg.CA.RootPEM(),
		Workloads:      snap.Workloads,
		Services:       snap.Services,
		ConfigStatus:   snap.ConfigStatus,
		Authorization:  snap.Authorization,
		Mesh:           s.mesh(),
	}
}

func (s *Server) mesh() *ferryv1.MeshConfig {
	if s.cfg.Mesh == nil {
		return &ferryv1.MeshConfig{}
	}
	return s.cfg.Mesh
}

// Sign issues a certificate for a service account that has a pod on the caller's
// node, over the public key of the caller's CSR.
func (s *Server) Sign(ctx context.Context, req *ferryv1.SignRequest) (*ferryv1.SignResponse, error) {
	resp, err := s.sign(ctx, req)
	if err != nil {
		s.signs.WithLabelValues("refused").Inc()
		s.log.Warn("certificate refused", "identity", req.GetIdentity(), "error", err)
		return nil, err
	}
	s.signs.WithLabelValues("signed").Inc()
	return resp, nil
}

func (s *Server) sign(ctx context.Context, req *ferryv1.SignRequest) (*ferryv1.SignResponse, error) {
	node, err := s.authenticate(ctx)
	if err != nil {
		return nil, err
	}
	ns, sa, err := parseID(req.GetIdentity(), s.cfg.CA.TrustDomain())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if !s.cfg.View.HasPod(node, ns, sa) {
		return nil, status.Errorf(codes.PermissionDenied, "node %s runs no pod of service account %s/%s", node, ns, sa)
	}
	pub, err := csrKey(req.GetCsrPem())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	chain, err := s.cfg.CA.Sign(req.GetIdentity(), pub, s.cfg.CertTTL)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	s.log.Debug("certificate signed", "node", node, "identity", req.GetIdentity())
	return &ferryv1.SignResponse{CertChainPem: chain, TrustBundlePem: s.cfg.CA.RootPEM()}, nil
}

// csrKey checks the CSR's self-signature and returns its ECDSA P-256 key. Nothing
// else in the CSR is used: the certificate's only name is the requested identity.
func csrKey(csrPEM []byte) (crypto.PublicKey, error) {
	block, _ := pem.Decode(csrPEM)
	if block == nil || block.Type != "CERTIFICATE REQUEST" {
		return nil, errors.New("csr: no CERTIFICATE REQUEST block")
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("csr: %w", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("csr: %w", err)
	}
	k, ok := csr.PublicKey.(*ecdsa.PublicKey)
	if !ok || k.Curve != elliptic.P256() {
		return nil, errors.New("csr: key must be ECDSA P-256")
	}
	return k, nil
}

func parseID(id, trustDomain string) (ns, sa string, err error) {
	td, ns, sa, err := spiffe.Parse(id)
	if err != nil {
		return "", "", err
	}
	if td != trustDomain {
		return "", "", fmt.Errorf("identity %q: not in trust domain %s", id, trustDomain)
	}
	return ns, sa, nil
}
