package identity_test

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/agent/identity"
	"github.com/ferrymesh/ferry/agent/identity/identitytest"
	"github.com/ferrymesh/ferry/api/spiffe"
)

var (
	clientID = spiffe.ID("cluster.local", "default", "client")
	serverID = spiffe.ID("cluster.local", "default", "server")
	otherID  = spiffe.ID("cluster.local", "default", "other")
)

type result struct {
	client, server error
	clientState    tls.ConnectionState
}

// handshake runs one TLS connection over loopback. The server writes one byte after a
// successful handshake, and the client reads it: in TLS 1.3 the client only learns that
// the server refused its certificate when it reads.
func handshake(t *testing.T, clientCfg, serverCfg *tls.Config) result {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return handshakeOn(t, ln, clientCfg, serverCfg)
}

// handshakeOn is handshake on a given listener: the client session cache is keyed by the
// server's address, so resumption needs the same one.
func handshakeOn(t *testing.T, ln net.Listener, clientCfg, serverCfg *tls.Config) result {
	t.Helper()
	var r result
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		c, err := ln.Accept()
		if err != nil {
			r.server = err
			return
		}
		defer c.Close()
		tc := tls.Server(c, serverCfg)
		_ = tc.SetDeadline(time.Now().Add(5 * time.Second))
		if r.server = tc.Handshake(); r.server == nil {
			_, r.server = tc.Write([]byte{1})
		}
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	tc := tls.Client(c, clientCfg)
	_ = tc.SetDeadline(time.Now().Add(5 * time.Second))
	if r.client = tc.Handshake(); r.client == nil {
		var b [1]byte
		_, r.client = tc.Read(b[:])
		r.clientState = tc.ConnectionState()
	}
	if r.client != nil {
		c.Close() // unblock the server
	}
	wg.Wait()
	return r
}

func newStores(t *testing.T) (client, server *identity.Store, ca *identitytest.CA) {
	t.Helper()
	ca = identitytest.NewCA(t)
	client, server = identity.NewStore(), identity.NewStore()
	if err := client.Update(ca.RootPEM, map[string]identity.CertPEM{clientID: ca.Valid(t, clientID)}); err != nil {
		t.Fatal(err)
	}
	if err := server.Update(ca.RootPEM, map[string]identity.CertPEM{serverID: ca.Valid(t, serverID)}); err != nil {
		t.Fatal(err)
	}
	return client, server, ca
}

func expectPeer(want string, seen *[]string, mu *sync.Mutex) func(string, tls.ConnectionState) error {
	return func(peer string, _ tls.ConnectionState) error {
		mu.Lock()
		*seen = append(*seen, peer)
		mu.Unlock()
		if peer != want {
			return &identity.MismatchError{Got: peer, Want: want}
		}
		return nil
	}
}

func TestHandshakeAndResumption(t *testing.T) {
	cs, ss, _ := newStores(t)
	var mu sync.Mutex
	var seen []string
	scfg := ss.ServerConfig(serverID, expectPeer(clientID, &seen, &mu))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	r := handshakeOn(t, ln, cs.ClientConfig(clientID, serverID), scfg)
	if r.client != nil || r.server != nil {
		t.Fatalf("handshake: client %v, server %v", r.client, r.server)
	}
	if r.clientState.Version != tls.VersionTLS13 || r.clientState.NegotiatedProtocol != "h2" {
		t.Errorf("version %x alpn %q", r.clientState.Version, r.clientState.NegotiatedProtocol)
	}
	if id, _ := spiffe.FromCert(r.clientState.PeerCertificates[0]); id != serverID {
		t.Errorf("client saw server %s", id)
	}
	// A second connection resumes from the ticket, and the peer identity is still checked.
	r = handshakeOn(t, ln, cs.ClientConfig(clientID, serverID), scfg)
	if r.client != nil || r.server != nil {
		t.Fatalf("resumed handshake: client %v, server %v", r.client, r.server)
	}
	if !r.clientState.DidResume {
		t.Error("second handshake did not resume")
	}
	mu.Lock()
	defer mu.Unlock()
	if len(seen) != 2 || seen[0] != clientID || seen[1] != clientID {
		t.Errorf("server verified peers %v, want two checks of %s", seen, clientID)
	}
}

func TestWrongServerIdentity(t *testing.T) {
	cs, ss, _ := newStores(t)
	r := handshake(t, cs.ClientConfig(clientID, otherID), ss.ServerConfig(serverID, nil))
	var mm *identity.MismatchError
	if !errors.As(r.client, &mm) {
		t.Fatalf("client error %v, want MismatchError", r.client)
	}
	want := "peer identity " + serverID + ", want " + otherID
	if r.client.Error() != want {
		t.Errorf("error %q, want %q", r.client, want)
	}
	if r.server == nil {
		t.Error("server completed a handshake the client refused")
	}
}

func TestWrongClientIdentity(t *testing.T) {
	cs, ss, _ := newStores(t)
	var mu sync.Mutex
	var seen []string
	r := handshake(t, cs.ClientConfig(clientID, serverID), ss.ServerConfig(serverID, expectPeer(otherID, &seen, &mu)))
	if r.server == nil || !strings.Contains(r.server.Error(), "peer identity "+clientID+", want "+otherID) {
		t.Fatalf("server error %v", r.server)
	}
	if r.client == nil {
		t.Error("client did not see the refusal")
	}
}

func TestClientFromOtherCA(t *testing.T) {
	_, ss, ca := newStores(t)
	other := identitytest.NewCA(t)
	cs := identity.NewStore()
	// The client trusts both CAs but holds a certificate from the one the server does not.
	bundle := append(append([]byte(nil), other.RootPEM...), ca.RootPEM...)
	if err := cs.Update(bundle, map[string]identity.CertPEM{clientID: other.Valid(t, clientID)}); err != nil {
		t.Fatal(err)
	}
	r := handshake(t, cs.ClientConfig(clientID, serverID), ss.ServerConfig(serverID, nil))
	if r.server == nil || !strings.Contains(r.server.Error(), "unknown authority") {
		t.Fatalf("server error %v, want unknown authority", r.server)
	}
	if r.client == nil {
		t.Error("client did not see the refusal")
	}
}

func TestServerFromOtherCA(t *testing.T) {
	cs, _, _ := newStores(t)
	other := identitytest.NewCA(t)
	ss := identity.NewStore()
	if err := ss.Update(other.RootPEM, map[string]identity.CertPEM{serverID: other.Valid(t, serverID)}); err != nil {
		t.Fatal(err)
	}
	r := handshake(t, cs.ClientConfig(clientID, serverID), ss.ServerConfig(serverID, nil))
	if r.client == nil || !strings.Contains(r.client.Error(), "unknown authority") {
		t.Fatalf("client error %v, want unknown authority", r.client)
	}
}

func TestNoClientCertificate(t *testing.T) {
	_, ss, ca := newStores(t)
	cs := identity.NewStore()
	if err := cs.Update(ca.RootPEM, nil); err != nil {
		t.Fatal(err)
	}
	r := handshake(t, cs.ClientConfig(clientID, serverID), ss.ServerConfig(serverID, nil))
	if r.server == nil {
		t.Fatal("server accepted a client without a certificate")
	}
	if r.client == nil {
		t.Error("client did not see an error")
	}
}

func TestExpiredCertificates(t *testing.T) {
	past := time.Now().Add(-48 * time.Hour)
	expired := time.Now().Add(-time.Hour)

	t.Run("client", func(t *testing.T) {
		_, ss, ca := newStores(t)
		cs := identity.NewStore()
		if err := cs.Update(ca.RootPEM, map[string]identity.CertPEM{clientID: ca.Issue(t, clientID, past, expired)}); err != nil {
			t.Fatal(err)
		}
		r := handshake(t, cs.ClientConfig(clientID, serverID), ss.ServerConfig(serverID, nil))
		if r.server == nil || !strings.Contains(r.server.Error(), "expired") {
			t.Fatalf("server error %v, want expired", r.server)
		}
	})
	t.Run("server", func(t *testing.T) {
		cs, _, ca := newStores(t)
		ss := identity.NewStore()
		if err := ss.Update(ca.RootPEM, map[string]identity.CertPEM{serverID: ca.Issue(t, serverID, past, expired)}); err != nil {
			t.Fatal(err)
		}
		r := handshake(t, cs.ClientConfig(clientID, serverID), ss.ServerConfig(serverID, nil))
		if r.client == nil || !strings.Contains(r.client.Error(), "expired") {
			t.Fatalf("client error %v, want expired", r.client)
		}
	})
}

func TestKeyUsageEnforced(t *testing.T) {
	// A certificate good only for server auth cannot be used as a client certificate.
	_, ss, ca := newStores(t)
	cs := identity.NewStore()
	c := ca.IssueUsage(t, clientID, time.Now().Add(-time.Minute), time.Now().Add(time.Hour), x509.ExtKeyUsageServerAuth)
	if err := cs.Update(ca.RootPEM, map[string]identity.CertPEM{clientID: c}); err != nil {
		t.Fatal(err)
	}
	r := handshake(t, cs.ClientConfig(clientID, serverID), ss.ServerConfig(serverID, nil))
	if r.server == nil || !strings.Contains(r.server.Error(), "key usage") {
		t.Fatalf("server error %v, want key usage", r.server)
	}
}

func TestRotation(t *testing.T) {
	cs, ss, ca := newStores(t)
	scfg := ss.ServerConfig(serverID, nil)
	r := handshake(t, cs.ClientConfig(clientID, serverID), scfg)
	if r.client != nil || r.server != nil {
		t.Fatalf("handshake: %v / %v", r.client, r.server)
	}
	first := r.clientState.PeerCertificates[0].SerialNumber

	// The server rotates to a new certificate; the same *tls.Config serves it. A fresh
	// client store forces a full handshake so the certificate is actually sent.
	if err := ss.Update(ca.RootPEM, map[string]identity.CertPEM{serverID: ca.Valid(t, serverID)}); err != nil {
		t.Fatal(err)
	}
	cs2 := identity.NewStore()
	if err := cs2.Update(ca.RootPEM, map[string]identity.CertPEM{clientID: ca.Valid(t, clientID)}); err != nil {
		t.Fatal(err)
	}
	r = handshake(t, cs2.ClientConfig(clientID, serverID), scfg)
	if r.client != nil || r.server != nil {
		t.Fatalf("handshake after rotation: %v / %v", r.client, r.server)
	}
	if r.clientState.PeerCertificates[0].SerialNumber.Cmp(first) == 0 {
		t.Error("server still presents the old certificate after Update")
	}

	// A new CA replaces the old one on the server: clients of the old CA are refused.
	next := identitytest.NewCA(t)
	if err := ss.Update(next.RootPEM, map[string]identity.CertPEM{serverID: next.Valid(t, serverID)}); err != nil {
		t.Fatal(err)
	}
	r = handshake(t, cs2.ClientConfig(clientID, serverID), scfg)
	if r.server == nil || r.client == nil {
		t.Fatalf("old-CA client accepted after CA rotation: %v / %v", r.client, r.server)
	}
}

func TestUpdateRejects(t *testing.T) {
	ca := identitytest.NewCA(t)
	s := identity.NewStore()
	if err := s.Update(ca.RootPEM, map[string]identity.CertPEM{clientID: ca.Valid(t, clientID)}); err != nil {
		t.Fatal(err)
	}
	if err := s.Update([]byte("junk"), nil); err == nil {
		t.Error("junk bundle accepted")
	}
	err := s.Update(ca.RootPEM, map[string]identity.CertPEM{serverID: ca.Valid(t, clientID)})
	if err == nil || !strings.Contains(err.Error(), "carries") {
		t.Errorf("certificate under the wrong id: %v", err)
	}
	// A failed Update changes nothing.
	if _, err := s.Certificate(clientID); err != nil {
		t.Errorf("store lost its certificate after a failed update: %v", err)
	}
	if _, err := s.Certificate(serverID); err == nil {
		t.Error("failed update left a certificate behind")
	}
}
