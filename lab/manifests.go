// This file applies route and policy manifests (HTTPRoute, GRPCRoute,
// TrafficPolicy) to the lab's local-mode operator and waits until the agents run
// with them, as `kubectl apply` and then watching the routes' status would.

package lab

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/ferrymesh/ferry/api/admin"
	"github.com/ferrymesh/ferry/api/ferryv1"
	"github.com/ferrymesh/ferry/internal/atomicfile"
	"google.golang.org/protobuf/encoding/protojson"
	"sigs.k8s.io/yaml"
)

// configKinds are the kinds NodeState.config_status reports.
var configKinds = []string{"HTTPRoute", "GRPCRoute", "TrafficPolicy", "AuthorizationPolicy", "PeerAuthentication"}

// ConfigRef names a route or policy as NodeState.config_status does.
type ConfigRef struct {
	Kind string
	// Name is namespace/name.
	Name string
}

// Applied says when each agent ran with a manifest: the time from the file's write
// (or removal) to the agent's applied state showing it, by node.
type Applied map[string]time.Duration

// pollConfig is how often ApplyManifest reads the agents' states: fine enough to
// measure propagation against a 1 s bound.
const pollConfig = 10 * time.Millisecond

// ApplyManifest writes content as file (a name, no folder) in the local-mode
// operator's manifest folder and waits until every running agent's applied state
// reports each HTTPRoute, GRPCRoute, TrafficPolicy, AuthorizationPolicy and
// PeerAuthentication of content with a generation
// other than the one it reported before the write, accepted or not. Each object's
// generation must change (write metadata.generation, one more each time), or
// nothing shows the agents took it. It returns when each agent got there.
func (l *Lab) ApplyManifest(ctx context.Context, file, content string) (Applied, error) {
	refs, err := configRefs(content)
	if err != nil {
		return nil, fmt.Errorf("apply %s: %w", file, err)
	}
	if len(refs) == 0 {
		return nil, fmt.Errorf("apply %s: no HTTPRoute, GRPCRoute or TrafficPolicy in it", file)
	}
	path, nodes, err := l.manifestPath(file)
	if err != nil {
		return nil, err
	}
	before := map[string]map[ConfigRef]uint64{}
	for _, node := range nodes {
		if before[node], err = l.configGenerations(ctx, node); err != nil {
			return nil, fmt.Errorf("apply %s: %w", file, err)
		}
	}
	start := time.Now()
	if err := atomicfile.Write(path, []byte(content), 0o644); err != nil {
		return nil, fmt.Errorf("apply %s: %w", file, err)
	}
	return l.waitConfig(ctx, "apply "+file, nodes, start, func(node string, gens map[ConfigRef]uint64) bool {
		for _, r := range refs {
			if g, ok := gens[r]; !ok || g == before[node][r] {
				return false
			}
		}
		return true
	})
}

// RemoveManifest removes file from the operator's manifest folder and waits until no
// running agent's state reports its routes and policies.
func (l *Lab) RemoveManifest(ctx context.Context, file string) (Applied, error) {
	path, nodes, err := l.manifestPath(file)
	if err != nil {
		return nil, err
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("remove %s: %w", file, err)
	}
	refs, err := configRefs(string(data))
	if err != nil {
		return nil, fmt.Errorf("remove %s: %w", file, err)
	}
	start := time.Now()
	if err := os.Remove(path); err != nil {
		return nil, fmt.Errorf("remove %s: %w", file, err)
	}
	return l.waitConfig(ctx, "remove "+file, nodes, start, func(_ string, gens map[ConfigRef]uint64) bool {
		for _, r := range refs {
			if _, ok := gens[r]; ok {
				return false
			}
		}
		return true
	})
}

// ConfigStatus is what node's agent's applied state says of every route and policy.
func (l *Lab) ConfigStatus(ctx context.Context, node string) ([]*ferryv1.ConfigStatus, error) {
	raw, err := admin.NewClient(l.AgentSocket(node)).State(ctx)
	if err != nil {
		return nil, err
	}
	st := &ferryv1.NodeState{}
	if err := (protojson.UnmarshalOptions{DiscardUnknown: true}).Unmarshal(raw, st); err != nil {
		return nil, fmt.Errorf("applied state of %s: %w", node, err)
	}
	return st.GetConfigStatus(), nil
}

// manifestPath is file's path in the manifest folder, and the nodes whose agents run.
func (l *Lab) manifestPath(file string) (string, []string, error) {
	if file == "" || filepath.Base(file) != file || !strings.HasSuffix(file, ".yaml") {
		return "", nil, fmt.Errorf("manifest %q: want a file name ending in .yaml, no folder", file)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.desc.Op == nil {
		return "", nil, errors.New("the lab runs no local-mode operator")
	}
	if strings.HasPrefix(file, "ns-") || file == "nodes.yaml" {
		return "", nil, fmt.Errorf("manifest %q: the lab writes that file itself", file)
	}
	var nodes []string
	for _, n := range l.desc.Nodes {
		if l.agentAliveLocked(&n) {
			nodes = append(nodes, n.Name)
		}
	}
	return filepath.Join(l.desc.Op.ManifestDir, file), nodes, nil
}

func (l *Lab) configGenerations(ctx context.Context, node string) (map[ConfigRef]uint64, error) {
	cs, err := l.ConfigStatus(ctx, node)
	if err != nil {
		return nil, err
	}
	gens := map[ConfigRef]uint64{}
	for _, c := range cs {
		gens[ConfigRef{Kind: c.GetKind(), Name: c.GetName()}] = c.GetGeneration()
	}
	return gens, nil
}

// waitConfig polls every node's agent until done holds for its generations, and
// returns how long after start each got there.
func (l *Lab) waitConfig(ctx context.Context, what string, nodes []string, start time.Time, done func(node string, gens map[ConfigRef]uint64) bool) (Applied, error) {
	applied := Applied{}
	var last error
	for len(applied) < len(nodes) {
		for _, node := range nodes {
			if _, ok := applied[node]; ok {
				continue
			}
			gens, err := l.configGenerations(ctx, node)
			if err != nil {
				last = err
				continue
			}
			if done(node, gens) {
				applied[node] = time.Since(start)
			}
		}
		if len(applied) == len(nodes) {
			break
		}
		select {
		case <-ctx.Done():
			var missing []string
			for _, n := range nodes {
				if _, ok := applied[n]; !ok {
					missing = append(missing, n)
				}
			}
			err := ctx.Err()
			if last != nil {
				err = fmt.Errorf("%w (last error: %v)", err, last)
			}
			return applied, fmt.Errorf("%s: the agents on %s did not apply it: %w", what, strings.Join(missing, ", "), err)
		case <-time.After(pollConfig):
		}
	}
	return applied, nil
}

// configRefs are the routes and policies a manifest holds, in its order.
func configRefs(content string) ([]ConfigRef, error) {
	var refs []ConfigRef
	for i, doc := range bytes.Split([]byte("\n"+content), []byte("\n---")) {
		var obj struct {
			Kind     string `json:"kind"`
			Metadata struct {
				Name      string `json:"name"`
				Namespace string `json:"namespace"`
			} `json:"metadata"`
		}
		if err := yaml.Unmarshal(doc, &obj); err != nil {
			return nil, fmt.Errorf("document %d: %w", i+1, err)
		}
		if !slices.Contains(configKinds, obj.Kind) {
			continue
		}
		ns := obj.Metadata.Namespace
		if ns == "" {
			ns = "default"
		}
		refs = append(refs, ConfigRef{Kind: obj.Kind, Name: ns + "/" + obj.Metadata.Name})
	}
	return refs, nil
}
