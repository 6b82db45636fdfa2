// Package lab builds a whole Ferry cluster on one Linux machine, for tests,
// benchmarks and the demo.
//
// Each simulated node is a network namespace with a bridge for its pods, each pod is a
// network namespace with a veth to its node, and nodes are joined through a fabric
// bridge in one more namespace. Each node has a cgroup v2 holding its agent and its
// pods' processes. Every address lives inside these namespaces: the root namespace gets
// no route to the lab's CIDRs and no lab traffic leaves the machine. Everything the lab
// creates carries one name prefix, so Up and Down find and remove what a crashed run
// left.
package lab

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/ferrymesh/ferry/agent/datapath"
	"github.com/ferrymesh/ferry/api/spiffe"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync"
	"syscall"

	"github.com/ferrymesh/ferry/agent/netns"
	"github.com/ferrymesh/ferry/internal/atomicfile"
	"golang.org/x/sys/unix"
)

// ErrNotRoot is returned by Up, Down and Clean when the process is not root.
var ErrNotRoot = errors.New("ferry lab needs root: it creates network namespaces")

// BPFRoot is where the agents' pin folders live: /sys/fs/bpf/<prefix>-<node>.
const BPFRoot = "/sys/fs/bpf"

// descriptionFile is the lab description in the state folder, read by Load.
const descriptionFile = "lab.json"

// Lab is a running lab, built by Up or reattached by Load. Its methods are safe for
// concurrent use.
type Lab struct {
	log *slog.Logger

	mu    sync.Mutex
	desc  description
	procs map[string]*agentProc // agents this process started, by node
	cgfds map[string]int        // open cgroup folders, by node, for CLONE_INTO_CGROUP
	// delays are the delay lines this process runs (Impair), by node.
	delays map[string]*delayLine
	// opDone closes when the operator this process started has been reaped.
	opDone chan struct{}
}

// description is everything another process needs to reattach to the lab.
type description struct {
	Config     Config     `json:"config"`
	CgroupRoot string     `json:"cgroupRoot"`
	Nodes      []nodeInfo `json:"nodes"`
	Pods       []PodInfo  `json:"pods"`
	// Op is the local-mode operator, when the lab runs one.
	Op *operatorInfo `json:"operator,omitempty"`
	// DNS is the lab's DNS responder, when it runs one.
	DNS *dnsInfo `json:"dns,omitempty"`
}

type nodeInfo struct {
	Name      string       `json:"name"`
	Index     int          `json:"index"`
	FabricIP  netip.Addr   `json:"fabricIP"`
	PodCIDR   netip.Prefix `json:"podCIDR"`
	Gateway   netip.Addr   `json:"gateway"`
	Netns     string       `json:"netns"`
	Cgroup    string       `json:"cgroup"`
	Dir       string       `json:"dir"`
	StateFile string       `json:"stateFile"`
	PinDir    string       `json:"pinDir"`
	Socket    string       `json:"socket"`
	LogFile   string       `json:"logFile"`
	AgentPID  int          `json:"agentPID,omitempty"`
	// AgentStart is the agent's start time (clock ticks after boot, from
	// /proc/PID/stat), which tells the agent apart from a later process reusing its PID.
	AgentStart uint64 `json:"agentStart,omitempty"`
	// Draining are agents that handed their listeners to a newer one (UpgradeAgent)
	// and may still carry connections.
	Draining []drainingAgent `json:"draining,omitempty"`
}

// PodInfo describes one pod of the lab.
type PodInfo struct {
	Name           string     `json:"name"`
	Node           string     `json:"node"`
	Namespace      string     `json:"namespace"`
	ServiceAccount string     `json:"serviceAccount"`
	IP             netip.Addr `json:"ip"`
	// Netns is the path of the pod's network namespace.
	Netns    string `json:"netns"`
	Enrolled bool   `json:"enrolled"`
	// Identity is the SPIFFE ID of the pod's certificate (set even when not enrolled).
	Identity string `json:"identity"`
	// UID is the pod's stand-in Kubernetes UID.
	UID string `json:"uid"`
}

// plan computes names, paths and addresses from a defaulted config.
func plan(cfg Config, cgroupMount string) description {
	d := description{Config: cfg, CgroupRoot: filepath.Join(cgroupMount, cfg.Prefix)}
	for i, n := range cfg.Nodes {
		idx := i + 1
		dir := filepath.Join(cfg.StateDir, n.Name)
		d.Nodes = append(d.Nodes, nodeInfo{
			Name:      n.Name,
			Index:     idx,
			FabricIP:  fabricIP(idx),
			PodCIDR:   podCIDR(cfg.PodNet, idx),
			Gateway:   podGateway(cfg.PodNet, idx),
			Netns:     netnsPath(cfg.Prefix + "-" + n.Name),
			Cgroup:    filepath.Join(d.CgroupRoot, n.Name),
			Dir:       dir,
			StateFile: filepath.Join(dir, "state.json"),
			PinDir:    filepath.Join(BPFRoot, cfg.Prefix+"-"+n.Name),
			Socket:    filepath.Join(dir, "agent.sock"),
			LogFile:   filepath.Join(dir, "agent.log"),
		})
		for j, p := range n.Pods {
			d.Pods = append(d.Pods, PodInfo{
				Name:           p.Name,
				Node:           n.Name,
				Namespace:      p.Namespace,
				ServiceAccount: p.ServiceAccount,
				IP:             podIP(cfg.PodNet, idx, j),
				Netns:          netnsPath(cfg.Prefix + "-" + n.Name + "-" + p.Name),
				Enrolled:       p.Enrolled,
				Identity:       spiffe.ID(cfg.TrustDomain, p.Namespace, p.ServiceAccount),
				UID:            podUID(cfg.Prefix, p.Namespace, p.Name),
			})
		}
	}
	return d
}

// podUID is a stable UUID-shaped stand-in for a Kubernetes pod UID.
func podUID(prefix, namespace, name string) string {
	h := sha256.Sum256([]byte(prefix + "/" + namespace + "/" + name))
	h[6] = h[6]&0x0f | 0x50 // version 5 layout, name-based
	h[8] = h[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", h[0:4], h[4:6], h[6:8], h[8:10], h[10:16])
}

// Up removes whatever a previous lab with the same prefix left, then builds the lab:
// namespaces, links, addresses and routes, per-node cgroups, the CA, workload
// certificates and one state file per node, and starts an agent on each node when
// cfg.AgentBinary is set. It logs one line per step. On failure it removes what it
// built.
func Up(ctx context.Context, cfg Config, log *slog.Logger) (*Lab, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	if os.Geteuid() != 0 {
		return nil, ErrNotRoot
	}
	childrenInheritNothing()
	if cfg.StateDir, err = filepath.Abs(cfg.StateDir); err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	if cfg.AgentBinary != "" {
		bin, err := exec.LookPath(cfg.AgentBinary)
		if err != nil {
			return nil, fmt.Errorf("agent binary: %w", err)
		}
		if cfg.AgentBinary, err = filepath.Abs(bin); err != nil {
			return nil, fmt.Errorf("agent binary: %w", err)
		}
	}
	if cfg.Operator.Binary != "" {
		bin, err := exec.LookPath(cfg.Operator.Binary)
		if err != nil {
			return nil, fmt.Errorf("operator binary: %w", err)
		}
		if cfg.Operator.Binary, err = filepath.Abs(bin); err != nil {
			return nil, fmt.Errorf("operator binary: %w", err)
		}
	}
	if cfg.DNS.Binary != "" {
		bin, err := exec.LookPath(cfg.DNS.Binary)
		if err != nil {
			return nil, fmt.Errorf("dns binary: %w", err)
		}
		if cfg.DNS.Binary, err = filepath.Abs(bin); err != nil {
			return nil, fmt.Errorf("dns binary: %w", err)
		}
	}
	cgMount, err := datapath.Cgroup2Mount()
	if err != nil {
		return nil, err
	}
	if err := Clean(cfg.Prefix, cfg.StateDir, log); err != nil {
		return nil, fmt.Errorf("remove previous lab %s: %w", cfg.Prefix, err)
	}
	l := &Lab{log: log, desc: plan(cfg, cgMount), procs: map[string]*agentProc{}, cgfds: map[string]int{}}
	l.planOperator()
	l.planDNS()
	if err := l.build(ctx); err != nil {
		log.Error("lab up failed, removing what was built", "prefix", cfg.Prefix, "error", err)
		if cerr := l.Down(); cerr != nil {
			err = errors.Join(err, cerr)
		}
		return nil, err
	}
	log.Info("lab is up", "prefix", cfg.Prefix, "nodes", len(l.desc.Nodes), "pods", len(l.desc.Pods), "state_dir", cfg.StateDir)
	return l, nil
}

func (l *Lab) build(ctx context.Context) error {
	d := &l.desc
	cfg := d.Config
	if err := os.MkdirAll(cfg.StateDir, 0o755); err != nil {
		return fmt.Errorf("state dir: %w", err)
	}
	// Written first so that Down from another process can tear down a half-built lab.
	if err := l.save(); err != nil {
		return err
	}
	steps := []step{
		{"create fabric namespace", l.buildFabric},
	}
	for i := range d.Nodes {
		n := &d.Nodes[i]
		steps = append(steps, step{"create node " + n.Name, func() error { return l.buildNode(n) }})
		for j := range d.Pods {
			if p := &d.Pods[j]; p.Node == n.Name {
				steps = append(steps, step{"create pod " + p.Name + " on " + n.Name, func() error { return l.buildPod(n, p) }})
			}
		}
	}
	steps = append(steps,
		step{"route pod CIDRs between nodes", l.buildRoutes},
		step{"create node cgroups under " + d.CgroupRoot, l.buildCgroups},
	)
	if d.DNS != nil {
		steps = append(steps,
			step{"write the pods' resolv.conf in " + d.DNS.Dir, l.writeResolvConfs},
			step{"start the DNS responder on every node's pod gateway, port 53", func() error { return l.startDNS(ctx) }},
		)
	}
	switch {
	case d.Op != nil:
		steps = append(steps,
			step{"write manifests for the local-mode operator in " + d.Op.ManifestDir, l.writeManifests},
			step{"start the operator (local mode)", func() error { return l.StartOperator(ctx) }},
		)
	case !cfg.usesOperator():
		steps = append(steps, step{"issue certificates and write node state files", l.writeStates})
	}
	for _, s := range steps {
		if err := ctx.Err(); err != nil {
			return err
		}
		l.log.Info(s.msg)
		if err := s.fn(); err != nil {
			return err
		}
	}
	if cfg.AgentBinary == "" {
		l.log.Info("no agent binary: nodes run without agents")
		return nil
	}
	for _, n := range d.Nodes {
		if err := ctx.Err(); err != nil {
			return err
		}
		l.log.Info("start agent on " + n.Name)
		if err := l.StartAgent(n.Name); err != nil {
			return err
		}
	}
	return nil
}

// step is one logged stage of Up.
type step struct {
	msg string
	fn  func() error
}

func (l *Lab) fabricName() string { return l.desc.Config.Prefix + "-fabric" }

func (l *Lab) buildFabric() error {
	if err := createNetns(l.fabricName()); err != nil {
		return err
	}
	fab, err := openNS(l.fabricName())
	if err != nil {
		return err
	}
	defer fab.Close()
	return fab.addBridge("br0", netip.Prefix{})
}

// buildNode creates the node namespace, its uplink to the fabric bridge and the bridge
// for its pods.
func (l *Lab) buildNode(n *nodeInfo) error {
	name := filepath.Base(n.Netns)
	if err := createNetns(name); err != nil {
		return err
	}
	fab, err := openNS(l.fabricName())
	if err != nil {
		return err
	}
	defer fab.Close()
	node, err := openNS(name)
	if err != nil {
		return err
	}
	defer node.Close()
	if err := fab.addVeth(fmt.Sprintf("n%d", n.Index), "br0", node, "eth0"); err != nil {
		return err
	}
	if err := node.addAddr("eth0", netip.PrefixFrom(n.FabricIP, FabricCIDR().Bits())); err != nil {
		return err
	}
	if err := node.up("eth0"); err != nil {
		return err
	}
	if err := node.addBridge("br0", netip.PrefixFrom(n.Gateway, n.PodCIDR.Bits())); err != nil {
		return err
	}
	return sysctl(name, "net/ipv4/ip_forward", "1")
}

// buildPod creates the pod namespace with a veth to its node's bridge.
func (l *Lab) buildPod(n *nodeInfo, p *PodInfo) error {
	name := filepath.Base(p.Netns)
	if err := createNetns(name); err != nil {
		return err
	}
	node, err := openNS(filepath.Base(n.Netns))
	if err != nil {
		return err
	}
	defer node.Close()
	pod, err := openNS(name)
	if err != nil {
		return err
	}
	defer pod.Close()
	// Host-side names only need to be unique within the node namespace.
	if err := node.addVeth(fmt.Sprintf("p%d", int(p.IP.As4()[3])), "br0", pod, "eth0"); err != nil {
		return err
	}
	if err := pod.addAddr("eth0", netip.PrefixFrom(p.IP, n.PodCIDR.Bits())); err != nil {
		return err
	}
	if err := pod.up("eth0"); err != nil {
		return err
	}
	return pod.addRoute(netip.Prefix{}, n.Gateway)
}

// buildRoutes gives every node a route to every other node's pod CIDR.
func (l *Lab) buildRoutes() error {
	for _, n := range l.desc.Nodes {
		c, err := openNS(filepath.Base(n.Netns))
		if err != nil {
			return err
		}
		for _, other := range l.desc.Nodes {
			if other.Name == n.Name {
				continue
			}
			if err := c.addRoute(other.PodCIDR, other.FabricIP); err != nil {
				c.Close()
				return err
			}
		}
		c.Close()
	}
	return nil
}

func (l *Lab) buildCgroups() error {
	for _, n := range l.desc.Nodes {
		if err := os.MkdirAll(n.Cgroup, 0o755); err != nil {
			return fmt.Errorf("create cgroup: %w", err)
		}
		// 0700 as the agent's own folder would be: its sockets and state.
		if err := os.MkdirAll(n.Dir, 0o700); err != nil {
			return fmt.Errorf("node state dir: %w", err)
		}
	}
	return nil
}

// Load reattaches to the lab with this prefix in the default state folder.
func Load(prefix string) (*Lab, error) { return LoadDir(StateDirFor(prefix)) }

// LoadDir reattaches to the lab whose state folder is dir.
func LoadDir(dir string) (*Lab, error) {
	data, err := os.ReadFile(filepath.Join(dir, descriptionFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("no lab is up here (no %s); start one with 'ferry lab up': %w", filepath.Join(dir, descriptionFile), os.ErrNotExist)
	}
	if err != nil {
		return nil, fmt.Errorf("load lab: %w", err)
	}
	var d description
	if err := json.Unmarshal(data, &d); err != nil {
		return nil, fmt.Errorf("load lab %s: %w", dir, err)
	}
	childrenInheritNothing()
	return &Lab{log: slog.New(slog.DiscardHandler), desc: d, procs: map[string]*agentProc{}, cgfds: map[string]int{}}, nil
}

// SetLogger replaces the logger of a lab from Load (which logs nothing).
func (l *Lab) SetLogger(log *slog.Logger) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.log = log
}

// save writes the lab description atomically.
func (l *Lab) save() error {
	data, err := json.MarshalIndent(l.desc, "", "  ")
	if err != nil {
		return fmt.Errorf("save lab: %w", err)
	}
	p := filepath.Join(l.desc.Config.StateDir, descriptionFile)
	if err := atomicfile.Write(p, data, 0o644); err != nil {
		return fmt.Errorf("save lab: %w", err)
	}
	return nil
}

// Config returns the lab's config with defaults filled in.
func (l *Lab) Config() Config {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.desc.Config
}

// Prefix is the name prefix of everything the lab created.
func (l *Lab) Prefix() string { return l.Config().Prefix }

// Nodes lists the node names in order.
func (l *Lab) Nodes() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]string, len(l.desc.Nodes))
	for i, n := range l.desc.Nodes {
		out[i] = n.Name
	}
	return out
}

// Pods lists every pod.
func (l *Lab) Pods() []PodInfo {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]PodInfo(nil), l.desc.Pods...)
}

// Pod returns the pod named name; ok is false when there is none.
func (l *Lab) Pod(name string) (PodInfo, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, p := range l.desc.Pods {
		if p.Name == name {
			return p, true
		}
	}
	return PodInfo{}, false
}

// node returns the node named name; the caller holds l.mu.
func (l *Lab) node(name string) (*nodeInfo, error) {
	for i := range l.desc.Nodes {
		if l.desc.Nodes[i].Name == name {
			return &l.desc.Nodes[i], nil
		}
	}
	return nil, fmt.Errorf("lab %s has no node %q", l.desc.Config.Prefix, name)
}

// NodeCgroup returns the path of the node's cgroup v2.
func (l *Lab) NodeCgroup(node string) (string, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	n, err := l.node(node)
	if err != nil {
		return "", err
	}
	return n.Cgroup, nil
}

// StateFile returns the path of the node's state file (ferryv1.NodeState, protojson).
func (l *Lab) StateFile(node string) (string, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	n, err := l.node(node)
	if err != nil {
		return "", err
	}
	return n.StateFile, nil
}

// NetnsPath returns the namespace path of a pod, a node, or "fabric".
func (l *Lab) NetnsPath(name string) (string, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if name == "fabric" {
		return netnsPath(l.fabricName()), nil
	}
	for _, p := range l.desc.Pods {
		if p.Name == name {
			return p.Netns, nil
		}
	}
	n, err := l.node(name)
	if err != nil {
		return "", fmt.Errorf("lab %s has no pod or node %q", l.desc.Config.Prefix, name)
	}
	return n.Netns, nil
}

// Netns opens the network namespace of a pod, a node, or "fabric". The caller
// closes it.
func (l *Lab) Netns(name string) (*netns.Handle, error) {
	p, err := l.NetnsPath(name)
	if err != nil {
		return nil, err
	}
	return netns.Open(p)
}

// Command prepares a process that runs in the pod's network namespace and its node's
// cgroup, with FERRY_LAB_POD, FERRY_LAB_NODE and FERRY_LAB_IP in its environment and,
// when the lab runs DNS, the pod's resolv.conf as /etc/resolv.conf.
// Errors (an unknown pod) surface from Start or Run.
func (l *Lab) Command(ctx context.Context, pod string, name string, args ...string) *exec.Cmd {
	p, ok := l.Pod(pod)
	cmd := l.podCommand(ctx, p, name, args...)
	if !ok {
		cmd.Err = fmt.Errorf("lab %s has no pod %q", l.Prefix(), pod)
		return cmd
	}
	fd, err := l.cgroupFD(p.Node)
	if err != nil {
		cmd.Err = err
		return cmd
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: fd}
	cmd.Env = append(os.Environ(),
		"FERRY_LAB_POD="+p.Name,
		"FERRY_LAB_NODE="+p.Node,
		"FERRY_LAB_IP="+p.IP.String(),
	)
	return cmd
}

// cgroupFD returns an open descriptor of the node's cgroup, kept until Close so that
// commands prepared by Command can start later.
func (l *Lab) cgroupFD(node string) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if fd, ok := l.cgfds[node]; ok {
		return fd, nil
	}
	n, err := l.node(node)
	if err != nil {
		return -1, err
	}
	fd, err := unix.Open(n.Cgroup, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open cgroup of %s: %w", node, err)
	}
	l.cgfds[node] = fd
	return fd, nil
}

// Close heals the nodes whose delay line this process runs and releases the lab's
// open descriptors; the lab keeps running.
func (l *Lab) Close() error {
	err := l.healDelayed()
	l.mu.Lock()
	defer l.mu.Unlock()
	for node, fd := range l.cgfds {
		unix.Close(fd)
		delete(l.cgfds, node)
	}
	return err
}

// Status is a snapshot of the lab.
type Status struct {
	Prefix   string       `json:"prefix"`
	StateDir string       `json:"stateDir"`
	Nodes    []NodeStatus `json:"nodes"`
	Pods     []PodInfo    `json:"pods"`
	// Operator is the local-mode operator, when the lab runs one.
	Operator *OperatorStatus `json:"operator,omitempty"`
	// DNS is the lab's DNS responder, when it runs one.
	DNS *DNSStatus `json:"dns,omitempty"`
}

// OperatorStatus is the lab's local-mode operator in a Status.
type OperatorStatus struct {
	PID       int    `json:"pid"`
	Alive     bool   `json:"alive"`
	Manifests string `json:"manifests"`
	Socket    string `json:"socket"`
	Log       string `json:"log"`
}

// NodeStatus is one node in a Status.
type NodeStatus struct {
	Name        string       `json:"name"`
	FabricIP    netip.Addr   `json:"fabricIP"`
	PodCIDR     netip.Prefix `json:"podCIDR"`
	Netns       string       `json:"netns"`
	Cgroup      string       `json:"cgroup"`
	StateFile   string       `json:"stateFile"`
	AgentSocket string       `json:"agentSocket"`
	AgentLog    string       `json:"agentLog"`
	// AgentPID is the last agent started on the node (0: none); AgentAlive says
	// whether it still runs.
	AgentPID   int  `json:"agentPID"`
	AgentAlive bool `json:"agentAlive"`
}

// Status reports the lab's nodes, pods and agents.
func (l *Lab) Status() Status {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := Status{Prefix: l.desc.Config.Prefix, StateDir: l.desc.Config.StateDir, Pods: append([]PodInfo(nil), l.desc.Pods...), DNS: l.dnsStatusLocked()}
	if op := l.desc.Op; op != nil {
		s.Operator = &OperatorStatus{PID: op.PID, Alive: op.PID != 0 && pidAlive(op.PID, op.Start), Manifests: op.ManifestDir, Socket: op.Socket, Log: op.LogFile}
		for i := range s.Pods {
			if slices.Contains(op.Unenrolled, s.Pods[i].Namespace) {
				s.Pods[i].Enrolled = false // SetNamespaceEnrolled took the label away
			}
		}
	}
	for i := range l.desc.Nodes {
		n := &l.desc.Nodes[i]
		s.Nodes = append(s.Nodes, NodeStatus{
			Name:        n.Name,
			FabricIP:    n.FabricIP,
			PodCIDR:     n.PodCIDR,
			Netns:       n.Netns,
			Cgroup:      n.Cgroup,
			StateFile:   n.StateFile,
			AgentSocket: n.Socket,
			AgentLog:    n.LogFile,
			AgentPID:    n.AgentPID,
			AgentAlive:  l.agentAliveLocked(n),
		})
	}
	return s
}
