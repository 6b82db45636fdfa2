package agent

import (
	"crypto/tls"

	"github.com/ferrymesh/ferry/agent/adminserver"
	"github.com/ferrymesh/ferry/api/admin"
)

// adminSource is what the admin API reads of the agent: copies taken under the
// agent's lock, so the server never holds it.
type adminSource struct{ a *Agent }

// Snapshot copies the agent's state for the admin API.
func (s adminSource) Snapshot() adminserver.Snapshot {
	a := s.a
	ts := a.proxy.TunnelStats()
	sn := adminserver.Snapshot{
		TunnelConns: ts.Conns, TunnelStreams: ts.Streams,
		Enrolled: map[string]admin.StatusPod{}, Failing: map[string]string{},
		Config: admin.AgentConfig{
			Node: a.cfg.Node, StatePath: a.cfg.StatePath, AdminSocket: a.cfg.AdminSocket,
			PinDir: a.cfg.Datapath.PinDir, Cgroup: a.cfg.Datapath.CgroupPath, Mark: a.cfg.Datapath.Mark,
			FastPath: a.cfg.Datapath.FastPath, MaxPods: a.cfg.Datapath.MaxPods,
		},
	}
	if o := a.obs; o != nil {
		oc := o.Config()
		sn.Config.ObserverSocket, sn.Config.ObserverAddr, sn.Config.MetricsAddr = oc.ObserverSocket, oc.ObserverAddr, oc.MetricsAddr
		sn.Config.FlowCapacity = o.FlowCapacity()
	}
	if a.certs != nil {
		sn.Held = a.certs.Held()
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	sn.State, sn.Applied = a.state, a.applied
	for _, d := range a.dropped {
		sn.Dropped = append(sn.Dropped, d.Error())
	}
	for uid, p := range a.enrolled {
		sn.Enrolled[uid] = admin.StatusPod{Name: p.w.Name, IP: p.w.IPs[0].String(), Identity: p.w.Identity, NetnsCookie: p.cookie}
	}
	for uid, err := range a.failing {
		sn.Failing[uid] = err
	}
	return sn
}

// Connections are the proxy's live and recently ended connections.
func (s adminSource) Connections() (live, ended []admin.Conn) { return s.a.proxy.Connections() }

// Certificate is the certificate the agent holds for identity.
func (s adminSource) Certificate(identity string) (*tls.Certificate, error) {
	return s.a.ids.Certificate(identity)
}
