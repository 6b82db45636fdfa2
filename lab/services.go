// This file changes the lab's Services while it runs: which pods are behind one,
// as a Deployment scaled down or up changes its Service's endpoints.

package lab

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"sort"
	"time"

	"github.com/ferrymesh/ferry/api/admin"
	"github.com/ferrymesh/ferry/api/ferryv1"
	"github.com/ferrymesh/ferry/internal/atomicfile"
	"google.golang.org/protobuf/encoding/protojson"
)

// SetServicePods makes pods the Service's endpoints, rewriting what the agents'
// control plane reads (the state files, or the operator's manifests), and waits until
// every running agent has applied it or ctx ends. In Kubernetes a pod that is scaled
// away leaves its Service's endpoints (it turns NotReady, then terminating) before it
// is stopped: call this first, and stop the pod's server only once it returns.
func (l *Lab) SetServicePods(ctx context.Context, name string, pods []string) error {
	l.mu.Lock()
	cfg := &l.desc.Config
	i := slices.IndexFunc(cfg.Services, func(s ServiceConfig) bool { return s.Name == name })
	if i < 0 {
		l.mu.Unlock()
		return fmt.Errorf("set service pods: the lab has no Service %q", name)
	}
	sv := &cfg.Services[i]
	for _, p := range pods {
		if !slices.ContainsFunc(l.desc.Pods, func(pi PodInfo) bool { return pi.Name == p && pi.Namespace == sv.Namespace }) {
			l.mu.Unlock()
			return fmt.Errorf("set service pods %s: no pod %q in namespace %s", name, p, sv.Namespace)
		}
	}
	old := sv.Pods
	sv.Pods = slices.Clone(pods)
	var err error
	if l.desc.Op != nil {
		err = l.writeManifests()
	} else {
		err = l.rewriteStateServices()
	}
	if err == nil {
		err = l.save()
	}
	if err != nil {
		sv.Pods = old
		l.mu.Unlock()
		return fmt.Errorf("set service pods %s: %w", name, err)
	}
	ns := sv.Namespace
	var nodes []string
	for _, n := range l.desc.Nodes {
		if l.agentAliveLocked(&n) {
			nodes = append(nodes, n.Name)
		}
	}
	l.mu.Unlock()
	for _, node := range nodes {
		if err := l.waitServicePods(ctx, node, ns, name, pods); err != nil {
			return fmt.Errorf("set service pods %s: %w", name, err)
		}
	}
	return nil
}

// rewriteStateServices replaces the Services in every node's state file, keeping its
// certificates and bumping its version, so the agents apply the change.
func (l *Lab) rewriteStateServices() error {
	services := l.services()
	for _, n := range l.desc.Nodes {
		data, err := os.ReadFile(n.StateFile)
		if err != nil {
			return fmt.Errorf("state of %s: %w", n.Name, err)
		}
		st := &ferryv1.NodeState{}
		if err := protojson.Unmarshal(data, st); err != nil {
			return fmt.Errorf("state of %s: %w", n.Name, err)
		}
		st.Version++
		st.Services = services
		if data, err = (protojson.MarshalOptions{Multiline: true}).Marshal(st); err != nil {
			return fmt.Errorf("state of %s: %w", n.Name, err)
		}
		if err := atomicfile.Write(n.StateFile, data, 0o600); err != nil {
			return fmt.Errorf("state of %s: %w", n.Name, err)
		}
	}
	return nil
}

// waitServicePods polls node's agent until the state it applied has exactly pods as
// the ready backends of namespace/name.
func (l *Lab) waitServicePods(ctx context.Context, node, namespace, name string, pods []string) error {
	want := slices.Sorted(slices.Values(pods))
	client := admin.NewClient(l.AgentSocket(node))
	var got []string
	var last error
	for {
		got, last = appliedServicePods(ctx, client, namespace, name)
		if last == nil && slices.Equal(got, want) {
			return nil
		}
		select {
		case <-ctx.Done():
			if last == nil {
				last = errors.New("not applied")
			}
			return fmt.Errorf("agent on %s: ready endpoints %v, want %v: %w (%v)", node, got, want, ctx.Err(), last)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// appliedServicePods are the ready backends of namespace/name in the state an
// agent applied.
func appliedServicePods(ctx context.Context, client *admin.Client, namespace, name string) ([]string, error) {
	raw, err := client.State(ctx)
	if err != nil {
		return nil, err
	}
	st := &ferryv1.NodeState{}
	if err := (protojson.UnmarshalOptions{DiscardUnknown: true}).Unmarshal(raw, st); err != nil {
		return nil, fmt.Errorf("applied state: %w", err)
	}
	got := []string{}
	for _, s := range st.Services {
		if s.Namespace != namespace || s.Name != name {
			continue
		}
		for _, b := range s.Backends {
			if b.Ready {
				got = append(got, b.Pod)
			}
		}
	}
	sort.Strings(got)
	return got, nil
}
