package tunnel

// Known attacks on the tunnel port, with raw clients: TLS handshakes the mesh must
// refuse (each with its typed reason), handshakes and CONNECTs that never finish,
// and the HTTP/2 floods after a real mTLS handshake. Each is refused or contained,
// the heap stays bounded, and another client's stream keeps working.

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/agent/identity"
	"github.com/ferrymesh/ferry/agent/identity/identitytest"
	"github.com/ferrymesh/ferry/internal/h2attack"
	"github.com/ferrymesh/ferry/internal/loopback"
	"golang.org/x/net/http2"
)

// refusals collects the server's handshake refusals.
type refusals struct {
	mu  sync.Mutex
	got []*HandshakeError
}

func (r *refusals) add(_ netip.AddrPort, err *HandshakeError) {
	r.mu.Lock()
	r.got = append(r.got, err)
	r.mu.Unlock()
}

// next waits for the refusal after the first n.
func (r *refusals) next(t *testing.T, n int) *HandshakeError {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		r.mu.Lock()
		if len(r.got) > n {
			defer r.mu.Unlock()
			return r.got[n]
		}
		r.mu.Unlock()
	}
	t.Fatal("no handshake refusal reported")
	return nil
}

func (r *refusals) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.got)
}

// dialTLS handshakes with the tunnel server as cfg says, and reads, which is where
// a TLS 1.3 client learns that the server refused its certificate.
func dialTLS(t *testing.T, addr netip.AddrPort, cfg *tls.Config) error {
	t.Helper()
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", addr.String(), cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	_, err = c.Read(make([]byte, 1))
	return err
}

// A client certificate the mesh must not accept is refused in the handshake with
// a typed reason, and no stream reaches the server. (tricks_test.go in
// agent/identity covers SPIFFE IDs with tricks and two URI SANs.)
func TestHardeningTLSRefusals(t *testing.T) {
	rs := &refusals{}
	e := newEnv(t, envOpt{onRefused: rs.add})
	other := identitytest.NewCA(t)
	for _, tc := range []struct {
		name string
		cert func() []tls.Certificate
		want HandshakeReason
	}{
		{"expired, from the mesh CA", func() []tls.Certificate {
			return pair(t, e.ca.Issue(t, clientID, time.Now().Add(-48*time.Hour), time.Now().Add(-time.Hour)))
		}, HandshakeCertificateExpired},
		{"not yet valid, from the mesh CA", func() []tls.Certificate {
			return pair(t, e.ca.Issue(t, clientID, time.Now().Add(time.Hour), time.Now().Add(48*time.Hour)))
		}, HandshakeCertificateExpired},
		{"another trust domain, from the mesh CA", func() []tls.Certificate {
			return pair(t, e.ca.IssueURIs(t, "spiffe://evil.example/ns/default/sa/client"))
		}, HandshakeIdentityRefused},
		{"another CA", func() []tls.Certificate { return pair(t, other.Valid(t, clientID)) }, HandshakeUnknownAuthority},
		{"server auth only", func() []tls.Certificate {
			return pair(t, e.ca.IssueUsage(t, clientID, time.Now().Add(-time.Minute), time.Now().Add(time.Hour), x509.ExtKeyUsageServerAuth))
		}, HandshakeBadCertificate},
		{"no certificate", func() []tls.Certificate { return nil }, HandshakeNoCertificate},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := rs.count()
			err := dialTLS(t, e.tunnelAddr, &tls.Config{MinVersion: tls.VersionTLS13, NextProtos: []string{"h2"},
				InsecureSkipVerify: true, Certificates: tc.cert()})
			if err == nil {
				t.Error("client: handshake and read succeeded")
			}
			t.Logf("client: %v", err)
			he := rs.next(t, n)
			t.Logf("refused: %v", he)
			if he.Reason != tc.want {
				t.Errorf("reason %q, want %q", he.Reason, tc.want)
			}
		})
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if len(e.streams) != 0 {
		t.Errorf("%d streams reached the server", len(e.streams))
	}
}

func pair(t *testing.T, pem identity.CertPEM) []tls.Certificate {
	t.Helper()
	c, err := tls.X509KeyPair(pem.Chain, pem.Key)
	if err != nil {
		t.Fatal(err)
	}
	return []tls.Certificate{c}
}

// attack runs fn while an innocent client opens streams through the same server
// and echoes on them: each works, and the heap grows by less than 64 MiB.
func (e *env) attack(t *testing.T, fn func()) {
	t.Helper()
	echo := loopback.Serve(t, loopback.Echo)
	h2attack.WhileServing(t, 64<<20, fn, func() error { return e.echoOnce(echo) })
}

// echoOnce opens a stream to the echo app and checks a round trip.
func (e *env) echoOnce(echo netip.AddrPort) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := e.pool.Connect(ctx, e.src, serverID, e.tunnelAddr, echo, "")
	if err != nil {
		return err
	}
	defer s.Close()
	if _, err := io.WriteString(s, "ping"); err != nil {
		return err
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(s, buf); err != nil {
		return err
	}
	if string(buf) != "ping" {
		return fmt.Errorf("echo %q", buf)
	}
	return nil
}

// mtls is a raw connection that completed the mTLS handshake as the client
// workload, with a small receive buffer so unread answers back up.
func (e *env) mtls(t *testing.T) net.Conn {
	t.Helper()
	raw, err := net.DialTimeout("tcp", e.tunnelAddr.String(), 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	raw.(*net.TCPConn).SetReadBuffer(4 << 10)
	c := tls.Client(raw, e.cstore.ClientConfig(clientID, serverID))
	c.SetDeadline(time.Now().Add(20 * time.Second))
	if err := c.Handshake(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// ended waits for c to be closed by the server and says whether it was within
// the generous bound.
func ended(c net.Conn) bool {
	c.SetReadDeadline(time.Now().Add(15 * time.Second))
	_, err := io.Copy(io.Discard, c)
	var ne net.Error
	return !(errors.As(err, &ne) && ne.Timeout())
}

// Slowloris on the tunnel port: a TLS handshake that never finishes is cut off
// at HandshakeTimeout (reason handshake_timeout); a CONNECT whose header block
// never ends, and a connection that opens no stream, are closed (no answer to the
// keepalive ping, idle timeout). A stream whose bytes trickle, slower than every
// one of these timeouts, is an established stream and keeps working.
func TestHardeningTunnelSlowloris(t *testing.T) {
	rs := &refusals{}
	lim := ServerLimits{HandshakeTimeout: 300 * time.Millisecond, ReadIdleTimeout: 200 * time.Millisecond,
		PingTimeout: 200 * time.Millisecond, IdleTimeout: 500 * time.Millisecond}
	e := newEnv(t, envOpt{onRefused: rs.add, limits: lim})
	e.attack(t, func() {
		var wg sync.WaitGroup
		for range 10 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				c, err := net.Dial("tcp", e.tunnelAddr.String())
				if err != nil {
					t.Error(err)
					return
				}
				defer c.Close()
				c.Write([]byte{0x16, 0x03, 0x01, 0x02, 0x00, 0x01}) // a ClientHello's first bytes
				if !ended(c) {
					t.Error("a stalled TLS handshake was not cut off")
				}
			}()
		}
		wg.Wait()
	})
	if he := rs.next(t, 0); he.Reason != HandshakeTimeout {
		t.Errorf("stalled handshake refused as %q, want %q", he.Reason, HandshakeTimeout)
	}

	echo := loopback.Serve(t, loopback.Echo)
	r := h2attack.Request{Method: "CONNECT", Authority: echo.String()}
	e.attack(t, func() {
		// HEADERS without END_HEADERS, then nothing.
		out, err := h2attack.StalledHeaders(e.mtls(t), r, 15*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("unfinished CONNECT: %v", out)
		if !out.Closed || out.GoAway && out.GoAwayCode == http2.ErrCodeProtocol {
			t.Error("a CONNECT whose headers never end kept its connection (or was closed for another reason)")
		}
		// The preface and SETTINGS, then nothing (no answer to PINGs either).
		c := e.mtls(t)
		io.WriteString(c, http2.ClientPreface+"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
		if !ended(c) {
			t.Error("a connection that opened no stream was not closed")
		}
	})

	s := e.connect(t, echo)
	defer s.Close()
	buf := make([]byte, 1)
	for i := range 15 { // 1.5 s: three idle timeouts, seven keepalive periods
		if _, err := s.Write([]byte{byte('a' + i)}); err != nil {
			t.Fatalf("trickling stream, byte %d: %v", i, err)
		}
		if _, err := io.ReadFull(s, buf); err != nil || buf[0] != byte('a'+i) {
			t.Fatalf("trickling stream, byte %d: %q %v", i, buf, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// HTTP/2 attacks on the tunnel after a real mTLS handshake: rapid reset,
// CONTINUATION flood, PING and SETTINGS floods, an HPACK bomb and more streams
// than allowed are each contained, the heap stays within the bound, and another
// workload's streams keep working.
func TestHardeningTunnelHTTP2(t *testing.T) {
	const maxStreams = 8
	e := newEnv(t, envOpt{limits: ServerLimits{MaxConcurrentStreams: maxStreams}})
	echo := loopback.Serve(t, loopback.Echo)
	r := h2attack.Request{Method: "CONNECT", Authority: echo.String()}
	for _, tc := range h2attack.Cases(r, maxStreams) {
		t.Run(tc.Name, func(t *testing.T) {
			e.attack(t, func() {
				tc.Check(t, e.mtls(t))
			})
		})
	}
}
