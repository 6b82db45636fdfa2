// The peer: a pair of HAProxy processes doing Ferry's job the sidecar way. The
// client-side one, in the client pod, takes plaintext on loopback and originates
// mutual TLS with a client certificate; the server-side one, in the server pod,
// terminates it (requiring a client certificate from the mesh CA) in front of the
// app. It stands in for an Envoy-class proxy pair. For HTTP/1.1 and bulk both are
// L4 (mode tcp), with one TLS connection per client connection; for HTTP/2 and gRPC
// both are L7 (mode http): each terminates HTTP/2 and proxies streams, speaking h2
// over mTLS to the other.

package bench

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/ferrymesh/ferry/operator/ca"
)

const hapDefaults = `global
    maxconn 4000
    ssl-default-bind-ciphersuites TLS_AES_128_GCM_SHA256
    ssl-default-server-ciphersuites TLS_AES_128_GCM_SHA256
    ssl-default-bind-options ssl-min-ver TLSv1.3
    ssl-default-server-options ssl-min-ver TLSv1.3
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
`

// hapForwards are the server-side HAProxy's TLS ports, one per protocol.
var hapForwards = []struct {
	proto protocol
	tls   int
}{{protoHTTP1, hapTLSHTTPPort}, {protoTCP, hapTLSBulkPort}, {protoH2, hapTLSH2Port}, {protoGRPC, hapTLSGRPCPort}, {protoRR, hapTLSRRPort}}

// startHAProxy writes the pair's configurations and starts the client-side HAProxy
// in nmc and a server-side one in nms1 and nms2.
func (r *runner) startHAProxy(ctx context.Context) error {
	ips := map[string]string{}
	for _, srv := range hapServers {
		ips[srv] = r.podIP(srv)
	}
	cfgs, err := writeHAProxyConfigs(filepath.Join(r.tmp, "haproxy"), ips)
	if err != nil {
		return err
	}
	// r.hap keys the processes by server pod, and the client-side one as "client".
	for _, p := range []struct{ pod, key string }{{"nms2", "nms2"}, {"nms1", "nms1"}, {"nmc", "client"}} {
		bin, args := r.onProxy("haproxy", "-db", "-f", cfgs[p.pod])
		cmd, err := r.start(ctx, p.pod, "haproxy-"+p.key, bin, args...)
		if err != nil {
			return err
		}
		r.hap[p.key] = cmd.Process.Pid
	}
	return nil
}

// writeHAProxyConfigs issues certificates from a new mesh CA into dir and writes the
// configuration of the client-side HAProxy (for nmc) and of a server-side one for
// each of hapServers, whose pod IPs ips holds. It returns the files by pod.
func writeHAProxyConfigs(dir string, ips map[string]string) (map[string]string, error) {
	authority, err := ca.New("cluster.local")
	if err != nil {
		return nil, fmt.Errorf("haproxy ca: %w", err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("haproxy config: %w", err)
	}
	root := filepath.Join(dir, "root.pem")
	if err := os.WriteFile(root, authority.RootPEM(), 0o600); err != nil {
		return nil, fmt.Errorf("haproxy config: %w", err)
	}
	crt := func(name, id string) (string, error) {
		cert, key, err := authority.Issue(id, 24*time.Hour)
		if err != nil {
			return "", fmt.Errorf("haproxy certificate: %w", err)
		}
		p := filepath.Join(dir, name+".pem")
		return p, os.WriteFile(p, append(append(cert, '\n'), key...), 0o600)
	}
	clientCrt, err := crt("client", "spiffe://cluster.local/ns/default/sa/nmc")
	if err != nil {
		return nil, err
	}
	cfgs := map[string]string{}
	var client strings.Builder
	client.WriteString(hapDefaults)
	for i, srv := range hapServers {
		srvCrt, err := crt(srv, "spiffe://cluster.local/ns/default/sa/"+srv)
		if err != nil {
			return nil, err
		}
		ip := ips[srv]
		var server strings.Builder
		server.WriteString(hapDefaults)
		for _, fw := range hapForwards {
			local := hapLocalPort(fw.proto, i)
			if fw.proto.l7() {
				// HTTP/2 both ways: h2c from the app client, h2 with ALPN over mTLS
				// between the pair, h2c to the app; requests are proxied per stream.
				fmt.Fprintf(&server, "listen in%d\n    mode http\n    bind %s:%d ssl crt %s ca-file %s verify required alpn h2\n    server app 127.0.0.1:%d proto h2\n",
					fw.tls, ip, fw.tls, srvCrt, root, fw.proto.serverPort())
				fmt.Fprintf(&client, "listen out%d\n    mode http\n    bind 127.0.0.1:%d proto h2\n    server up %s:%d ssl crt %s ca-file %s verify required alpn h2\n",
					local, local, ip, fw.tls, clientCrt, root)
				continue
			}
			fmt.Fprintf(&server, "listen in%d\n    bind %s:%d ssl crt %s ca-file %s verify required\n    server app 127.0.0.1:%d\n",
				fw.tls, ip, fw.tls, srvCrt, root, fw.proto.serverPort())
			fmt.Fprintf(&client, "listen out%d\n    bind 127.0.0.1:%d\n    server up %s:%d ssl crt %s ca-file %s verify required\n",
				local, local, ip, fw.tls, clientCrt, root)
		}
		cfgs[srv] = filepath.Join(dir, srv+".cfg")
		if err := os.WriteFile(cfgs[srv], []byte(server.String()), 0o600); err != nil {
			return nil, fmt.Errorf("haproxy config: %w", err)
		}
	}
	cfgs["nmc"] = filepath.Join(dir, "client.cfg")
	if err := os.WriteFile(cfgs["nmc"], []byte(client.String()), 0o600); err != nil {
		return nil, fmt.Errorf("haproxy config: %w", err)
	}
	return cfgs, nil
}
