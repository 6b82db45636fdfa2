package lab

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
)

// DefaultPrefix names everything a lab creates unless Config.Prefix says otherwise.
const DefaultPrefix = "fy"

// DefaultTrustDomain is the SPIFFE trust domain of a lab unless Config.TrustDomain is set.
const DefaultTrustDomain = "cluster.local"

// DefaultStateRoot holds one state folder per lab prefix.
const DefaultStateRoot = "/run/ferry-lab"

// Config describes a lab: its nodes, their pods, and the agent to run on each node.
type Config struct {
	// Prefix starts the name of every netns, cgroup and pin folder the lab creates,
	// so a later run can find and remove what a crashed one left. Lower-case letters
	// and digits, at most 8.
	Prefix string `json:"prefix"`
	// StateDir holds the lab description, state files, agent logs and sockets.
	// Default /run/ferry-lab/<prefix>.
	StateDir string `json:"stateDir,omitempty"`
	// Nodes are the simulated nodes, in order: node i (from 1) gets fabric IP
	// 10.99.0.i and pod CIDR 10.100.i.0/24.
	Nodes []NodeConfig `json:"nodes"`
	// AgentBinary is the ferry-agent to start on each node; empty starts none.
	AgentBinary string `json:"agentBinary,omitempty"`
	// AgentArgs are extra flags appended to every agent's command line.
	AgentArgs []string `json:"agentArgs,omitempty"`
	// TrustDomain is the SPIFFE trust domain. Default cluster.local.
	TrustDomain string `json:"trustDomain,omitempty"`
	// PodNet is the second octet of the pod addresses: node i's pods are in
	// 10.<PodNet>.i.0/24. Default 100. Labs up at the same time need different
	// values, because an agent finds a pod's network namespace by its IP.
	PodNet uint8 `json:"podNet,omitempty"`
	// Operator, when set, gives the agents their state and certificates from
	// ferry-operator instead of state files (see OperatorConfig).
	Operator OperatorConfig `json:"operator,omitempty"`
	// Services are Kubernetes Services over the lab's pods, in the agents' state and
	// in the operator's manifests.
	Services []ServiceConfig `json:"services,omitempty"`
}

// ServiceConfig is a Service with one TCP port over some of the lab's pods, all of
// them ready.
type ServiceConfig struct {
	Name string `json:"name"`
	// Namespace is the Service's namespace, which its pods share. Default "default".
	Namespace string `json:"namespace,omitempty"`
	// ClusterIP is the address clients dial (e.g. 10.96.0.50); nothing routes it:
	// the mesh balances connections to it.
	ClusterIP netip.Addr `json:"clusterIP"`
	Port      uint16     `json:"port"`
	// TargetPort is the pods' port. Default Port.
	TargetPort uint16 `json:"targetPort,omitempty"`
	// Pods are the names of the pods behind the Service; none makes a Service with
	// no endpoint.
	Pods []string `json:"pods,omitempty"`
	// AppProtocol is the port's appProtocol (e.g. kubernetes.io/h2c, grpc), which
	// tells the mesh what the port speaks; "" says nothing.
	AppProtocol string `json:"appProtocol,omitempty"`
}

// NodeConfig is one simulated node.
type NodeConfig struct {
	Name string      `json:"name"`
	Pods []PodConfig `json:"pods"`
}

// PodConfig is one pod on a node.
type PodConfig struct {
	Name string `json:"name"`
	// Namespace is the Kubernetes namespace. Default "default".
	Namespace string `json:"namespace,omitempty"`
	// ServiceAccount names the pod's identity. Default: the pod's name.
	ServiceAccount string `json:"serviceAccount,omitempty"`
	// Enrolled pods are in the mesh: they get a certificate and the agents capture
	// their traffic.
	Enrolled bool `json:"enrolled"`
}

// DefaultConfig is the standard two-node lab: node1 runs a and b (enrolled) and d
// (not enrolled); node2 runs c (enrolled).
func DefaultConfig() Config {
	return Config{
		Prefix:      DefaultPrefix,
		TrustDomain: DefaultTrustDomain,
		Nodes: []NodeConfig{
			{Name: "node1", Pods: []PodConfig{
				{Name: "a", Enrolled: true},
				{Name: "b", Enrolled: true},
				{Name: "d", Enrolled: false},
			}},
			{Name: "node2", Pods: []PodConfig{
				{Name: "c", Enrolled: true},
			}},
		},
	}
}

// StateDirFor is the default state folder of the lab with this prefix.
func StateDirFor(prefix string) string { return filepath.Join(DefaultStateRoot, prefix) }

var (
	prefixRE = regexp.MustCompile(`^[a-z0-9]{1,8}$`)
	// Names end up in netns names and, for nodes, in pin folder and cgroup names.
	nameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$`)
)

// withDefaults fills defaults and checks the config; the result is what the lab runs.
func (c Config) withDefaults() (Config, error) {
	if c.Prefix == "" {
		c.Prefix = DefaultPrefix
	}
	// No dash: the lab removes everything named "<prefix>-*", which must never
	// match the names of a lab with another prefix.
	if !prefixRE.MatchString(c.Prefix) {
		return c, fmt.Errorf("prefix %q: want 1 to 8 lower-case letters or digits", c.Prefix)
	}
	if c.StateDir == "" {
		c.StateDir = StateDirFor(c.Prefix)
	}
	if c.TrustDomain == "" {
		c.TrustDomain = DefaultTrustDomain
	}
	if c.PodNet == 0 {
		c.PodNet = 100
	}
	if c.PodNet == 99 {
		return c, fmt.Errorf("podNet 99: 10.99.0.0/24 is the fabric")
	}
	if len(c.Nodes) == 0 {
		return c, fmt.Errorf("config: no nodes")
	}
	if len(c.Nodes) > 250 {
		return c, fmt.Errorf("config: %d nodes, at most 250", len(c.Nodes))
	}
	nodes := make([]NodeConfig, len(c.Nodes))
	pods := map[string]string{}
	for i, n := range c.Nodes {
		if !nameRE.MatchString(n.Name) {
			return c, fmt.Errorf("node %q: want a DNS label (lower-case letters, digits, '-')", n.Name)
		}
		if n.Name == "fabric" {
			return c, fmt.Errorf("node %q: the name is taken by the fabric namespace", n.Name)
		}
		if _, dup := pods[n.Name]; dup {
			return c, fmt.Errorf("node %q: name used twice", n.Name)
		}
		pods[n.Name] = "node"
		if len(n.Pods) > 240 {
			return c, fmt.Errorf("node %s: %d pods, at most 240", n.Name, len(n.Pods))
		}
		nodes[i] = NodeConfig{Name: n.Name, Pods: make([]PodConfig, len(n.Pods))}
		for j, p := range n.Pods {
			if !nameRE.MatchString(p.Name) {
				return c, fmt.Errorf("pod %q: want a DNS label (lower-case letters, digits, '-')", p.Name)
			}
			if other, dup := pods[p.Name]; dup {
				return c, fmt.Errorf("pod %q: name already used by a %s (pod names are unique across the lab)", p.Name, other)
			}
			pods[p.Name] = "pod"
			if p.Namespace == "" {
				p.Namespace = "default"
			}
			if p.ServiceAccount == "" {
				p.ServiceAccount = p.Name
			}
			nodes[i].Pods[j] = p
		}
	}
	c.Nodes = nodes
	services := make([]ServiceConfig, len(c.Services))
	names := map[string]bool{}
	for i, sv := range c.Services {
		if sv.Namespace == "" {
			sv.Namespace = "default"
		}
		if sv.TargetPort == 0 {
			sv.TargetPort = sv.Port
		}
		what := fmt.Sprintf("services[%d] (%s/%s)", i, sv.Namespace, sv.Name)
		switch {
		case !nameRE.MatchString(sv.Name):
			return c, fmt.Errorf("%s: want a DNS label as name", what)
		case names[sv.Namespace+"/"+sv.Name]:
			return c, fmt.Errorf("%s: defined twice", what)
		case !sv.ClusterIP.IsValid():
			return c, fmt.Errorf("%s: clusterIP is required", what)
		case sv.Port == 0:
			return c, fmt.Errorf("%s: port is required", what)
		}
		names[sv.Namespace+"/"+sv.Name] = true
		for _, pod := range sv.Pods {
			if !slices.ContainsFunc(c.Nodes, func(n NodeConfig) bool {
				return slices.ContainsFunc(n.Pods, func(p PodConfig) bool { return p.Name == pod && p.Namespace == sv.Namespace })
			}) {
				return c, fmt.Errorf("%s: no pod %q in namespace %s", what, pod, sv.Namespace)
			}
		}
		services[i] = sv
	}
	c.Services = services
	return c, nil
}

// Addresses of the lab. Node i (from 1) is 10.99.0.i on the fabric and gateway
// 10.100.i.1 of its pod CIDR 10.100.i.0/24; its pod j (from 0) is 10.100.i.(10+j).

func fabricIP(node int) netip.Addr { return netip.AddrFrom4([4]byte{10, 99, 0, byte(node)}) }

func podGateway(net uint8, node int) netip.Addr {
	return netip.AddrFrom4([4]byte{10, net, byte(node), 1})
}

func podCIDR(net uint8, node int) netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, net, byte(node), 0}), 24)
}

func podIP(net uint8, node, pod int) netip.Addr {
	return netip.AddrFrom4([4]byte{10, net, byte(node), byte(10 + pod)})
}

// FabricCIDR holds the nodes' addresses; it is never routed from the root namespace.
func FabricCIDR() netip.Prefix { return netip.MustParsePrefix("10.99.0.0/24") }

// PodCIDRs holds every pod CIDR of a lab with the default PodNet; it is never routed
// from the root namespace.
func PodCIDRs() netip.Prefix { return netip.MustParsePrefix("10.100.0.0/16") }

// ParseNodeFlag reads the value of ferry lab up --node, NAME=[NS/]POD[@SA][:out],...,
// into a node: a POD without :out is enrolled.
func ParseNodeFlag(spec string) (NodeConfig, error) {
	name, pods, ok := strings.Cut(spec, "=")
	if !ok || name == "" {
		return NodeConfig{}, fmt.Errorf("--node %q: want NAME=POD[,POD...]", spec)
	}
	n := NodeConfig{Name: name}
	for _, p := range strings.Split(pods, ",") {
		if p == "" {
			continue
		}
		pc := PodConfig{Enrolled: true}
		if rest, ok := strings.CutSuffix(p, ":out"); ok {
			pc.Enrolled = false
			p = rest
		}
		if ns, rest, ok := strings.Cut(p, "/"); ok {
			pc.Namespace, p = ns, rest
		}
		if rest, sa, ok := strings.Cut(p, "@"); ok {
			p, pc.ServiceAccount = rest, sa
		}
		pc.Name = p
		if pc.Name == "" {
			return n, fmt.Errorf("--node %q: empty pod name", spec)
		}
		n.Pods = append(n.Pods, pc)
	}
	return n, nil
}
