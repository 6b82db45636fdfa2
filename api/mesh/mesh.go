// Package mesh holds the constants that the kernel programs (bpf), the capture and
// the node proxy must agree on: the mesh ports inside every enrolled pod and the
// socket mark of the agent's own connections. They are defined here once and passed
// explicitly, so the two sides cannot drift apart.
package mesh

import "fmt"

// Ports are the mesh's ports inside every enrolled pod's network namespace.
type Ports struct {
	Outbound uint16 // outbound capture, on 127.0.0.1 / ::1
	Inbound  uint16 // inbound plaintext capture
	Tunnel   uint16 // mTLS tunnel (HBONE), on the pod IP
}

// DefaultPorts are the ports Istio ambient uses too: 15001, 15006 and 15008.
func DefaultPorts() Ports { return Ports{Outbound: 15001, Inbound: 15006, Tunnel: 15008} }

// List returns the three ports, outbound, inbound and tunnel.
func (p Ports) List() []uint16 { return []uint16{p.Outbound, p.Inbound, p.Tunnel} }

// Validate reports a port that is zero or used twice.
func (p Ports) Validate() error {
	if p.Outbound == 0 || p.Inbound == 0 || p.Tunnel == 0 {
		return fmt.Errorf("mesh ports %+v: every port must be set", p)
	}
	if p.Outbound == p.Inbound || p.Outbound == p.Tunnel || p.Inbound == p.Tunnel {
		return fmt.Errorf("mesh ports %+v: ports must differ", p)
	}
	return nil
}

// DefaultMark is the SO_MARK on the agent's own sockets, which capture never
// redirects.
const DefaultMark uint32 = 0x0f3e
