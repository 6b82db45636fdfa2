// This file brings up a real Kubernetes node beside the API server: kube-scheduler,
// kube-controller-manager, and one node made of containerd, kubelet and kube-proxy
// running in a network namespace of their own, with pods on a CNI bridge inside it,
// and a cluster DNS for Services. Nothing of the node's network reaches the root
// namespace: the node's only way out is a veth to a bridge in a second test
// namespace, and the node and its pods reach the API server through a forwarder
// this process listens with inside the node's namespace, on the node's address:
// the "kubernetes" Service's endpoint, so in-cluster clients work as on any cluster.

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

// Names and addresses of the test node. The prefix "kn" is this harness's own, so a
// crashed run's leftovers are found by name and removed at the next start.
const (
	NodeName    = "kn-node1"
	NodeIP      = "10.251.0.11"
	PodCIDR     = "10.244.1.0/24"
	fabricNetns = "kn-fabric"
	fabricIP    = "10.251.0.1"
	fabricNet   = "/24"
	// apiPort is where the forwarder to the API server listens in the node's
	// namespace, on loopback (kubelet, kube-proxy) and the node's address (pods,
	// through the "kubernetes" Service).
	apiPort = "6443"
	// ClusterDomain is the DNS domain of Services: NAME.NAMESPACE.svc.ClusterDomain,
	// answered on the node's address (kubelet's clusterDNS).
	ClusterDomain = "cluster.local"

	nodeReadyTimeout = 3 * time.Minute
)

// nodeLock is held by the test running the node.
const nodeLock = "/run/kubetest-node.lock"

// sharedMounts are the host's mounts pods may bind with Bidirectional propagation.
var sharedMounts = []string{"/sys/fs/bpf"}

// Node is one running Kubernetes node: containerd and kubelet in the network
// namespace NetnsPath, registered with the API server as NodeName.
type Node struct {
	// NetnsPath is the node's network namespace (/run/netns/kn-node1); pods' IPs
	// are reachable from inside it.
	NetnsPath string
	// Ctr is the path of containerd's ctr client, and CtrArgs its flags for this
	// node's containerd (address and the "k8s.io" namespace kubelet uses).
	Ctr     string
	CtrArgs []string
	// Dir holds the node's files: configs, logs, containerd's and kubelet's state.
	Dir string

	ns *netns.Handle
}

// NodeBinaries are the programs of a node, built by hack/build-node.sh.
type NodeBinaries struct {
	Dir string // the cache folder build-node.sh printed
}

func (b NodeBinaries) path(name string) string { return filepath.Join(b.Dir, name) }

// StartNode runs kube-scheduler, kube-controller-manager and one node (containerd,
// kubelet) against c, imports the image tarballs into the node's containerd, waits
// until the node is Ready, and removes everything when t ends. sandboxImage is the
// image reference of the pause container, which must be among the tarballs.
func (c *Cluster) StartNode(t testing.TB, bins NodeBinaries, sandboxImage string, tarballs []string) *Node {
	t.Helper()
	privileged.Require(t)
	runc := privileged.LookPath(t, "runc", "Debian runc, hack/install-deps.sh")
	if _, err := os.Stat("/usr/lib/cni/bridge"); err != nil {
		privileged.Missing(t, "CNI plugins not installed (Debian containernetworking-plugins, hack/install-deps.sh): %v", err)
	}
	// One node at a time on this machine: the node's names and addresses are fixed,
	// and go test runs packages side by side. The lock is held until t ends (the
	// cleanup registered first runs last).
	lock, err := os.OpenFile(nodeLock, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatalf("kubenode: %v", err)
	}
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		t.Logf("kubenode: another test runs a node; waiting for %s", nodeLock)
		if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
			t.Fatalf("kubenode: lock %s: %v", nodeLock, err)
		}
	}
	t.Cleanup(func() { lock.Close() })

	// Short paths: containerd's and the shims' unix sockets must fit in 108 bytes.
	dir, err := os.MkdirTemp("/run", "kn-")
	if err != nil {
		t.Fatalf("kubenode: node folder: %v", err)
	}
	n := &Node{Dir: dir, NetnsPath: "/run/netns/" + NodeName, Ctr: bins.path("ctr")}
	n.CtrArgs = []string{"--address", filepath.Join(dir, "containerd.sock"), "--namespace", "k8s.io"}

	var procs []*process
	var ctrd *process
	t.Cleanup(func() {
		for i := len(procs) - 1; i >= 0; i-- {
			if procs[i] == ctrd {
				// Kubelet is stopped: nothing restarts the pods that containerd,
				// still up, now stops.
				n.removeSandboxes()
			}
			if err := procs[i].stop(stopGrace); err != nil {
				t.Errorf("kubenode: %v", err)
			}
		}
		if t.Failed() {
			for _, p := range procs {
				t.Log(p.logTail(logTailLines))
			}
		}
		killShims(dir)
		if n.ns != nil {
			n.ns.Close()
		}
		removeNetworks(t)
		if err := unmountUnder(dir); err != nil {
			t.Errorf("kubenode: %v", err)
		}
		if err := os.RemoveAll(dir); err != nil {
			t.Errorf("kubenode: remove %s: %v", dir, err)
		}
	})
	fail := func(format string, args ...any) {
		t.Helper()
		for _, p := range procs {
			t.Log(p.logTail(logTailLines))
		}
		t.Fatalf("kubenode: "+format, args...)
	}
	start := func(name string, args ...string) *process {
		t.Helper()
		p, err := startProcess(name, filepath.Join(dir, name+".log"), args[0], args[1:]...)
		if err != nil {
			fail("%v", err)
		}
		procs = append(procs, p)
		return p
	}

	killShims("/run/kn-") // a crashed run's pods
	removeNetworks(t)
	if err := makeNetworks(); err != nil {
		fail("networks: %v", err)
	}
	n.ns, err = netns.Open(n.NetnsPath)
	if err != nil {
		fail("open node netns: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	if err := n.forwardAPI(ctx, strings.TrimPrefix(c.URL, "https://")); err != nil {
		fail("API forwarder: %v", err)
	}
	if err := c.pointKubernetesService(ctx); err != nil {
		fail("%v", err)
	}
	if err := n.serveDNS(ctx, c); err != nil {
		fail("cluster DNS: %v", err)
	}

	// The scheduler and the controller manager talk to the API server directly, from
	// the root namespace, with the admin's kubeconfig.
	control := []*process{start("kube-scheduler", bins.path("kube-scheduler"), "--kubeconfig="+c.Kubeconfig,
		"--leader-elect=false", "--secure-port=0", "--v=1"),
		start("kube-controller-manager", bins.path("kube-controller-manager"), "--kubeconfig="+c.Kubeconfig,
			"--leader-elect=false", "--secure-port=0", "--use-service-account-credentials=false",
			"--root-ca-file="+c.caFile(), "--controllers=*,-nodeipam", "--v=1")}

	files, err := n.configs(c, bins, runc, sandboxImage)
	if err != nil {
		fail("configs: %v", err)
	}
	if err := os.Mkdir(filepath.Join(dir, "cni"), 0o755); err != nil {
		fail("cni folder: %v", err)
	}
	if err := writeFiles(files); err != nil {
		fail("configs: %v", err)
	}
	// systemd makes every mount shared on a real node; here they are private, and
	// containerd refuses the Bidirectional propagation pods ask for (Ferry's bpffs
	// init container: "not a shared mount"). Shared with no peer changes nothing
	// for anyone else.
	for _, m := range sharedMounts {
		if err := unix.Mount("", m, "", unix.MS_SHARED, ""); err != nil {
			fail("mount --make-shared %s: %v", m, err)
		}
	}
	ctrd = start("containerd", "/usr/bin/nsenter", "--net="+n.NetnsPath, "--",
		bins.path("containerd"), "--config", filepath.Join(dir, "containerd.toml"))
	if err := n.waitContainerd(ctrd); err != nil {
		fail("%v", err)
	}
	for _, tb := range tarballs {
		if out, err := exec.Command(n.Ctr, append(n.CtrArgs, "images", "import", "--platform", "linux/amd64", tb)...).CombinedOutput(); err != nil {
			fail("ctr images import %s: %v: %s", tb, err, out)
		}
	}
	kubelet := start("kubelet", "/usr/bin/nsenter", "--net="+n.NetnsPath, "--",
		bins.path("kubelet"),
		"--config="+filepath.Join(dir, "kubelet.yaml"),
		"--kubeconfig="+filepath.Join(dir, "kubelet.kubeconfig"),
		"--root-dir="+filepath.Join(dir, "kubelet"),
		"--cert-dir="+filepath.Join(dir, "kubelet-pki"),
		"--hostname-override="+NodeName,
		"--node-ip="+NodeIP,
		"--v=2")
	// Service cluster IPs, as on any cluster: iptables rules in the node's
	// namespace only (its conntrack table is that namespace's too: no limits set).
	proxy := start("kube-proxy", "/usr/bin/nsenter", "--net="+n.NetnsPath, "--",
		bins.path("kube-proxy"),
		"--kubeconfig="+filepath.Join(dir, "kubelet.kubeconfig"),
		"--hostname-override="+NodeName,
		"--proxy-mode=iptables",
		"--cluster-cidr="+PodCIDR,
		"--conntrack-max-per-core=0",
		"--metrics-bind-address=127.0.0.1:10249",
		"--healthz-bind-address=127.0.0.1:10256",
		"--v=1")
	if err := c.waitNodeReady(append(control, kubelet, proxy)); err != nil {
		fail("%v", err)
	}
	return n
}

// Do runs fn inside the node's network namespace, on a locked OS thread: a
// connection dialled there reaches pods' IPs.
func (n *Node) Do(fn func() error) error { return n.ns.Do(fn) }

// caFile writes the cluster CA next to the kubeconfig once and returns its path.
func (c *Cluster) caFile() string {
	return filepath.Join(filepath.Dir(c.Kubeconfig), "pki", "ca.crt")
}

func (n *Node) configs(c *Cluster, bins NodeBinaries, runc, sandboxImage string) (map[string][]byte, error) {
	certPEM, keyPEM, err := c.ca.client("system:node:"+NodeName, []string{"system:nodes", "system:masters"})
	if err != nil {
		return nil, fmt.Errorf("kubelet certificate: %w", err)
	}
	var kubeconfig bytes.Buffer
	tmp := filepath.Join(n.Dir, "kubelet.kubeconfig")
	if err := writeKubeconfig(tmp, "https://127.0.0.1:"+apiPort, c.ca.certPEM, certPEM, keyPEM); err != nil {
		return nil, err
	}
	data, err := os.ReadFile(tmp)
	if err != nil {
		return nil, fmt.Errorf("kubelet kubeconfig: %w", err)
	}
	kubeconfig.Write(data)

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

[plugins.'io.containerd.grpc.v1.cri']
  disable_tcp_service = true
  stream_server_address = %[8]q
  stream_server_port = '0'
`, filepath.Join(d, "containerd"), filepath.Join(d, "containerd-state"), filepath.Join(d, "containerd.sock"),
		filepath.Join(d, "containerd-ttrpc.sock"), sandboxImage, runc, filepath.Join(d, "cni"), NodeIP)

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
      "ipam": {"type": "host-local", "ranges": [[{"subnet": %q}]], "routes": [{"dst": "0.0.0.0/0"}]}
    },
    {"type": "loopback"}
  ]
}
`, PodCIDR)

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
`, filepath.Join(d, "containerd.sock"), NodeIP, c.caFile(), PodCIDR, filepath.Join(d, "pod-logs"), ClusterDomain)

	return map[string][]byte{
		filepath.Join(d, "containerd.toml"):       []byte(containerd),
		filepath.Join(d, "cni", "10-kn.conflist"): []byte(cni),
		filepath.Join(d, "kubelet.yaml"):          []byte(kubelet),
		filepath.Join(d, "kubelet.kubeconfig"):    kubeconfig.Bytes(),
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

func (c *Cluster) waitNodeReady(procs []*process) error {
	client, err := kubernetes.NewForConfig(c.RestConfig)
	if err != nil {
		return fmt.Errorf("client: %w", err)
	}
	deadline := time.Now().Add(nodeReadyTimeout)
	last := "not registered"
	for time.Now().Before(deadline) {
		for _, p := range procs {
			if exited, err := p.exitErr(); exited {
				return err
			}
		}
		node, err := client.CoreV1().Nodes().Get(context.Background(), NodeName, metav1.GetOptions{})
		if err == nil {
			for _, cond := range node.Status.Conditions {
				if cond.Type == corev1.NodeReady {
					if cond.Status == corev1.ConditionTrue {
						return nil
					}
					last = cond.Reason + ": " + cond.Message
				}
			}
		}
		time.Sleep(time.Second)
	}
	return fmt.Errorf("node %s not Ready after %v (%s)", NodeName, nodeReadyTimeout, last)
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

func makeNetworks() error {
	steps := [][]string{
		{"netns", "add", fabricNetns},
		{"netns", "add", NodeName},
		{"-n", fabricNetns, "link", "set", "lo", "up"},
		{"-n", NodeName, "link", "set", "lo", "up"},
		{"-n", fabricNetns, "link", "add", "kn-br0", "type", "bridge"},
		{"-n", fabricNetns, "addr", "add", fabricIP + fabricNet, "dev", "kn-br0"},
		{"-n", fabricNetns, "link", "set", "kn-br0", "up"},
		{"-n", NodeName, "link", "add", "eth0", "type", "veth", "peer", "name", "kn-node1-up", "netns", fabricNetns},
		{"-n", fabricNetns, "link", "set", "kn-node1-up", "master", "kn-br0", "up"},
		{"-n", NodeName, "addr", "add", NodeIP + fabricNet, "dev", "eth0"},
		{"-n", NodeName, "link", "set", "eth0", "up"},
		{"-n", NodeName, "route", "add", "default", "via", fabricIP},
	}
	for _, s := range steps {
		if out, err := exec.Command("ip", s...).CombinedOutput(); err != nil {
			return fmt.Errorf("ip %s: %v: %s", strings.Join(s, " "), err, bytes.TrimSpace(out))
		}
	}
	return nil
}

// removeNetworks deletes the harness's namespaces, this run's or a crashed one's.
func removeNetworks(t testing.TB) {
	for _, name := range []string{NodeName, fabricNetns} {
		if _, err := os.Stat("/run/netns/" + name); err != nil {
			continue
		}
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("kubenode: ip netns del %s: %v: %s", name, err, out)
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
