package agent

import (
	"fmt"
	"net/netip"
	"slices"

	"github.com/ferrymesh/ferry/agent/datapath"
	"github.com/ferrymesh/ferry/api/admin"
)

// Explain answers GET /explain: the proxy's route and decisions, with what the
// kernel's maps say of the source's capture and the destinations' mTLS modes
// from the state.
func (s adminSource) Explain(q admin.ExplainQuery) (admin.Explain, error) {
	a := s.a
	ex, err := a.proxy.Explain(q)
	if err != nil {
		return ex, err
	}
	a.mu.Lock()
	st := a.state
	var cookie uint64
	local := false
	for _, p := range a.enrolled {
		if p.w.Name == ex.Source.Pod && ex.Source.Pod != "" {
			cookie, local = p.cookie, true
		}
	}
	a.mu.Unlock()
	ex.StateVersion = st.GetVersion()
	modes := map[string]string{}
	for _, w := range st.GetWorkloads() {
		for _, d := range ex.Decisions {
			if w.GetNamespace()+"/"+w.GetName() != d.Pod {
				continue
			}
			mode := w.GetMtlsMode()
			if ap, err := netip.ParseAddrPort(d.Endpoint); err == nil && w.GetPortMtlsModes()[uint32(ap.Port())] != "" {
				mode = w.GetPortMtlsModes()[uint32(ap.Port())]
			}
			if mode == "" {
				mode = "Permissive"
			}
			modes[d.Endpoint] = mode
		}
	}
	for i := range ex.Decisions {
		ex.Decisions[i].MTLSMode = modes[ex.Decisions[i].Endpoint]
	}
	if local || (ex.Source.Node == a.cfg.Node && ex.Source.Pod != "") {
		ex.Capture = a.explainCapture(cookie, ex)
	}
	return ex, nil
}

// explainCapture reads whether the source's connection is captured from the
// pinned maps, as the connect hooks decide it.
func (a *Agent) explainCapture(cookie uint64, ex admin.Explain) *admin.ExplainCapture {
	c := &admin.ExplainCapture{NetnsCookie: cookie}
	dump, err := datapath.DumpMaps(a.cfg.Datapath.PinDir)
	if err != nil {
		c.Error, c.Why = err.Error(), "the pinned maps could not be read"
		return c
	}
	for _, e := range dump.Enrolled {
		if cookie != 0 && e.NetnsCookie == cookie {
			c.InEnrolledNetns = true
		}
	}
	c.ExcludedPorts = dump.ExcludedPorts
	dst, err := netip.ParseAddrPort(ex.Destination.Addr)
	if err != nil {
		c.Why = err.Error()
		return c
	}
	port := dst.Port()
	mesh := slices.Contains(a.cfg.Datapath.Ports.List(), port)
	c.PortCaptured = !dst.Addr().IsLoopback() && !mesh && !slices.Contains(dump.ExcludedPorts, port)
	c.Captured = c.InEnrolledNetns && c.PortCaptured
	switch {
	case cookie == 0:
		c.Why = "the pod is not enrolled on this node yet: its connections are not captured"
	case !c.InEnrolledNetns:
		c.Why = fmt.Sprintf("netns cookie %d is not in enrolled_netns: its connections are not captured", cookie)
	case dst.Addr().IsLoopback():
		c.Why = "loopback is never captured"
	case mesh:
		c.Why = fmt.Sprintf("port %d is a mesh port: never captured", port)
	case !c.PortCaptured:
		c.Why = fmt.Sprintf("port %d is excluded: sent unchanged", port)
	default:
		c.Why = "captured: connect() is redirected to the node proxy's outbound listener"
	}
	return c
}
