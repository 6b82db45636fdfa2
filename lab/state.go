// This file writes the per-node state files the agents read: the same
// ferryv1.NodeState the operator will stream.

package lab

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/ferrymesh/ferry/api/ferryv1"
	"github.com/ferrymesh/ferry/internal/atomicfile"
	"github.com/ferrymesh/ferry/operator/ca"
	"google.golang.org/protobuf/encoding/protojson"
)

// CertTTL is the lifetime of the workload certificates the lab issues.
const CertTTL = ca.DefaultTTL

// issuer is what the lab needs from the mesh CA.
type issuer interface {
	RootPEM() []byte
	Issue(spiffeID string, ttl time.Duration) (certPEM, keyPEM []byte, err error)
}

// writeStates creates the mesh CA, issues a certificate for every enrolled pod and
// writes each node's state file, with the certificates of that node's pods only.
func (l *Lab) writeStates() error {
	cfg := l.desc.Config
	authority, err := ca.New(cfg.TrustDomain)
	if err != nil {
		return fmt.Errorf("mesh CA: %w", err)
	}
	return l.writeStatesWith(authority)
}

func (l *Lab) writeStatesWith(ca issuer) error {
	cfg := l.desc.Config
	if err := os.WriteFile(filepath.Join(cfg.StateDir, "ca.pem"), ca.RootPEM(), 0o644); err != nil {
		return fmt.Errorf("write trust bundle: %w", err)
	}
	var workloads []*ferryv1.Workload
	for _, p := range l.desc.Pods {
		if !p.Enrolled {
			continue
		}
		workloads = append(workloads, &ferryv1.Workload{
			Uid:            p.UID,
			Name:           p.Name,
			Namespace:      p.Namespace,
			ServiceAccount: p.ServiceAccount,
			Node:           p.Node,
			Ips:            []string{p.IP.String()},
			Identity:       p.Identity,
		})
	}
	services := l.services()
	for _, n := range l.desc.Nodes {
		st := &ferryv1.NodeState{
			Version:        1,
			Node:           n.Name,
			TrustDomain:    cfg.TrustDomain,
			TrustBundlePem: ca.RootPEM(),
			Workloads:      workloads,
			Mesh:           &ferryv1.MeshConfig{},
			Services:       services,
		}
		for _, p := range l.desc.Pods {
			if !p.Enrolled || p.Node != n.Name {
				continue
			}
			cert, key, err := ca.Issue(p.Identity, CertTTL)
			if err != nil {
				return fmt.Errorf("certificate of pod %s: %w", p.Name, err)
			}
			st.Certificates = append(st.Certificates, &ferryv1.Certificate{
				Identity:      p.Identity,
				CertChainPem:  cert,
				PrivateKeyPem: key,
			})
		}
		data, err := protojson.MarshalOptions{Multiline: true}.Marshal(st)
		if err != nil {
			return fmt.Errorf("state of %s: %w", n.Name, err)
		}
		// Private keys inside: readable by root only.
		if err := atomicfile.Write(n.StateFile, data, 0o600); err != nil {
			return fmt.Errorf("state of %s: %w", n.Name, err)
		}
	}
	return nil
}

// services are the lab's Services as the operator would compute them: every pod
// named is a ready backend, enrolled ones also endpoints by workload UID.
func (l *Lab) services() []*ferryv1.Service {
	var out []*ferryv1.Service
	for _, sv := range l.desc.Config.Services {
		s := &ferryv1.Service{
			Name: sv.Name, Namespace: sv.Namespace, ClusterIps: []string{sv.ClusterIP.String()},
			Ports: []*ferryv1.ServicePort{{Port: uint32(sv.Port), TargetPort: fmt.Sprint(sv.TargetPort), AppProtocol: sv.AppProtocol}},
		}
		for _, p := range l.desc.Pods {
			if p.Namespace != sv.Namespace || !slices.Contains(sv.Pods, p.Name) {
				continue
			}
			b := &ferryv1.Backend{Pod: p.Name, Ips: []string{p.IP.String()}, Node: p.Node, Ready: true, Ports: []uint32{uint32(sv.TargetPort)}}
			if p.Enrolled {
				b.WorkloadUid = p.UID
				s.Endpoints = append(s.Endpoints, p.UID)
			}
			s.Backends = append(s.Backends, b)
		}
		out = append(out, s)
	}
	return out
}
