// Package observertls is the mutual TLS of the Observer API on TCP: the agents' --observer-addr
// and the relay that reads them. Flows name pods, identities and addresses, so over
// TCP both ends prove a certificate from the mesh CA; unix sockets rely on their mode.
package observertls

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"strings"
)

// Files are the PEM files of one end of an Observer connection over TCP.
type Files struct {
	Cert string // this end's certificate chain, issued by the mesh CA
	Key  string // its private key
	CA   string // the mesh CA bundle the other end's certificate must chain to
}

// Set says all three files are given.
func (f Files) Set() bool { return f.Cert != "" && f.Key != "" && f.CA != "" }

// ErrNoTLS is an Observer endpoint asked to use TCP without its TLS files.
var ErrNoTLS = errors.New("the Observer API on TCP needs a certificate, its key and the mesh CA bundle (mutual TLS)")

// IsTCP says addr (host:port, or unix:///path) is a TCP address.
func IsTCP(addr string) bool { return addr != "" && !strings.HasPrefix(addr, "unix:") }

// config is the part both ends share: TLS 1.3, this end's certificate; and the CA.
func (f Files) config() (*tls.Config, *x509.CertPool, error) {
	if !f.Set() {
		return nil, nil, ErrNoTLS
	}
	cert, err := tls.LoadX509KeyPair(f.Cert, f.Key)
	if err != nil {
		return nil, nil, fmt.Errorf("observer tls: %w", err)
	}
	pem, err := os.ReadFile(f.CA)
	if err != nil {
		return nil, nil, fmt.Errorf("observer tls: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return nil, nil, fmt.Errorf("observer tls: no certificate in %s", f.CA)
	}
	return &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert}}, roots, nil
}

// ServerConfig is the configuration of an Observer API served on TCP: TLS 1.3, and a
// client certificate chaining to the CA is required.
func ServerConfig(f Files) (*tls.Config, error) {
	c, roots, err := f.config()
	if err != nil {
		return nil, err
	}
	c.ClientAuth, c.ClientCAs = tls.RequireAndVerifyClientCert, roots
	return c, nil
}

// ClientConfig is the configuration of a client (the relay) reading an Observer API on
// TCP: it presents its certificate and requires the server's to chain to the CA.
// Agents are dialled at node addresses their certificates do not name, so the chain
// is what is verified, not a host name.
func ClientConfig(f Files) (*tls.Config, error) {
	c, roots, err := f.config()
	if err != nil {
		return nil, err
	}
	// Safe: VerifyConnection verifies the chain against the mesh CA.
	c.InsecureSkipVerify = true
	c.VerifyConnection = func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 {
			return errors.New("observer tls: the server presented no certificate")
		}
		inter := x509.NewCertPool()
		for _, c := range cs.PeerCertificates[1:] {
			inter.AddCert(c)
		}
		_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
		if err != nil {
			return fmt.Errorf("observer tls: server certificate: %w", err)
		}
		return nil
	}
	return c, nil
}
