// This file brings up real Kubernetes nodes beside the API server: kube-scheduler,
// kube-controller-manager, and nodes made of containerd, kubelet and kube-proxy,
// each node in a network and a mount namespace of its own, with pods on a CNI
// bridge inside it, and a cluster DNS for Services. Nothing of the nodes' network
// reaches the root namespace: each node's only way out is a veth to a bridge in a
// fabric namespace, and the nodes and their pods reach the API server through a
// forwarder this process listens with inside each node's namespace, on the node's
// address: the "kubernetes" Service's endpoints, so in-cluster clients work as on
// any cluster.

package kubetest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/agent/netns"
	"github.com/ferrymesh/ferry/internal/hackbuild"
	"github.com/ferrymesh/ferry/internal/privileged"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// Names and addresses of the test nodes: node i (from 1) is kn-nodeI at
// 10.251.0.(10+I) with pods in 10.244.I.0/24, all on one bridge in a fabric
// namespace. The prefix "kn" is this harness's own, so a crashed run's leftovers
// are found by name and removed at the next start.
const (
	// ClusterCIDR holds every node's pod range.
	ClusterCIDR = "10.244.0.0/16"
	fabricNetns = "kn-fabric"
	// FabricNetnsPath is the namespace of the bridge between the nodes: what
	// crosses between nodes is seen there.
	FabricNetnsPath = "/run/netns/" + fabricNetns
	fabricIP        = "10.251.0.1"
	fabricNet       = "/24"
	// apiPort is where the forwarder to the API server listens in each node's
	// namespace, on loopback (kubelet, kube-proxy) and the node's address (pods,
	// through the "kubernetes" Service).
	apiPort = "6443"
	// ClusterDomain is the DNS domain of Services: NAME.NAMESPACE.svc.ClusterDomain,
	// answered on each node's address (kubelet's clusterDNS).
	ClusterDomain = "cluster.local"
	// MaxNodes is as many nodes as one machine's tests bring up.
	MaxNodes = 4

	nodeReadyTimeout = 3 * time.Minute
)

// nodeLock is held by the test running the nodes.
const nodeLock = "/run/kubetest-node.lock"

// Node is one running Kubernetes node: containerd, kubelet and kube-proxy in the
// network namespace NetnsPath and a mount namespace of their own, registered with
// the API server as Name.
type Node struct {
	Name    string // kn-node1
	IP      string // its InternalIP on the fabric, 10.251.0.11
	PodCIDR string // 10.244.1.0/24
	// NetnsPath is the node's network namespace (/run/netns/kn-node1); pods' IPs
	// are reachable from inside it.
	NetnsPath string
	// Ctr is the path of containerd's ctr client, and CtrArgs its flags for this
	// node's containerd (address and the "k8s.io" namespace kubelet uses).
	Ctr     string
	CtrArgs []string
	// Dir holds the node's files: configs, logs, containerd's and kubelet's state.
	Dir string
	// Kubeconfig reaches the API server from inside the node's network namespace
	// (the forwarder on 127.0.0.1:6443) with the node's credentials (kubelet's,
	// also in system:masters): for a program the test runs there.
	Kubeconfig string

	ns    *netns.Handle
	mnt   *process   // holds the node's mount namespace
	procs []*process // containerd, kubelet, kube-proxy, in start order
}

// NodeBinaries are the programs of a node, built by hack/build-node.sh.
type NodeBinaries struct {
	Dir string // the cache folder build-node.sh printed
}

func (b NodeBinaries) path(name string) string { return filepath.Join(b.Dir, name) }

// StartNodes runs kube-scheduler, kube-controller-manager and count nodes against
// c, imports the image tarballs into each node's containerd, waits until every
// node is Ready, and removes everything when t ends. sandboxImage is the image
// reference of the pause container, which must be among the tarballs.
//
// Each node is what a machine is to a real cluster: its own network namespace
// (pods on a CNI bridge inside it, other nodes' pod ranges routed over the
// fabric) and its own mount namespace, in which /run/ferry is a folder of the
// node's and /sys/fs/bpf a bpffs of its own, so two nodes' agents share no state
// folder and no pins. The cgroup hierarchy is the machine's, shared as a kernel's
// is by everything on it.
func (c *Cluster) StartNodes(t testing.TB, bins NodeBinaries, sandboxImage string, tarballs []string, count int) []*Node {
	t.Helper()
	privileged.Require(t)
	if count < 1 || count > MaxNodes {
		t.Fatalf("kubenode: %d nodes: want 1 to %d", count, MaxNodes)
	}
	runc := privileged.LookPath(t, "runc", "Debian runc, hack/install-deps.sh")
	if _, err := os.Stat("/usr/lib/cni/bridge"); err != nil {
		privileged.Missing(t, "CNI plugins not installed (Debian containernetworking-plugins, hack/install-deps.sh): %v", err)
	}
	// One cluster of nodes at a time on this machine: the nodes' names and
	// addresses are fixed, and go test runs packages side by side. The lock is held
	// until t ends (the cleanup registered first runs last).
	lock, err := os.OpenFile(nodeLock, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatalf("kubenode: %v", err)
	}
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		t.Logf("kubenode: another test runs nodes; waiting for %s", nodeLock)
		if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
			t.Fatalf("kubenode: lock %s: %v", nodeLock, err)
		}
	}
	t.Cleanup(func() { lock.Close() })

	var nodes []*Node
	var control []*process
	netnsBefore := cniNetns()
	t.Cleanup(func() {
		for i := len(nodes) - 1; i >= 0; i-- {
			nodes[i].stop(t)
		}
		for i := len(control) - 1; i >= 0; i-- {
			if err := control[i].stop(stopGrace); err != nil {
				t.Errorf("kubenode: %v", err)
			}
		}
		if t.Failed() {
			for _, p := range control {
				t.Log(p.logTail(logTailLines))
			}
		}
		removeNetworks(t)
		// The CNI plugin's pod namespaces were mounted in the nodes' mount
		// namespaces, gone now; the files they were mounted on are the machine's.
		for name := range cniNetns() {
			if !netnsBefore[name] {
				os.Remove(filepath.Join("/run/netns", name))
			}
		}
		for _, n := range nodes {
			n.removeDir(t)
		}
	})
	fail := func(format string, args ...any) {
		t.Helper()
		for _, p := range control {
			t.Log(p.logTail(logTailLines))
		}
		for _, n := range nodes {
			n.logTails(t)
		}
		t.Fatalf("kubenode: "+format, args...)
	}

	killShims("/run/kn-") // a crashed run's pods
	removeNetworks(t)
	for i := 1; i <= count; i++ {
		// Short paths: containerd's and the shims' unix sockets must fit in 108 bytes.
		dir, err := os.MkdirTemp("/run", "kn-")
		if err != nil {
			fail("node folder: %v", err)
		}
		name := fmt.Sprintf("kn-node%d", i)
		n := &Node{Name: name, IP: fmt.Sprintf("10.251.0.%d", 10+i), PodCIDR: fmt.Sprintf("10.244.%d.0/24", i),
			Dir: dir, NetnsPath: "/run/netns/" + name, Ctr: bins.path("ctr")}
		n.CtrArgs = []string{"--address", filepath.Join(dir, "containerd.sock"), "--namespace", "k8s.io"}
		n.Kubeconfig = filepath.Join(dir, "kubelet.kubeconfig")
		nodes = append(nodes, n)
	}
	if err := makeNetworks(nodes); err != nil {
		fail("networks: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	for _, n := range nodes {
		if n.ns, err = netns.Open(n.NetnsPath); err != nil {
			fail("open %s netns: %v", n.Name, err)
		}
		if err := n.forwardAPI(ctx, strings.TrimPrefix(c.URL, "https://")); err != nil {
			fail("%s API forwarder: %v", n.Name, err)
		}
	}
	if err := c.pointKubernetesService(ctx, nodes); err != nil {
		fail("%v", err)
	}
	if err := c.serveDNS(ctx, nodes); err != nil {
		fail("cluster DNS: %v", err)
	}

	// The scheduler and the controller manager talk to the API server directly, from
	// the root namespace, with the admin's kubeconfig.
	for _, args := range [][]string{
		{"kube-scheduler", "--kubeconfig=" + c.Kubeconfig, "--leader-elect=false", "--secure-port=0", "--v=1"},
		{"kube-controller-manager", "--kubeconfig=" + c.Kubeconfig, "--leader-elect=false", "--secure-port=0",
			"--use-service-account-credentials=false", "--root-ca-file=" + c.caFile(), "--controllers=*,-nodeipam", "--v=1"},
	} {
		p, err := startProcess(args[0], filepath.Join(nodes[0].Dir, args[0]+".log"), bins.path(args[0]), args[1:]...)
		if err != nil {
			fail("%v", err)
		}
		control = append(control, p)
	}
	for _, n := range nodes {
		if err := n.start(c, bins, runc, sandboxImage, tarballs); err != nil {
			fail("%s: %v", n.Name, err)
		}
	}
	if err := c.waitNodesReady(nodes, control); err != nil {
		fail("%v", err)
	}
	return nodes
}

// start brings up the node's mount namespace, containerd (with the tarballs
// imported), kubelet and kube-proxy, without waiting for the node to be Ready.
func (n *Node) start(c *Cluster, bins NodeBinaries, runc, sandboxImage string, tarballs []string) error {
	files, err := n.configs(c, runc, sandboxImage)
	if err != nil {
		return fmt.Errorf("configs: %w", err)
	}
	for _, d := range []string{"cni", "ferry"} {
		if err := os.Mkdir(filepath.Join(n.Dir, d), 0o755); err != nil {
			return err
		}
	}
	if err := writeFiles(files); err != nil {
		return fmt.Errorf("configs: %w", err)
	}
	if err := n.holdMounts(); err != nil {
		return err
	}
	run := func(name string, args ...string) (*process, error) {
		args = append([]string{fmt.Sprintf("--mount=/proc/%d/ns/mnt", n.mnt.cmd.Process.Pid), "--net=" + n.NetnsPath, "--"}, args...)
		p, err := startProcess(n.Name+" "+name, filepath.Join(n.Dir, name+".log"), "/usr/bin/nsenter", args...)
		if err != nil {
			return nil, err
		}
		n.procs = append(n.procs, p)
		return p, nil
	}
	ctrd, err := run("containerd", bins.path("containerd"), "--config", filepath.Join(n.Dir, "containerd.toml"))
	if err != nil {
		return err
	}
	if err := n.waitContainerd(ctrd); err != nil {
		return err
	}
	for _, tb := range tarballs {
		if out, err := exec.Command(n.Ctr, append(n.CtrArgs, "images", "import", "--platform", "linux/amd64", tb)...).CombinedOutput(); err != nil {
			return fmt.Errorf("ctr images import %s: %v: %s", tb, err, out)
		}
	}
	if _, err := run("kubelet", bins.path("kubelet"),
		"--config="+filepath.Join(n.Dir, "kubelet.yaml"),
		"--kubeconfig="+n.Kubeconfig,
		"--root-dir="+filepath.Join(n.Dir, "kubelet"),
		"--cert-dir="+filepath.Join(n.Dir, "kubelet-pki"),
		"--hostname-override="+n.Name,
		"--node-ip="+n.IP,
		"--v=2"); err != nil {
		return err
	}
	// Service cluster IPs, as on any cluster: iptables rules in the node's
	// namespace only (its conntrack table is that namespace's too: no limits set).
	_, err = run("kube-proxy", bins.path("kube-proxy"),
		"--kubeconfig="+n.Kubeconfig,
		"--hostname-override="+n.Name,
		"--proxy-mode=iptables",
		"--cluster-cidr="+ClusterCIDR,
		"--conntrack-max-per-core=0",
		"--metrics-bind-address=127.0.0.1:10249",
		"--healthz-bind-address=127.0.0.1:10256",
		"--v=1")
	return err
}

// holdMounts starts the process that holds the node's mount namespace, a slave
// of the machine's (the machine's mounts reach it, its own stay inside): there
// /run/ferry is the node's folder ferry/ and /sys/fs/bpf a fresh bpffs, shared,
// because containerd refuses the Bidirectional propagation pods ask for on a
// private mount (Ferry's bpffs init container: "not a shared mount"), and systemd
// makes every mount shared on a real node.
func (n *Node) holdMounts() error {
	if err := os.MkdirAll("/run/ferry", 0o755); err != nil {
		return err
	}
	// The machine's own bpffs, if it has one, is unmounted here first: containerd
	// checks the first mount it finds on the path, not the top one. The script
	// writes mounts.ready once its namespace is made: until then /proc/PID is still
	// the machine's namespace (or a half-made one), whose /sys/fs/bpf may already
	// be a bpffs (another test's), and containerd must not be started in it.
	ready := filepath.Join(n.Dir, "mounts.ready")
	script := fmt.Sprintf("while umount /sys/fs/bpf 2>/dev/null; do :; done; mount --bind %s /run/ferry && mount -t bpf bpf /sys/fs/bpf && mount --make-shared /sys/fs/bpf && : > %s && exec sleep infinity",
		filepath.Join(n.Dir, "ferry"), ready)
	p, err := startProcess(n.Name+" mounts", filepath.Join(n.Dir, "mounts.log"), "/usr/bin/unshare", "--mount", "--propagation", "slave", "/bin/sh", "-c", script)
	if err != nil {
		return err
	}
	n.mnt = p
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(ready); err == nil {
			var fs unix.Statfs_t
			if err := unix.Statfs(n.HostPath("/sys/fs/bpf"), &fs); err != nil || fs.Type != unix.BPF_FS_MAGIC {
				return fmt.Errorf("mount namespace: no bpffs on /sys/fs/bpf (%v)", err)
			}
			return nil
		}
		if exited, err := p.exitErr(); exited {
			return fmt.Errorf("mount namespace: %v\n%s", err, p.logTail(logTailLines))
		}
		if time.Now().After(deadline) {
			return errors.New("mount namespace: not made after 10s")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// HostPath is the path by which the test reaches path as the node's processes
// (and the pods' hostPath volumes) see it: /sys/fs/bpf/ferry in the node's
// mount namespace, say.
func (n *Node) HostPath(path string) string {
	return fmt.Sprintf("/proc/%d/root%s", n.mnt.cmd.Process.Pid, path)
}

// stop stops kubelet, then the pods, containerd and what holds the node's mounts.
func (n *Node) stop(t testing.TB) {
	for i := len(n.procs) - 1; i >= 0; i-- {
		if i == 0 {
			// Kubelet is stopped: nothing restarts the pods that containerd,
			// still up, now stops.
			n.removeSandboxes()
		}
		if err := n.procs[i].stop(stopGrace); err != nil {
			t.Errorf("kubenode: %v", err)
		}
	}
	if t.Failed() {
		n.logTails(t)
	}
	killShims(n.Dir)
	if n.mnt != nil {
		if err := n.mnt.stop(stopGrace); err != nil {
			t.Errorf("kubenode: %v", err)
		}
	}
	if n.ns != nil {
		n.ns.Close()
	}
}

func (n *Node) logTails(t testing.TB) {
	for _, p := range n.procs {
		t.Log(p.logTail(logTailLines))
	}
}

// removeDir removes the node's folder, once nothing of the node runs.
func (n *Node) removeDir(t testing.TB) {
	if err := unmountUnder(n.Dir); err != nil {
		t.Errorf("kubenode: %v", err)
	}
	if err := os.RemoveAll(n.Dir); err != nil {
		t.Errorf("kubenode: remove %s: %v", n.Dir, err)
	}
}

// Do runs fn inside the node's network namespace, on a locked OS thread: a
// connection dialled there reaches pods' IPs.
func (n *Node) Do(fn func() error) error { return n.ns.Do(fn) }

// caFile writes the cluster CA next to the kubeconfig once and returns its path.
func (c *Cluster) caFile() string {
	return filepath.Join(filepath.Dir(c.Kubeconfig), "pki", "ca.crt")
}

// configs writes kubelet's kubeconfig (n.Kubeconfig) and returns the node's other
// config files by path: containerd's, the CNI network's, kubelet's.
func (n *Node) configs(c *Cluster, runc, sandboxImage string) (map[string][]byte, error) {
	certPEM, keyPEM, err := c.ca.client("system:node:"+n.Name, []string{"system:nodes", "system:masters"})
	if err != nil {
		return nil, fmt.Errorf("kubelet certificate: %w", err)
	}
	if err := writeKubeconfig(n.Kubeconfig, "https://127.0.0.1:"+apiPort, c.ca.certPEM, certPEM, keyPEM); err != nil {
		return nil, err
	}

	d := n.Dir
	containerd := fmt.Sprintf(`version = 3
root = %[1]q
state = %[2]q

[grpc]
  address = %[3]q

[ttrpc]
  address = %[4]q

[plugins.'io.containerd.cri.v1.images']
  snapshotter = 'native'
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = %[5]q

[plugins.'io.containerd.cri.v1.runtime']
  # This machine's root has no CAP_SYS_RESOURCE, so runc may not lower a
  # process's oom_score_adj (kubelet asks -998 for sandboxes: runc init fails with
  # "can't get final child's PID from pipe"). Restricted, containerd clamps the
  # scores to its own, as for rootless containerd.
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = 'runc'
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = 'io.containerd.runc.v2'
      snapshotter = 'native'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = %[6]q
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ['/usr/lib/cni']
    conf_dir = %[7]q

# NRI's socket is one path for the machine (/var/run/nri/nri.sock), and another
# node's containerd would take it over.
[plugins.'io.containerd.nri.v1.nri']
  disable = true

[plugins.'io.containerd.grpc.v1.cri']
  disable_tcp_service = true
  stream_server_address = %[8]q
  stream_server_port = '0'
`, filepath.Join(d, "containerd"), filepath.Join(d, "containerd-state"), filepath.Join(d, "containerd.sock"),
		filepath.Join(d, "containerd-ttrpc.sock"), sandboxImage, runc, filepath.Join(d, "cni"), n.IP)

	cni := fmt.Sprintf(`{
  "cniVersion": "1.0.0",
  "name": "kn-pods",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {"type": "host-local", "ranges": [[{"subnet": %q}]], "routes": [{"dst": "0.0.0.0/0"}], "dataDir": %q}
    },
    {"type": "loopback"}
  ]
}
`, n.PodCIDR, filepath.Join(d, "cni-ipam"))

	// cgroup v1 (this machine's hierarchy is hybrid): kubelet 1.35+ refuses it unless
	// failCgroupV1 is false. No QoS cgroups and no node-allocatable enforcement: the
	// node shares the machine with the tests and should touch as little as it can.
	kubelet := fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix://%[1]s
address: %[2]s
port: 10250
readOnlyPort: 0
healthzPort: 0
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: %[3]q}
authorization: {mode: AlwaysAllow}
cgroupDriver: cgroupfs
failCgroupV1: false
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
podCIDR: %[4]s
podLogsDir: %[5]q
clusterDNS: [%[2]s]
clusterDomain: %[6]s
resolvConf: ""
localStorageCapacityIsolation: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {}
serializeImagePulls: false
registerNode: true
maxPods: 20
`, filepath.Join(d, "containerd.sock"), n.IP, c.caFile(), n.PodCIDR, filepath.Join(d, "pod-logs"), ClusterDomain)

	return map[string][]byte{
		filepath.Join(d, "containerd.toml"):       []byte(containerd),
		filepath.Join(d, "cni", "10-kn.conflist"): []byte(cni),
		filepath.Join(d, "kubelet.yaml"):          []byte(kubelet),
	}, nil
}

// forwardAPI listens on apiPort on every address inside the node's namespace and
// copies each connection to the API server's address in the root namespace. The
// API server's serving certificate names 127.0.0.1 and the "kubernetes" Service's
// cluster IP, so kubelet's and pods' TLS checks hold.
func (n *Node) forwardAPI(ctx context.Context, apiAddr string) error {
	var ln net.Listener
	err := n.ns.Do(func() error {
		var lc net.ListenConfig
		lc.SetMultipathTCP(false)
		var err error
		ln, err = lc.Listen(ctx, "tcp", ":"+apiPort)
		return err
	})
	if err != nil {
		return fmt.Errorf("listen in node netns: %w", err)
	}
	context.AfterFunc(ctx, func() { ln.Close() })
	go func() {
		for {
			in, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer in.Close()
				var d net.Dialer
				out, err := d.DialContext(ctx, "tcp", apiAddr)
				if err != nil {
					return
				}
				defer out.Close()
				stop := context.AfterFunc(ctx, func() { in.Close(); out.Close() })
				defer stop()
				var wg sync.WaitGroup
				wg.Add(1)
				go func() {
					defer wg.Done()
					io.Copy(out, in)
					out.(*net.TCPConn).CloseWrite()
				}()
				io.Copy(in, out)
				in.(*net.TCPConn).CloseWrite()
				wg.Wait()
			}()
		}
	}()
	return nil
}

func (n *Node) waitContainerd(p *process) error {
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		if exited, err := p.exitErr(); exited {
			return err
		}
		if err := exec.Command(n.Ctr, append(n.CtrArgs, "version")...).Run(); err == nil {
			return nil
		}
		time.Sleep(200 * time.Millisecond)
	}
	return errors.New("containerd not answering after 1m")
}

func (c *Cluster) waitNodesReady(nodes []*Node, control []*process) error {
	client, err := kubernetes.NewForConfig(c.RestConfig)
	if err != nil {
		return fmt.Errorf("client: %w", err)
	}
	procs := control
	for _, n := range nodes {
		procs = append(procs, n.procs...)
	}
	deadline := time.Now().Add(nodeReadyTimeout)
	for _, n := range nodes {
		last := "not registered"
		for ready := false; !ready; {
			if time.Now().After(deadline) {
				return fmt.Errorf("node %s not Ready after %v (%s)", n.Name, nodeReadyTimeout, last)
			}
			for _, p := range procs {
				if exited, err := p.exitErr(); exited {
					return err
				}
			}
			node, err := client.CoreV1().Nodes().Get(context.Background(), n.Name, metav1.GetOptions{})
			if err == nil {
				for _, cond := range node.Status.Conditions {
					if cond.Type == corev1.NodeReady {
						ready = cond.Status == corev1.ConditionTrue
						last = cond.Reason + ": " + cond.Message
					}
				}
			}
			if !ready {
				time.Sleep(time.Second)
			}
		}
	}
	return nil
}

// removeSandboxes stops and removes the pods' containers kubelet left, through
// containerd, so their processes and network namespaces do not outlive the test.
func (n *Node) removeSandboxes() {
	out, err := exec.Command(n.Ctr, append(n.CtrArgs, "tasks", "ls", "-q")...).Output()
	if err != nil {
		return // containerd is not answering: killShims sweeps up
	}
	for _, id := range strings.Fields(string(out)) {
		exec.Command(n.Ctr, append(n.CtrArgs, "tasks", "kill", "-s", "SIGKILL", id)...).Run()
		time.Sleep(100 * time.Millisecond)
		exec.Command(n.Ctr, append(n.CtrArgs, "tasks", "rm", "-f", id)...).Run()
	}
	ids, _ := exec.Command(n.Ctr, append(n.CtrArgs, "containers", "ls", "-q")...).Output()
	for _, id := range strings.Fields(string(ids)) {
		exec.Command(n.Ctr, append(n.CtrArgs, "containers", "rm", id)...).Run()
	}
}

// killShims kills every containerd shim serving a containerd whose socket is
// below dir, and the containers under it (the shim is their subreaper, so they
// are its descendants): a shim outlives its containerd, and a pod's agent left
// running holds the node's lock for the next test's.
func killShims(dir string) {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return
	}
	children := map[int][]int{}
	var shims []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...: comm may hold spaces, so split after ")".
		f := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+1:]))
		if len(f) < 2 {
			continue
		}
		ppid, _ := strconv.Atoi(f[1])
		children[ppid] = append(children[ppid], pid)
		cmdline, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		args := strings.Split(string(cmdline), "\x00")
		if len(args) > 0 && filepath.Base(args[0]) == "containerd-shim-runc-v2" {
			for i, a := range args {
				if a == "-address" && i+1 < len(args) && strings.HasPrefix(args[i+1], dir) {
					shims = append(shims, pid)
				}
			}
		}
	}
	var kill func(pid int)
	kill = func(pid int) {
		syscall.Kill(pid, syscall.SIGKILL)
		for _, c := range children[pid] {
			kill(c)
		}
	}
	for _, pid := range shims {
		kill(pid)
	}
}

// makeNetworks makes the fabric (one bridge) and each node's namespace on it,
// with routes to the other nodes' pod ranges through their addresses.
func makeNetworks(nodes []*Node) error {
	steps := [][]string{
		{"netns", "add", fabricNetns},
		{"-n", fabricNetns, "link", "set", "lo", "up"},
		{"-n", fabricNetns, "link", "add", "kn-br0", "type", "bridge"},
		{"-n", fabricNetns, "addr", "add", fabricIP + fabricNet, "dev", "kn-br0"},
		{"-n", fabricNetns, "link", "set", "kn-br0", "up"},
	}
	for _, n := range nodes {
		up := n.Name + "-up"
		steps = append(steps, [][]string{
			{"netns", "add", n.Name},
			{"-n", n.Name, "link", "set", "lo", "up"},
			{"-n", n.Name, "link", "add", "eth0", "type", "veth", "peer", "name", up, "netns", fabricNetns},
			{"-n", fabricNetns, "link", "set", up, "master", "kn-br0", "up"},
			{"-n", n.Name, "addr", "add", n.IP + fabricNet, "dev", "eth0"},
			{"-n", n.Name, "link", "set", "eth0", "up"},
			{"-n", n.Name, "route", "add", "default", "via", fabricIP},
		}...)
		for _, o := range nodes {
			if o != n {
				steps = append(steps, []string{"-n", n.Name, "route", "add", o.PodCIDR, "via", o.IP})
			}
		}
	}
	for _, s := range steps {
		if out, err := exec.Command("ip", s...).CombinedOutput(); err != nil {
			return fmt.Errorf("ip %s: %v: %s", strings.Join(s, " "), err, bytes.TrimSpace(out))
		}
	}
	return nil
}

// cniNetns are the names under /run/netns that CNI plugins make (cni-UUID).
func cniNetns() map[string]bool {
	entries, _ := os.ReadDir("/run/netns")
	names := map[string]bool{}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), "cni-") {
			names[e.Name()] = true
		}
	}
	return names
}

// removeNetworks deletes the harness's namespaces, this run's or a crashed one's.
func removeNetworks(t testing.TB) {
	entries, _ := os.ReadDir("/run/netns")
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), "kn-") {
			continue
		}
		if out, err := exec.Command("ip", "netns", "del", e.Name()).CombinedOutput(); err != nil {
			t.Errorf("kubenode: ip netns del %s: %v: %s", e.Name(), err, out)
		}
	}
}

// unmountUnder unmounts whatever kubelet and containerd left mounted below dir
// (pod volumes, rootfs), deepest first.
func unmountUnder(dir string) error {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return fmt.Errorf("mountinfo: %w", err)
	}
	var mounts []string
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && strings.HasPrefix(f[4], dir+"/") {
			mounts = append(mounts, f[4])
		}
	}
	for i := len(mounts) - 1; i >= 0; i-- {
		if out, err := exec.Command("umount", "-l", mounts[i]).CombinedOutput(); err != nil {
			return fmt.Errorf("umount %s: %v: %s", mounts[i], err, out)
		}
	}
	return nil
}

// BuildNode returns the node's programs, building them with hack/build-node.sh on
// first use (many minutes; cached after). If they cannot be built, t is skipped, or
// fails under FERRY_PRIVILEGED_TESTS=1.
func BuildNode(t testing.TB) NodeBinaries {
	t.Helper()
	out := hackbuild.Run(t, "build-node.sh")
	return NodeBinaries{Dir: strings.TrimSpace(out)}
}

// Image is a container image built by hack/images.sh: its reference and tarball.
type Image struct {
	Ref, Tarball string
}

// BuildImages builds Ferry's images with ko (hack/images.sh) into a folder of t and
// returns them by base name ("ferry", "ferry-agent", "ferry-operator", "pause").
func BuildImages(t testing.TB) map[string]Image {
	t.Helper()
	out := hackbuild.Run(t, "images.sh", t.TempDir())
	images := map[string]Image{}
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		ref, tarball, ok := strings.Cut(line, " ")
		if !ok {
			t.Fatalf("kubenode: images.sh printed %q, want \"REF TARBALL\"", line)
		}
		name := ref[strings.LastIndex(ref, "/")+1:]
		name, _, _ = strings.Cut(name, ":")
		images[name] = Image{Ref: ref, Tarball: tarball}
	}
	return images
}
