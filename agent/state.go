package agent

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"time"

	"github.com/ferrymesh/ferry/agent/proxy"
	"github.com/ferrymesh/ferry/api/ferryv1"
	"google.golang.org/protobuf/encoding/protojson"
)

// ReadStateFile reads a NodeState written as protobuf JSON.
func ReadStateFile(path string) (*ferryv1.NodeState, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read state: %w", err)
	}
	st := &ferryv1.NodeState{}
	if err := protojson.Unmarshal(b, st); err != nil {
		return nil, fmt.Errorf("parse state %s: %w", path, err)
	}
	return st, nil
}

// workloads converts the state's workloads to the proxy's form, checking every
// field the data path relies on; a bad entry makes the whole state invalid rather
// than half-applied.
func workloads(st *ferryv1.NodeState) ([]proxy.Workload, error) {
	out := make([]proxy.Workload, 0, len(st.GetWorkloads()))
	seen := map[netip.Addr]string{}
	for i, w := range st.GetWorkloads() {
		name := w.GetNamespace() + "/" + w.GetName()
		if w.GetUid() == "" || w.GetName() == "" || w.GetNamespace() == "" || w.GetNode() == "" || w.GetIdentity() == "" {
			return nil, fmt.Errorf("workloads[%d] (%s): uid, name, namespace, node and identity are required", i, name)
		}
		pw := proxy.Workload{UID: w.GetUid(), Name: name, Identity: w.GetIdentity(), Node: w.GetNode()}
		for _, s := range w.GetIps() {
			ip, err := netip.ParseAddr(s)
			if err != nil {
				return nil, fmt.Errorf("workloads[%d] (%s): ip %q: %w", i, name, s, err)
			}
			ip = ip.Unmap()
			if other, dup := seen[ip]; dup {
				return nil, fmt.Errorf("workloads[%d] (%s): ip %s already belongs to %s", i, name, ip, other)
			}
			seen[ip] = name
			pw.IPs = append(pw.IPs, ip)
		}
		if len(pw.IPs) == 0 {
			return nil, fmt.Errorf("workloads[%d] (%s): no ip", i, name)
		}
		out = append(out, pw)
	}
	return out, nil
}

// services converts the state's Services to the proxy's form: cluster IPs, ports,
// and every backend with its readiness and pod ports. A malformed entry makes the
// whole state invalid, as for workloads.
func services(st *ferryv1.NodeState) ([]proxy.Service, error) {
	out := make([]proxy.Service, 0, len(st.GetServices()))
	for i, sv := range st.GetServices() {
		name := sv.GetNamespace() + "/" + sv.GetName()
		ps := proxy.Service{Name: name, LoadBalancer: proxy.LoadBalancer(sv.GetLoadBalancer())}
		if !ps.LoadBalancer.Known() {
			return nil, fmt.Errorf("services[%d] (%s): load balancer %q is not one this agent has", i, name, ps.LoadBalancer)
		}
		for _, text := range sv.GetClusterIps() {
			ip, err := netip.ParseAddr(text)
			if err != nil {
				return nil, fmt.Errorf("services[%d] (%s): cluster ip %q: %w", i, name, text, err)
			}
			ps.VIPs = append(ps.VIPs, ip.Unmap())
		}
		for j, p := range sv.GetPorts() {
			if p.GetPort() == 0 || p.GetPort() > 65535 {
				return nil, fmt.Errorf("services[%d] (%s): ports[%d]: port %d out of range", i, name, j, p.GetPort())
			}
			ps.Ports = append(ps.Ports, proxy.ServicePort{Port: uint16(p.GetPort()), Name: p.GetName(), AppProtocol: p.GetAppProtocol()})
		}
		for j, b := range sv.GetBackends() {
			pb := proxy.Backend{Ready: b.GetReady()}
			for _, text := range b.GetIps() {
				ip, err := netip.ParseAddr(text)
				if err != nil {
					return nil, fmt.Errorf("services[%d] (%s): backends[%d]: ip %q: %w", i, name, j, text, err)
				}
				pb.IPs = append(pb.IPs, ip.Unmap())
			}
			if len(b.GetPorts()) != len(ps.Ports) {
				return nil, fmt.Errorf("services[%d] (%s): backends[%d]: %d ports for the service's %d", i, name, j, len(b.GetPorts()), len(ps.Ports))
			}
			for _, port := range b.GetPorts() {
				if port > 65535 {
					return nil, fmt.Errorf("services[%d] (%s): backends[%d]: port %d out of range", i, name, j, port)
				}
				pb.Ports = append(pb.Ports, uint16(port))
			}
			ps.Backends = append(ps.Backends, pb)
		}
		out = append(out, ps)
	}
	return out, nil
}

// watchFile calls apply with the file's state each time it changes, until ctx ends.
// A state that cannot be read or applied is reported and the last good one stays.
func (a *Agent) watchFile(ctx context.Context, path string, every time.Duration) {
	var lastMod time.Time
	var lastSize int64
	if fi, err := os.Stat(path); err == nil {
		lastMod, lastSize = fi.ModTime(), fi.Size()
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		fi, err := os.Stat(path)
		if err != nil || (fi.ModTime().Equal(lastMod) && fi.Size() == lastSize) {
			continue
		}
		lastMod, lastSize = fi.ModTime(), fi.Size()
		st, err := ReadStateFile(path)
		if err == nil {
			err = a.Apply(st)
		}
		if err != nil {
			a.log.Error("state file rejected; keeping the last good state", "path", path, "error", err)
		}
	}
}
