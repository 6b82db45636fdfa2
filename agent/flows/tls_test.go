package flows_test

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/agent/flows"
	"github.com/ferrymesh/ferry/agent/identity/identitytest"
	"github.com/ferrymesh/ferry/api/ferryv1"
	"github.com/ferrymesh/ferry/api/spiffe"
	"github.com/ferrymesh/ferry/internal/observertls"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
)

// files writes a certificate of ca for id, its key and ca's bundle to dir.
func files(t *testing.T, ca *identitytest.CA, id string) observertls.Files {
	t.Helper()
	dir := t.TempDir()
	c := ca.Valid(t, id)
	f := observertls.Files{Cert: filepath.Join(dir, "tls.crt"), Key: filepath.Join(dir, "tls.key"), CA: filepath.Join(dir, "ca.crt")}
	for p, b := range map[string][]byte{f.Cert: c.Chain, f.Key: c.Key, f.CA: ca.RootPEM} {
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return f
}

// The Observer API on TCP answers only a client proving a certificate of the mesh
// CA: no certificate, or one from another CA, or plaintext, gets nothing.
func TestObserverTCPIsMutualTLSOnly(t *testing.T) {
	mesh := identitytest.NewCA(t)
	srvTLS, err := observertls.ServerConfig(files(t, mesh, spiffe.ID("cluster.local", "ferry-system", "ferry-agent")))
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer(grpc.Creds(credentials.NewTLS(srvTLS)))
	flows.NewServer(flows.NewRing(16), "node1").Register(s)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve(ln)
	t.Cleanup(s.Stop)

	status := func(creds credentials.TransportCredentials) error {
		c, err := grpc.NewClient("passthrough:///"+ln.Addr().String(), grpc.WithTransportCredentials(creds))
		if err != nil {
			return err
		}
		defer c.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, err = ferryv1.NewObserverClient(c).ServerStatus(ctx, &ferryv1.ServerStatusRequest{})
		return err
	}
	relayID := spiffe.ID("cluster.local", "ferry-system", "ferry-operator")
	good, err := observertls.ClientConfig(files(t, mesh, relayID))
	if err != nil {
		t.Fatal(err)
	}
	if err := status(credentials.NewTLS(good)); err != nil {
		t.Fatalf("relay with a mesh certificate: %v", err)
	}
	other, err := observertls.ClientConfig(files(t, identitytest.NewCA(t), relayID))
	if err != nil {
		t.Fatal(err)
	}
	noCert := good.Clone()
	noCert.Certificates = nil
	for name, creds := range map[string]credentials.TransportCredentials{
		"plaintext":      insecure.NewCredentials(),
		"no certificate": credentials.NewTLS(noCert),
		"another CA's":   credentials.NewTLS(other),
	} {
		if err := status(creds); err == nil {
			t.Errorf("%s client read the Observer API", name)
		}
	}
	if _, err := observertls.ServerConfig(observertls.Files{}); err == nil {
		t.Error("ServerTLS without files")
	}
}
