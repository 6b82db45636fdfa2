// The Go TLS baseline for bulk: tcp-send and tcp-sink speaking crypto/tls directly
// to each other, pod to pod without a mesh, with mutual authentication by
// certificates from a mesh CA. It is what an application that did its own mTLS in
// Go would get, the bound the bulk goal compares Ferry with.

package bench

import (
	"crypto/tls"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/ferrymesh/ferry/internal/observertls"
	"github.com/ferrymesh/ferry/operator/ca"
)

// TLSFiles are the PEM files of one side of a Go TLS connection.
type TLSFiles struct {
	Cert, Key, CA string
}

// set says whether any file was given; a side with none speaks plain TCP.
func (f TLSFiles) set() bool { return f.Cert != "" || f.Key != "" || f.CA != "" }

// TLSConfig is the crypto/tls configuration of a sink (server) or a sender: the
// same mutual TLS as the Observer API on TCP (TLS 1.3, the peer's certificate
// required and its chain verified against the CA, no host name since mesh
// certificates name a SPIFFE ID). It returns nil for no files.
func (f TLSFiles) TLSConfig(server bool) (*tls.Config, error) {
	if !f.set() {
		return nil, nil
	}
	files := observertls.Files{Cert: f.Cert, Key: f.Key, CA: f.CA}
	if server {
		return observertls.ServerConfig(files)
	}
	return observertls.ClientConfig(files)
}

// writeGoTLSFiles issues a client certificate (for nmc) and a server certificate
// (for each of servers) from a new mesh CA into dir.
func writeGoTLSFiles(dir string, servers []string) (client TLSFiles, srv map[string]TLSFiles, err error) {
	authority, err := ca.New("cluster.local")
	if err != nil {
		return TLSFiles{}, nil, fmt.Errorf("go tls ca: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return TLSFiles{}, nil, fmt.Errorf("go tls files: %w", err)
	}
	root := filepath.Join(dir, "root.pem")
	if err := os.WriteFile(root, authority.RootPEM(), 0o600); err != nil {
		return TLSFiles{}, nil, fmt.Errorf("go tls files: %w", err)
	}
	issue := func(name string) (TLSFiles, error) {
		cert, key, err := authority.Issue("spiffe://cluster.local/ns/default/sa/"+name, 24*time.Hour)
		if err != nil {
			return TLSFiles{}, fmt.Errorf("go tls certificate: %w", err)
		}
		f := TLSFiles{Cert: filepath.Join(dir, name+".crt"), Key: filepath.Join(dir, name+".key"), CA: root}
		if err := os.WriteFile(f.Cert, cert, 0o600); err != nil {
			return TLSFiles{}, err
		}
		return f, os.WriteFile(f.Key, key, 0o600)
	}
	if client, err = issue("nmc"); err != nil {
		return TLSFiles{}, nil, err
	}
	srv = map[string]TLSFiles{}
	for _, s := range servers {
		if srv[s], err = issue(s); err != nil {
			return TLSFiles{}, nil, err
		}
	}
	return client, srv, nil
}
