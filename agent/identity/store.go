package identity

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/ferrymesh/ferry/api/spiffe"
)

// sessionCacheSize bounds the TLS 1.3 tickets kept for resumption, across all local
// identities and peers of this node.
const sessionCacheSize = 4096

// CertPEM is one workload's certificate chain (leaf first) and PKCS#8 or SEC1 key.
type CertPEM struct {
	Chain []byte
	Key   []byte
	// Issued is when the agent asked for it (the CA backdates NotBefore, so the
	// lifetime runs from here); zero: unknown, NotBefore is used.
	Issued time.Time
}

// Store holds the trust bundle and the certificates of the workloads on this node.
// Readers never lock: Update swaps an immutable snapshot, and TLS configurations read the
// current snapshot on every handshake, so a rotation reaches new handshakes at once.
type Store struct {
	state    atomic.Pointer[snapshot]
	sessions tls.ClientSessionCache
}

type snapshot struct {
	roots *x509.CertPool
	certs map[string]*tls.Certificate
	// issued is when each certificate's lifetime began (CertPEM.Issued).
	issued map[string]time.Time
	// changed is closed when the next Update replaces this snapshot (Changed).
	changed chan struct{}
}

// NewStore returns an empty store; every handshake fails until Update gives it a bundle.
func NewStore() *Store {
	s := &Store{
		sessions: tls.NewLRUClientSessionCache(sessionCacheSize),
	}
	s.state.Store(&snapshot{roots: x509.NewCertPool(), certs: map[string]*tls.Certificate{}, issued: map[string]time.Time{}, changed: make(chan struct{})})
	return s
}

// Changed returns a channel closed by the next Update: a certificate may have been
// replaced or removed, or the bundle changed. Tunnels made with a certificate that
// is no longer the current one are retired when it closes (tunnel.PoolConfig.Changes).
func (s *Store) Changed() <-chan struct{} { return s.state.Load().changed }

// Update replaces the trust bundle and the whole set of workload certificates at once.
// Nothing changes when any part is invalid. Existing connections keep their identity;
// new handshakes use the new certificates and bundle.
func (s *Store) Update(bundlePEM []byte, certs map[string]CertPEM) error {
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(bundlePEM) {
		return errors.New("update identities: no certificate in trust bundle")
	}
	next := &snapshot{roots: roots, certs: make(map[string]*tls.Certificate, len(certs)), issued: make(map[string]time.Time, len(certs)), changed: make(chan struct{})}
	for id, c := range certs {
		if _, _, _, err := spiffe.Parse(id); err != nil {
			return fmt.Errorf("update identities: %w", err)
		}
		kp, err := tls.X509KeyPair(c.Chain, c.Key)
		if err != nil {
			return fmt.Errorf("update identities: %s: %w", id, err)
		}
		certID, err := spiffe.FromCert(kp.Leaf)
		if err != nil {
			return fmt.Errorf("update identities: %s: %w", id, err)
		}
		if certID != id {
			return fmt.Errorf("update identities: certificate for %s carries %s", id, certID)
		}
		if k, ok := kp.Leaf.PublicKey.(*ecdsa.PublicKey); !ok || k.Curve != elliptic.P256() {
			return fmt.Errorf("update identities: %s: key is not ECDSA P-256", id)
		}
		next.certs[id] = &kp
		next.issued[id] = c.Issued
		if c.Issued.IsZero() {
			next.issued[id] = kp.Leaf.NotBefore
		}
	}
	// Swap, then wake the watchers: one woken reads the new snapshot.
	close(s.state.Swap(next).changed)
	return nil
}

// Certificate is the current certificate of the local workload id.
func (s *Store) Certificate(id string) (*tls.Certificate, error) {
	c, ok := s.state.Load().certs[id]
	if !ok {
		return nil, fmt.Errorf("no certificate for %s", id)
	}
	return c, nil
}

// Lifetime is when the current certificate of the local workload id began to be
// valid (CertPEM.Issued) and when it expires; ok is false when there is none.
func (s *Store) Lifetime(id string) (issued, notAfter time.Time, ok bool) {
	st := s.state.Load()
	c := st.certs[id]
	if c == nil {
		return time.Time{}, time.Time{}, false
	}
	return st.issued[id], c.Leaf.NotAfter, true
}

// ServerConfig is the TLS configuration of the tunnel listener of local workload
// localID. The client must present a certificate chaining to the bundle with the client
// auth usage; verifyPeer (optional) then decides on the client's SPIFFE ID. The checks run
// in VerifyConnection, so they also run on resumed sessions.
func (s *Store) ServerConfig(localID string, verifyPeer func(peerID string, cs tls.ConnectionState) error) *tls.Config {
	return &tls.Config{
		MinVersion:       tls.VersionTLS13,
		MaxVersion:       tls.VersionTLS13,
		CurvePreferences: curves(),
		NextProtos:       []string{"h2"},
		// Chain verification is ours (SPIFFE certificates have no DNS names); Go still
		// insists on a certificate being presented.
		ClientAuth: tls.RequireAnyClientCert,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			return s.Certificate(localID)
		},
		VerifyConnection: func(cs tls.ConnectionState) error {
			peerID, err := s.verifyChain(cs, x509.ExtKeyUsageClientAuth)
			if err != nil {
				return err
			}
			if verifyPeer != nil {
				return verifyPeer(peerID, cs)
			}
			return nil
		},
	}
}

// Serial names a certificate in connection records and session scopes: its leaf's
// serial number in hex, "" without a leaf.
func Serial(c *tls.Certificate) string {
	if c == nil || c.Leaf == nil {
		return ""
	}
	return hex.EncodeToString(c.Leaf.SerialNumber.Bytes())
}

// ClientConfig is the TLS configuration for a tunnel from local workload localID to a
// peer that must prove it is expectedServerID. It presents the certificate current
// when it is made, whatever Update does meanwhile, so GetClientCertificate names the
// certificate a connection made with it presented (resumed or not): its session
// tickets are scoped to that certificate, and after a rotation a new configuration
// never resumes a session the old certificate made.
func (s *Store) ClientConfig(localID, expectedServerID string) *tls.Config {
	cert, certErr := s.Certificate(localID)
	return &tls.Config{
		MinVersion:       tls.VersionTLS13,
		MaxVersion:       tls.VersionTLS13,
		CurvePreferences: curves(),
		NextProtos:       []string{"h2"},
		// Safe: VerifyConnection below verifies the chain against the bundle and the
		// peer's SPIFFE ID; Go's default verification would want a DNS name.
		InsecureSkipVerify: true,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return cert, certErr
		},
		VerifyConnection: func(cs tls.ConnectionState) error {
			peerID, err := s.verifyChain(cs, x509.ExtKeyUsageServerAuth)
			if err != nil {
				return err
			}
			if peerID != expectedServerID {
				return &MismatchError{Got: peerID, Want: expectedServerID}
			}
			return nil
		},
		// A ticket proves the identities of the handshake that made it, so tickets must
		// never cross from one local identity or expected peer to another.
		// The certificate's serial is part of the scope, so a rotation starts afresh.
		ClientSessionCache: scopedCache{inner: s.sessions, prefix: localID + "\x00" + Serial(cert) + "\x00" + expectedServerID + "\x00"},
	}
}

// MismatchError is a peer that proved a different identity than the one expected.
type MismatchError struct {
	Got, Want string
}

func (e *MismatchError) Error() string {
	return fmt.Sprintf("peer identity %s, want %s", e.Got, e.Want)
}

// verifyChain verifies the peer's chain against the current bundle for usage and returns
// its SPIFFE ID. On resumption Go restores PeerCertificates from the ticket, so this
// re-checks expiry and the bundle as they are now.
func (s *Store) verifyChain(cs tls.ConnectionState, usage x509.ExtKeyUsage) (string, error) {
	if len(cs.PeerCertificates) == 0 {
		return "", errors.New("verify peer: no certificate")
	}
	leaf := cs.PeerCertificates[0]
	var inter *x509.CertPool
	if len(cs.PeerCertificates) > 1 {
		inter = x509.NewCertPool()
		for _, c := range cs.PeerCertificates[1:] {
			inter.AddCert(c)
		}
	}
	_, err := leaf.Verify(x509.VerifyOptions{
		Roots:         s.state.Load().roots,
		Intermediates: inter,
		CurrentTime:   time.Now(),
		KeyUsages:     []x509.ExtKeyUsage{usage},
	})
	if err != nil {
		return "", fmt.Errorf("verify peer: %w", err)
	}
	id, err := spiffe.FromCert(leaf)
	if err != nil {
		return "", fmt.Errorf("verify peer: %w", err)
	}
	return id, nil
}

func curves() []tls.CurveID {
	return []tls.CurveID{tls.X25519, tls.CurveP256}
}

// scopedCache gives one shared LRU a namespace per (local, expected peer) pair.
type scopedCache struct {
	inner  tls.ClientSessionCache
	prefix string
}

func (c scopedCache) Get(key string) (*tls.ClientSessionState, bool) {
	return c.inner.Get(c.prefix + key)
}

func (c scopedCache) Put(key string, cs *tls.ClientSessionState) {
	c.inner.Put(c.prefix+key, cs)
}
