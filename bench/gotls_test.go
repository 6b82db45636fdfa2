package bench

import (
	"context"
	"crypto/tls"
	"net"
	"path/filepath"
	"testing"
	"time"
)

// TestGoTLSBulk sends over crypto/tls with mesh-CA certificates between Send and
// Sink on loopback, and checks that a sender from another CA is refused.
func TestGoTLSBulk(t *testing.T) {
	client, srv, err := writeGoTLSFiles(t.TempDir(), []string{"nms2"})
	if err != nil {
		t.Fatal(err)
	}
	serverCfg, err := srv["nms2"].TLSConfig(true)
	if err != nil {
		t.Fatal(err)
	}
	clientCfg, err := client.TLSConfig(false)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- Sink(ctx, tls.NewListener(ln, serverCfg)) }()

	res, err := Send(context.Background(), ln.Addr().String(), 1, 200*time.Millisecond, clientCfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("loopback crypto/tls: %.2f Gbit/s", float64(res.Bytes)*8/res.Seconds/1e9)
	if res.Bytes < 1<<20 {
		t.Errorf("moved %d bytes in 200 ms over loopback TLS", res.Bytes)
	}

	// A sender whose certificate comes from another CA fails the handshake.
	other, _, err := writeGoTLSFiles(filepath.Join(t.TempDir(), "other"), nil)
	if err != nil {
		t.Fatal(err)
	}
	other.CA = client.CA // it trusts the server, the server does not trust it
	otherCfg, err := other.TLSConfig(false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Send(context.Background(), ln.Addr().String(), 1, 100*time.Millisecond, otherCfg); err == nil {
		t.Error("a client certificate from another CA was accepted")
	}
	// A sender that does not trust the server's CA refuses it.
	distrust, _, err := writeGoTLSFiles(filepath.Join(t.TempDir(), "distrust"), nil)
	if err != nil {
		t.Fatal(err)
	}
	distrust.Cert, distrust.Key = client.Cert, client.Key
	distrustCfg, err := distrust.TLSConfig(false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Send(context.Background(), ln.Addr().String(), 1, 100*time.Millisecond, distrustCfg); err == nil {
		t.Error("a server certificate from a CA the sender does not trust was accepted")
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("sink: %v", err)
	}
}

func TestGoTLSScenarios(t *testing.T) {
	p := NewPlan(true)
	for _, sc := range p.Scenarios {
		if !sc.goTLS {
			continue
		}
		for _, w := range p.Workloads {
			if w.runsIn(sc) != (w.kind == kindBulk) {
				t.Errorf("%s runs %s: %v", sc.Key, w.Key, w.runsIn(sc))
			}
		}
		if got, want := sc.target(protoTCP, "10.104.2.12"), "10.104.2.12:5203"; got != want {
			t.Errorf("%s bulk target %s, want %s", sc.Key, got, want)
		}
	}
}
