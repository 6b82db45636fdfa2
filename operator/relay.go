package operator

import (
	"context"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/ferrymesh/ferry/internal/listener"
	"github.com/ferrymesh/ferry/internal/observertls"
	"github.com/ferrymesh/ferry/operator/relay"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	corelisters "k8s.io/client-go/listers/core/v1"
)

// relayRefresh is how often the relay's agent list follows the agent pods.
const relayRefresh = 5 * time.Second

// startRelay serves the cluster-wide flow relay (the Observer API, merging every
// agent's flows in time order) on cfg.RelayAddr. It reads the agents at
// cfg.RelayAgents and, with cfg.RelayAgentPort, every running agent pod (service
// account AgentServiceAccount in Namespace) at its IP and that port: agents run on
// the host network, so the pod IP is the node's.
func (o *Operator) startRelay(ctx context.Context) error {
	if o.cfg.RelayAddr == "" {
		return nil
	}
	static := make([]relay.Agent, 0, len(o.cfg.RelayAgents))
	for _, a := range o.cfg.RelayAgents {
		static = append(static, relay.Agent{Name: a, Address: a})
	}
	rc := relay.Config{Agents: static, Log: o.log.With("component", "relay")}
	tcpAgents := o.cfg.RelayAgentPort > 0 || slices.ContainsFunc(o.cfg.RelayAgents, observertls.IsTCP)
	var err error
	if observertls.IsTCP(o.cfg.RelayAddr) || tcpAgents || o.cfg.RelayTLS.Set() {
		// The Observer API on TCP is mutual TLS only, both ways.
		if rc.ClientTLS, err = observertls.ClientConfig(o.cfg.RelayTLS); err != nil {
			return fmt.Errorf("relay: %w", err)
		}
		if observertls.IsTCP(o.cfg.RelayAddr) {
			if rc.ServerTLS, err = observertls.ServerConfig(o.cfg.RelayTLS); err != nil {
				return fmt.Errorf("relay: %w", err)
			}
		}
	}
	r, err := relay.New(rc)
	if err != nil {
		return err
	}
	ln, err := listener.Addr(ctx, o.cfg.RelayAddr)
	if err != nil {
		return fmt.Errorf("relay: %w", err)
	}
	g := newGroup(ctx)
	if err := r.Start(g.ctx); err != nil {
		g.cancel()
		ln.Close()
		return err
	}
	o.relay = g
	g.run(func(ctx context.Context) {
		defer r.Stop()
		if err := r.Serve(ctx, ln); err != nil {
			o.log.Error("relay stopped", "error", err)
		}
	})
	if o.cfg.RelayAgentPort > 0 {
		pods := o.factory.Core().V1().Pods().Lister()
		g.run(func(ctx context.Context) { o.followAgentPods(ctx, r, pods, static) })
	}
	o.log.Info("flow relay serving", "addr", o.cfg.RelayAddr, "agents", len(static), "agent_port", o.cfg.RelayAgentPort)
	return nil
}

// followAgentPods keeps the relay's agents equal to static plus the running agent
// pods, until ctx ends.
func (o *Operator) followAgentPods(ctx context.Context, r *relay.Relay, pods corelisters.PodLister, static []relay.Agent) {
	o.factory.WaitForCacheSync(ctx.Done())
	t := time.NewTicker(relayRefresh)
	defer t.Stop()
	var last []relay.Agent
	for {
		agents := append(slices.Clone(static), o.agentPods(pods)...)
		if !slices.Equal(agents, last) {
			if err := r.SetAgents(agents); err != nil {
				o.log.Error("relay agents", "error", err)
			} else {
				o.log.Info("relay agents", "agents", len(agents))
				last = agents
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// agentPods lists the running agent pods as relay agents named by node.
func (o *Operator) agentPods(pods corelisters.PodLister) []relay.Agent {
	list, err := pods.Pods(o.cfg.Namespace).List(labels.Everything())
	if err != nil {
		return nil
	}
	var out []relay.Agent
	for _, p := range list {
		if p.Spec.ServiceAccountName != o.agentServiceAccount() || p.Status.Phase != corev1.PodRunning || p.Status.PodIP == "" {
			continue
		}
		out = append(out, relay.Agent{Name: p.Spec.NodeName, Address: net.JoinHostPort(p.Status.PodIP, strconv.Itoa(o.cfg.RelayAgentPort))})
	}
	slices.SortFunc(out, func(a, b relay.Agent) int { return strings.Compare(a.Name, b.Name) })
	return out
}

func (o *Operator) agentServiceAccount() string {
	if o.cfg.AgentServiceAccount != "" {
		return o.cfg.AgentServiceAccount
	}
	return DefaultAgentSA
}
