package identity_test

import (
	"crypto/tls"
	"strings"
	"sync"
	"testing"
)

// A certificate from the mesh's own CA whose SPIFFE ID plays a trick is refused in
// the handshake, by the server and by the client, with a reason naming the trick.
func TestPeerIDTricksRefused(t *testing.T) {
	for _, tc := range []struct {
		name string
		uris []string
		says string
	}{
		{"dot-dot segment", []string{"spiffe://cluster.local/ns/../sa/client"}, `invalid path segment ".."`},
		{"dot-dot path", []string{"spiffe://cluster.local/ns/default/sa/x/../client"}, "path must be"},
		{"percent-encoded", []string{"spiffe://cluster.local/ns/default/sa/%63lient"}, "percent-encoding is not allowed"},
		{"encoded slash", []string{"spiffe://cluster.local/ns/default%2Fsa/sa/client"}, "percent-encoding is not allowed"},
		{"upper-case name", []string{"spiffe://cluster.local/ns/default/sa/Client"}, `invalid path segment "Client"`},
		{"upper-case trust domain", []string{"spiffe://Cluster.Local/ns/default/sa/client"}, "only lower-case letters"},
		{"trailing slash", []string{"spiffe://cluster.local/ns/default/sa/client/"}, "path must be"},
		{"two URI SANs", []string{clientID, clientID}, "2 URI SANs, want exactly 1"},
		{"two identities", []string{clientID, serverID}, "2 URI SANs, want exactly 1"},
		{"no URI SAN", nil, "0 URI SANs, want exactly 1"},
		{"not spiffe", []string{"https://cluster.local/ns/default/sa/client"}, "is not spiffe://"},
		{"port", []string{"spiffe://cluster.local:443/ns/default/sa/client"}, "must not have user info, port"},
		// Well-formed, so the check is the peer's expected identity: the tunnel's
		// Authorize wants the workload's own, which is in the mesh's trust domain.
		{"another trust domain", []string{"spiffe://evil.example/ns/default/sa/client"}, "want " + clientID},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cs, ss, ca := newStores(t)
			pem := ca.IssueURIs(t, tc.uris...)
			trick, err := tls.X509KeyPair(pem.Chain, pem.Key)
			if err != nil {
				t.Fatal(err)
			}
			var mu sync.Mutex
			var seen []string

			// As a client, against a server expecting clientID.
			client := &tls.Config{MinVersion: tls.VersionTLS13, NextProtos: []string{"h2"}, InsecureSkipVerify: true, Certificates: []tls.Certificate{trick}}
			r := handshake(t, client, ss.ServerConfig(serverID, expectPeer(clientID, &seen, &mu)))
			if r.server == nil || !strings.Contains(r.server.Error(), tc.says) {
				t.Errorf("server: %v; want a refusal saying %q", r.server, tc.says)
			}
			if r.client == nil {
				t.Error("client did not see the refusal")
			}

			// As a server, to a client that expects clientID there.
			server := &tls.Config{MinVersion: tls.VersionTLS13, NextProtos: []string{"h2"}, Certificates: []tls.Certificate{trick}}
			r = handshake(t, cs.ClientConfig(clientID, clientID), server)
			if r.client == nil || !strings.Contains(r.client.Error(), tc.says) {
				t.Errorf("client: %v; want a refusal saying %q", r.client, tc.says)
			}
		})
	}
}
