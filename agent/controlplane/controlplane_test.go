package controlplane

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"log/slog"
	"math/big"
	"net"
	"net/url"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/agent/identity"
	"github.com/ferrymesh/ferry/api/ferryv1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// fakeOperator signs CSRs with a test CA and streams whatever states it is given.
type fakeOperator struct {
	ferryv1.UnimplementedCertificatesServer
	ferryv1.UnimplementedDiscoveryServer

	caCert  *x509.Certificate
	caKey   *ecdsa.PrivateKey
	rootPEM []byte
	ttl     time.Duration
	failN   atomic.Int32 // refuse this many Sign calls first
	signs   atomic.Int32

	states    chan *ferryv1.NodeState
	responses chan *ferryv1.StateRequest
	endStream chan struct{}
}

func newFakeOperator(t *testing.T, ttl time.Duration) (*fakeOperator, *grpc.ClientConn) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true, IsCA: true}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	f := &fakeOperator{caCert: cert, caKey: key, rootPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), ttl: ttl,
		states: make(chan *ferryv1.NodeState, 8), responses: make(chan *ferryv1.StateRequest, 8), endStream: make(chan struct{}, 1)}
	sock := filepath.Join(t.TempDir(), "op.sock")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	ferryv1.RegisterCertificatesServer(g, f)
	ferryv1.RegisterDiscoveryServer(g, f)
	go g.Serve(lis)
	t.Cleanup(g.Stop)
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return f, conn
}

func (f *fakeOperator) Sign(_ context.Context, req *ferryv1.SignRequest) (*ferryv1.SignResponse, error) {
	if f.failN.Add(-1) >= 0 {
		return nil, status.Error(codes.Unavailable, "not now")
	}
	f.signs.Add(1)
	block, _ := pem.Decode(req.GetCsrPem())
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, err
	}
	u, _ := url.Parse(req.GetIdentity())
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{SerialNumber: serial, NotBefore: time.Now().Add(-5 * time.Minute), NotAfter: time.Now().Add(f.ttl),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}, URIs: []*url.URL{u}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, f.caCert, csr.PublicKey, f.caKey)
	if err != nil {
		return nil, err
	}
	return &ferryv1.SignResponse{CertChainPem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), TrustBundlePem: f.rootPEM}, nil
}

func (f *fakeOperator) StreamState(s grpc.BidiStreamingServer[ferryv1.StateRequest, ferryv1.NodeState]) error {
	first, err := s.Recv()
	if err != nil {
		return err
	}
	f.responses <- first
	go func() {
		for {
			r, err := s.Recv()
			if err != nil {
				return
			}
			f.responses <- r
		}
	}()
	for {
		select {
		case st := <-f.states:
			if err := s.Send(st); err != nil {
				return err
			}
		case <-f.endStream:
			return status.Error(codes.Unavailable, "operator going away")
		case <-s.Context().Done():
			return nil
		}
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

const web = "spiffe://cluster.local/ns/shop/sa/web"

// A certificate is requested for a wanted identity, retried after refusals, renewed
// at half life (from issue time, not the backdated NotBefore), and dropped when the
// identity is no longer wanted.
func TestCertsIssueRetryRenewDrop(t *testing.T) {
	f, conn := newFakeOperator(t, 4*time.Second)
	f.failN.Store(2)
	store := identity.NewStore()
	var changes atomic.Int32
	c := NewCerts(conn, store, func() { changes.Add(1) }, slog.New(slog.DiscardHandler))
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); c.Run(ctx) }()
	defer func() { cancel(); wg.Wait() }()

	if err := c.Want(f.rootPEM, []string{web}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a certificate after two refusals", func() bool { _, err := store.Certificate(web); return err == nil })
	first := c.Held()[0]
	// NotAfter has whole seconds: the lifetime is between 3 and 4 seconds.
	if d := first.RenewAt.Sub(first.Issued); d < 1400*time.Millisecond || d > 2100*time.Millisecond {
		t.Fatalf("renewal %v after issue, want half of the 4s lifetime", d)
	}
	waitFor(t, "renewal", func() bool { h := c.Held(); return len(h) == 1 && h[0].Serial != first.Serial })
	if changes.Load() < 2 {
		t.Fatalf("onChange ran %d times, want one per certificate", changes.Load())
	}
	if err := c.Want(f.rootPEM, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := store.Certificate(web); err == nil || len(c.Held()) != 0 {
		t.Fatal("certificate kept after the identity was dropped")
	}
}

// The stream acknowledges applied states, rejects bad ones with a NACK naming the
// version, and after the operator goes away reconnects and marks the next state
// fresh.
func TestStreamAckNackReconnect(t *testing.T) {
	f, conn := newFakeOperator(t, time.Hour)
	type applied struct {
		version uint64
		fresh   bool
	}
	got := make(chan applied, 8)
	apply := func(st *ferryv1.NodeState, fresh bool) error {
		if st.GetVersion() == 2 {
			return errors.New("bad state")
		}
		got <- applied{st.GetVersion(), fresh}
		return nil
	}
	s := NewStream(conn, "node1", apply, slog.New(slog.DiscardHandler))
	s.MinBackoff, s.MaxBackoff = 10*time.Millisecond, 50*time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); s.Run(ctx) }()
	defer func() { cancel(); wg.Wait() }()

	if r := <-f.responses; r.GetNode() != "node1" || r.GetVersionAck() != 0 {
		t.Fatalf("first request %v", r)
	}
	f.states <- &ferryv1.NodeState{Version: 1, Node: "node1"}
	if a := <-got; a != (applied{1, true}) {
		t.Fatalf("applied %+v", a)
	}
	if r := <-f.responses; r.GetVersionAck() != 1 || r.GetResponseTo() != 1 || r.GetError() != "" {
		t.Fatalf("ack %v", r)
	}
	f.states <- &ferryv1.NodeState{Version: 2, Node: "node1"}
	if r := <-f.responses; r.GetVersionAck() != 1 || r.GetResponseTo() != 2 || r.GetError() == "" {
		t.Fatalf("nack %v", r)
	}
	f.endStream <- struct{}{}
	if r := <-f.responses; r.GetVersionAck() != 1 {
		t.Fatalf("reconnect request %v, want the last applied version 1", r)
	}
	f.states <- &ferryv1.NodeState{Version: 1, Node: "node1"}
	if a := <-got; a != (applied{1, true}) {
		t.Fatalf("after reconnect applied %+v, want fresh", a)
	}
}

// A new trust bundle that the held certificates do not chain to (another CA) drops
// them, and new ones are requested.
func TestCertsNewBundleReplacesCertificates(t *testing.T) {
	f, conn := newFakeOperator(t, time.Hour)
	store := identity.NewStore()
	c := NewCerts(conn, store, nil, slog.New(slog.DiscardHandler))
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); c.Run(ctx) }()
	defer func() { cancel(); wg.Wait() }()
	if err := c.Want(f.rootPEM, []string{web}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a certificate", func() bool { return len(c.Held()) == 1 })
	first := c.Held()[0].Serial
	other, _ := newFakeOperator(t, time.Hour)
	// The operator now says: trust the other CA (and the old one, during the move).
	if err := c.Want(append(append([]byte{}, f.rootPEM...), other.rootPEM...), []string{web}); err != nil {
		t.Fatal(err)
	}
	if c.Held()[0].Serial != first {
		t.Fatal("a certificate that still chains to the bundle was replaced")
	}
	if err := c.Want(other.rootPEM, []string{web}); err != nil {
		t.Fatal(err)
	}
	for _, h := range c.Held() {
		if h.Serial == first {
			t.Fatal("a certificate of the old CA is kept after the bundle dropped that CA")
		}
	}
	waitFor(t, "a new certificate", func() bool { h := c.Held(); return len(h) == 1 && h[0].Serial != first })
}

// A short certificate's retries come often enough that a returned operator renews
// it long before it expires; a long one's stay at the usual ceiling.
func TestRetryLimitFollowsWhatIsLeft(t *testing.T) {
	for _, tc := range []struct{ left, want time.Duration }{
		{30 * time.Second, 3 * time.Second},
		{2 * time.Second, time.Second},
		{-time.Second, time.Second},
		{12 * time.Hour, 30 * time.Second},
	} {
		if got := retryLimit(tc.left); got != tc.want {
			t.Errorf("retryLimit(%s) = %s, want %s", tc.left, got, tc.want)
		}
	}
}
