package adminserver

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/api/admin"
	"github.com/ferrymesh/ferry/api/ferryv1"
	"google.golang.org/protobuf/encoding/protojson"
)

// fakeSource is an agent as the admin API sees it.
type fakeSource struct {
	snap        Snapshot
	live, ended []admin.Conn
	certs       map[string]*tls.Certificate
}

func (f *fakeSource) Snapshot() Snapshot                      { return f.snap }
func (f *fakeSource) Connections() (live, ended []admin.Conn) { return f.live, f.ended }
func (f *fakeSource) Explain(q admin.ExplainQuery) (admin.Explain, error) {
	if q.Src != "shop/a" {
		return admin.Explain{}, &admin.ExplainError{Why: "source " + q.Src + ": no such pod in the mesh"}
	}
	return admin.Explain{Node: f.snap.Config.Node, Query: q}, nil
}
func (f *fakeSource) Certificate(id string) (*tls.Certificate, error) {
	if c, ok := f.certs[id]; ok {
		return c, nil
	}
	return nil, errors.New("no certificate for " + id)
}

func selfSigned(t *testing.T, cn string, serial int64) *x509.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// serve starts a server for src on a socket in a fresh folder and returns a client.
func serve(t *testing.T, src Source) *admin.Client {
	t.Helper()
	return admin.NewClient(serveSocket(t, src))
}

// serveSocket serves src's admin API on a socket of its own and returns its path.
func serveSocket(t *testing.T, src Source) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "agent.sock")
	metrics := http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("ferry_up 1\n")) })
	s, err := New(Config{Socket: sock, Metrics: metrics}, src, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := s.Stop(ctx); err != nil {
			t.Errorf("stop: %v", err)
		}
	})
	return sock
}

// A CPU profile is served, as go tool pprof asks for it (not a named profile).
func TestCPUProfile(t *testing.T) {
	sock := serveSocket(t, testSource(t))
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	}}}
	res, err := hc.Get("http://agent/debug/pprof/profile?seconds=1")
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	body, _ := io.ReadAll(res.Body)
	// A profile is gzipped protobuf.
	if res.StatusCode != http.StatusOK || len(body) < 2 || body[0] != 0x1f || body[1] != 0x8b {
		t.Fatalf("%s, %d bytes %q", res.Status, len(body), body[:min(len(body), 40)])
	}
}

func testSource(t *testing.T) *fakeSource {
	ca := selfSigned(t, "ferry test CA", 7)
	leaf := selfSigned(t, "a", 42)
	const a, b = "spiffe://cluster.local/ns/default/sa/a", "spiffe://cluster.local/ns/default/sa/b"
	st := &ferryv1.NodeState{
		Node: "node1", Version: 12, TrustDomain: "cluster.local",
		TrustBundlePem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Raw}),
		Mesh:           &ferryv1.MeshConfig{ExcludedPorts: []uint32{22}},
		Workloads: []*ferryv1.Workload{
			{Uid: "u-b", Name: "b", Namespace: "default", Node: "node1", Ips: []string{"10.1.1.11"}, Identity: b},
			{Uid: "u-a", Name: "a", Namespace: "default", Node: "node1", Ips: []string{"10.1.1.10"}, Identity: a},
			{Uid: "u-c", Name: "c", Namespace: "default", Node: "node2", Ips: []string{"10.1.2.10"}, Identity: "spiffe://cluster.local/ns/default/sa/c"},
		},
		Certificates: []*ferryv1.Certificate{{Identity: a, CertChainPem: []byte("chain"), PrivateKeyPem: []byte("SECRET KEY")}},
	}
	dst := netip.MustParseAddrPort("10.1.2.10:8080")
	return &fakeSource{
		snap: Snapshot{
			State: st, Applied: time.Now(),
			Enrolled:    map[string]admin.StatusPod{"u-a": {Name: "default/a", IP: "10.1.1.10", Identity: a, NetnsCookie: 4097}},
			Failing:     map[string]string{"u-b": "pod default/b: no network namespace with IP 10.1.1.11"},
			TunnelConns: 1, TunnelStreams: 2,
			Config: admin.AgentConfig{Node: "node1", AdminSocket: "/run/ferry/agent.sock", FlowCapacity: 4096, Mark: 0x539, FastPath: true},
		},
		live: []admin.Conn{{ID: 3, Direction: admin.Outbound, Security: admin.MTLS, Dst: dst}},
		ended: []admin.Conn{
			{ID: 1, Direction: admin.Outbound, Security: admin.MTLS, Dst: dst, Verdict: admin.VerdictDenied, Reason: admin.ReasonForbidden,
				Status: 403, Error: "refused by destination: status 403: target is not this pod"},
			{ID: 2, Direction: admin.Outbound, Security: admin.SameNode, Dst: dst, Verdict: admin.VerdictForwarded, BytesSent: 5, BytesRecv: 6},
		},
		certs: map[string]*tls.Certificate{a: {Leaf: leaf}},
	}
}

func TestStatus(t *testing.T) {
	c := serve(t, testSource(t))
	st, err := c.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if st.Node != "node1" || st.StateVersion != 12 || st.LiveConns != 1 || st.TunnelConns != 1 || st.TunnelStreams != 2 || !st.FastPath ||
		st.Goroutines == 0 || st.OpenFDs <= 0 {
		t.Errorf("status %+v", st)
	}
	if len(st.Pods) != 1 || st.Pods[0].Name != "default/a" || st.Pods[0].NetnsCookie != 4097 {
		t.Errorf("pods %+v", st.Pods)
	}
}

func TestWorkloads(t *testing.T) {
	c := serve(t, testSource(t))
	ws, err := c.Workloads(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if ws.StateVersion != 12 || len(ws.Workloads) != 3 {
		t.Fatalf("workloads %+v", ws)
	}
	a, b, cw := ws.Workloads[0], ws.Workloads[1], ws.Workloads[2]
	if a.Name != "a" || !a.Local || !a.Enrolled || a.NetnsCookie != 4097 || a.Error != "" {
		t.Errorf("a %+v", a)
	}
	if b.Name != "b" || !b.Local || b.Enrolled || !strings.Contains(b.Error, "no network namespace") {
		t.Errorf("b %+v", b)
	}
	if cw.Name != "c" || cw.Local || cw.Enrolled {
		t.Errorf("c %+v", cw)
	}
}

func TestConnectionsCarryTypedOutcomes(t *testing.T) {
	c := serve(t, testSource(t))
	cs, err := c.Connections(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(cs.Live) != 1 || cs.Live[0].Verdict != "" || len(cs.Ended) != 2 {
		t.Fatalf("connections %+v", cs)
	}
	if d := cs.Ended[0]; d.Verdict != admin.VerdictDenied || d.Reason != admin.ReasonForbidden || d.Status != 403 ||
		d.Dst != netip.MustParseAddrPort("10.1.2.10:8080") || d.Error == "" {
		t.Errorf("denied %+v", d)
	}
	if f := cs.Ended[1]; f.Verdict != admin.VerdictForwarded || f.Reason != admin.ReasonNone || f.Security != admin.SameNode || f.BytesRecv != 6 {
		t.Errorf("forwarded %+v", f)
	}
}

func TestCertsConfigState(t *testing.T) {
	c := serve(t, testSource(t))
	ctx := context.Background()
	certs, err := c.Certs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(certs.Workloads) != 2 || certs.Workloads[0].Serial != "2a" || certs.Workloads[0].Error != "" ||
		!strings.Contains(certs.Workloads[1].Error, "no certificate") {
		t.Errorf("workload certs %+v", certs.Workloads)
	}
	if len(certs.TrustBundle) != 1 || certs.TrustBundle[0].Serial != "7" || !strings.Contains(certs.TrustBundle[0].Identity, "ferry test CA") {
		t.Errorf("trust bundle %+v", certs.TrustBundle)
	}

	cfg, err := c.Config(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Node != "node1" || cfg.TrustDomain != "cluster.local" || cfg.StateVersion != 12 || cfg.FlowCapacity != 4096 ||
		len(cfg.ExcludedPorts) != 1 || cfg.ExcludedPorts[0] != 22 || cfg.Mark != 0x539 {
		t.Errorf("config %+v", cfg)
	}

	raw, err := c.State(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// protojson varies its spacing on purpose: parse it, never match its text.
	got := &ferryv1.NodeState{}
	if err := protojson.Unmarshal(raw, got); err != nil {
		t.Fatalf("state %s: %v", raw, err)
	}
	if got.GetVersion() != 12 || len(got.GetCertificates()) != 1 || got.GetCertificates()[0].GetPrivateKeyPem() != nil ||
		string(got.GetCertificates()[0].GetCertChainPem()) != "chain" {
		t.Errorf("state %s", raw)
	}
}

// Before the first state the documents say so, and nothing fails.
func TestNoStateYet(t *testing.T) {
	src := &fakeSource{snap: Snapshot{Config: admin.AgentConfig{Node: "node1"}}}
	c := serve(t, src)
	ws, err := c.Workloads(context.Background())
	if err != nil || ws.StateAge != "never" || len(ws.Workloads) != 0 {
		t.Errorf("workloads %+v, %v", ws, err)
	}
	if _, err := c.State(context.Background()); err != nil {
		t.Errorf("state: %v", err)
	}
}

// GET /explain passes the question on, and an unknown pod comes back to the
// client as an *admin.ExplainError saying which.
func TestExplain(t *testing.T) {
	c := serve(t, testSource(t))
	q := admin.ExplainQuery{Src: "shop/a", Dst: "10.96.0.1:80", Method: "GET", Path: "/x"}
	ex, err := c.Explain(context.Background(), q)
	if err != nil || ex.Query != q {
		t.Fatalf("explain %+v, %v", ex, err)
	}
	_, err = c.Explain(context.Background(), admin.ExplainQuery{Src: "shop/zz", Dst: "10.96.0.1:80"})
	var ee *admin.ExplainError
	if !errors.As(err, &ee) || ee.Why != "source shop/zz: no such pod in the mesh" {
		t.Fatalf("unknown pod: %v", err)
	}
	if _, err := c.Explain(context.Background(), admin.ExplainQuery{Src: "shop/a"}); !errors.As(err, &ee) {
		t.Fatalf("no destination: %v", err)
	}
}
