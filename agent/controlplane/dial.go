// Package controlplane is the agent's side of the operator's gRPC services: the
// state stream (kept through operator outages, reconnected with jittered backoff)
// and the certificate manager (keys made on the node, CSRs, renewal at half life).
package controlplane

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
)

// maxReconnectDelay bounds the wait between attempts to reach the operator, so a
// returned operator is found within seconds however long it was away.
const maxReconnectDelay = 2 * time.Second

// DialConfig says how to reach and authenticate to the operator.
type DialConfig struct {
	// Addr is host:port, or unix:///path for a socket (local mode).
	Addr string
	// CAFile is the PEM bundle that verifies the operator's serving certificate.
	CAFile string
	// TokenFile holds the bearer token: a projected service-account token with
	// audience ferry-operator, or a local mode node token. It is read again for
	// every call, since the kubelet rotates projected tokens.
	TokenFile string
	// ServerName is the name checked in the operator's certificate; default the
	// host of Addr, or "localhost" for a unix socket.
	ServerName string
}

// Dial returns a client connection to the operator; it connects lazily and
// reconnects by itself.
func Dial(cfg DialConfig) (*grpc.ClientConn, error) {
	if cfg.Addr == "" || cfg.CAFile == "" || cfg.TokenFile == "" {
		return nil, errors.New("operator connection: address, CA file and token file are required")
	}
	pemData, err := os.ReadFile(cfg.CAFile)
	if err != nil {
		return nil, fmt.Errorf("operator ca: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pemData) {
		return nil, fmt.Errorf("operator ca %s: no certificate", cfg.CAFile)
	}
	if _, err := readToken(cfg.TokenFile); err != nil {
		return nil, err
	}
	target, serverName := cfg.Addr, cfg.ServerName
	if strings.HasPrefix(cfg.Addr, "unix://") {
		if serverName == "" {
			serverName = "localhost"
		}
	} else {
		host, _, err := net.SplitHostPort(cfg.Addr)
		if err != nil {
			return nil, fmt.Errorf("operator address %q: %w", cfg.Addr, err)
		}
		if serverName == "" {
			serverName = host
		}
		target = "dns:///" + cfg.Addr
	}
	conn, err := grpc.NewClient(target,
		grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{MinVersion: tls.VersionTLS13, RootCAs: roots, ServerName: serverName})),
		grpc.WithPerRPCCredentials(tokenCreds{path: cfg.TokenFile}),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 20 * time.Second, Timeout: 10 * time.Second, PermitWithoutStream: true}),
		// gRPC's default reconnect backoff grows to 120 s: after a long outage the
		// agent would find a returned operator up to two minutes late, longer than
		// a short certificate has left. Calls fail fast while the channel is down
		// and do not hasten it, so the channel itself must retry often.
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.Config{BaseDelay: 200 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: maxReconnectDelay}, MinConnectTimeout: 5 * time.Second}),
		// A NodeState lists every workload of the mesh: about 200 bytes each, so
		// gRPC's 4 MiB default would stop at some 20,000 pods.
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(256<<20)),
	)
	if err != nil {
		return nil, fmt.Errorf("operator connection: %w", err)
	}
	return conn, nil
}

// tokenCreds sends the token file's content as a bearer token.
type tokenCreds struct{ path string }

func (t tokenCreds) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	tok, err := readToken(t.path)
	if err != nil {
		return nil, err
	}
	return map[string]string{"authorization": "Bearer " + tok}, nil
}

func (tokenCreds) RequireTransportSecurity() bool { return true }

func readToken(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("token: %w", err)
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" {
		return "", fmt.Errorf("token file %s is empty", path)
	}
	return tok, nil
}
