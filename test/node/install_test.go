// Package node installs Ferry onto real Kubernetes nodes (kubelet, containerd,
// kube-proxy: internal/kubetest) the way a user does, with the images ko builds,
// and checks what the user would: the agents and operator run, enrolled pods talk
// over the mesh with their service accounts' identities, on one node and across
// nodes with only TLS to 15008 on the wire between them, and uninstalling leaves
// nothing in the nodes' kernel.
package node

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/agent/datapath"
	"github.com/ferrymesh/ferry/internal/hackbuild"
	"github.com/ferrymesh/ferry/internal/kubetest"
	"github.com/ferrymesh/ferry/internal/privileged"
	"github.com/ferrymesh/ferry/internal/wiretest"
	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
)

// The images hack/images.sh names, and the sandbox image every node holds (the
// cleanup DaemonSet's idle container runs it).
const (
	imageRepo    = "registry.ferry.test/ferry"
	imageTag     = "dev"
	nodePause    = "registry.k8s.io/pause:3.10"
	installWait  = "4m"
	bpfPinFolder = "/sys/fs/bpf/ferry"
)

// nodes is how many nodes the tests bring up: two, so traffic crosses nodes.
const nodes = 2

// cluster is real nodes with Ferry's images imported, and the ferry CLI.
type cluster struct {
	*kubetest.Cluster
	nodes  []*kubetest.Node
	client kubernetes.Interface
	ferry  string // path of the ferry binary
}

func startCluster(t *testing.T) *cluster {
	t.Helper()
	privileged.Require(t)
	bins := kubetest.BuildNode(t)
	images := kubetest.BuildImages(t)
	c := kubetest.Start(t)
	var tarballs []string
	for _, im := range images {
		tarballs = append(tarballs, im.Tarball)
	}
	ns := c.StartNodes(t, bins, images["pause"].Ref, tarballs, nodes)
	for _, n := range ns {
		if out, err := exec.Command(n.Ctr, append(n.CtrArgs, "images", "tag", images["pause"].Ref, nodePause)...).CombinedOutput(); err != nil {
			t.Fatalf("ctr images tag: %v: %s", err, out)
		}
	}
	client, err := kubernetes.NewForConfig(c.RestConfig)
	if err != nil {
		t.Fatal(err)
	}
	ferry := filepath.Join(t.TempDir(), "ferry")
	if out, err := exec.Command("go", "build", "-o", ferry, "github.com/ferrymesh/ferry/cmd/ferry").CombinedOutput(); err != nil {
		t.Fatalf("go build ferry: %v: %s", err, out)
	}
	k := &cluster{Cluster: c, nodes: ns, client: client, ferry: ferry}
	t.Cleanup(func() {
		if t.Failed() {
			t.Log(k.describe())
		}
	})
	return k
}

// run runs the ferry CLI against the cluster, as a user would, and returns what
// it printed; it fails t on a non-zero exit.
func (k *cluster) run(t *testing.T, args ...string) string {
	t.Helper()
	start := time.Now()
	cmd := exec.Command(k.ferry, args...)
	cmd.Env = append(os.Environ(), "KUBECONFIG="+k.Kubeconfig)
	out, err := cmd.CombinedOutput()
	t.Logf("ferry %s (%v):\n%s", strings.Join(args, " "), time.Since(start).Round(time.Millisecond), out)
	if err != nil {
		t.Fatalf("ferry %s: %v", strings.Join(args, " "), err)
	}
	return string(out)
}

// describe is what kubectl get pods -A and the events would show, for a failure.
func (k *cluster) describe() string {
	ctx := context.Background()
	var b strings.Builder
	pods, err := k.client.CoreV1().Pods("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return "list pods: " + err.Error()
	}
	for _, p := range pods.Items {
		fmt.Fprintf(&b, "pod %s/%s %s node=%q ip=%s\n", p.Namespace, p.Name, p.Status.Phase, p.Spec.NodeName, p.Status.PodIP)
		for _, cs := range append(p.Status.InitContainerStatuses, p.Status.ContainerStatuses...) {
			fmt.Fprintf(&b, "  %s ready=%v restarts=%d %s\n", cs.Name, cs.Ready, cs.RestartCount, containerState(cs.State, cs.LastTerminationState))
			if !cs.Ready && cs.RestartCount > 0 {
				b.WriteString(k.containerLog(&p, cs.Name))
			}
		}
	}
	events, err := k.client.CoreV1().Events("").List(ctx, metav1.ListOptions{})
	if err == nil {
		for _, e := range events.Items {
			if e.Type != corev1.EventTypeNormal {
				fmt.Fprintf(&b, "event %s %s/%s %s: %s\n", e.Type, e.InvolvedObject.Kind, e.InvolvedObject.Name, e.Reason, e.Message)
			}
		}
	}
	return b.String()
}

// containerLog is the end of what a pod's container printed, from kubelet's pod
// logs on the pod's node (kubectl logs needs kubelet's server, which the test
// nodes do not serve to clients).
func (k *cluster) containerLog(p *corev1.Pod, container string) string {
	for _, n := range k.nodes {
		if n.Name != p.Spec.NodeName {
			continue
		}
		files, _ := filepath.Glob(filepath.Join(n.Dir, "pod-logs", p.Namespace+"_"+p.Name+"_"+string(p.UID), container, "*.log"))
		var b strings.Builder
		for _, f := range files {
			data, _ := os.ReadFile(f)
			lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
			fmt.Fprintf(&b, "    --- %s\n    %s\n", f, strings.Join(lines[max(0, len(lines)-15):], "\n    "))
		}
		return b.String()
	}
	return ""
}

func containerState(s, last corev1.ContainerState) string {
	switch {
	case s.Waiting != nil:
		msg := "waiting " + s.Waiting.Reason + " " + s.Waiting.Message
		if last.Terminated != nil {
			msg += fmt.Sprintf(" (last exit %d %s: %s)", last.Terminated.ExitCode, last.Terminated.Reason, last.Terminated.Message)
		}
		return msg
	case s.Terminated != nil:
		return fmt.Sprintf("terminated %d %s %s", s.Terminated.ExitCode, s.Terminated.Reason, s.Terminated.Message)
	case s.Running != nil:
		return "running"
	}
	return "?"
}

// The user's path on two real nodes, installed with ferry install --wait and then
// with helm install --wait (the chart's objects, values for the images), each
// with the ko-built images: ferry enroll a namespace, its pods talk pod to pod and
// through a Service, and ferry observe shows it with their service accounts'
// identities, and the fabric between the nodes carries only TLS to 15008; ferry
// uninstall leaves nothing of Ferry in the nodes' kernel.
func TestInstall(t *testing.T) {
	k := startCluster(t)
	t.Run("ferry install", func(t *testing.T) {
		k.meshPath(t, "shop", func() {
			out := k.run(t, "install", "--image-repo", imageRepo, "--image-tag", imageTag, "--wait", installWait)
			if !strings.Contains(out, "Ferry is running") {
				t.Fatalf("ferry install --wait did not end with Ferry running")
			}
		})
	})
	t.Run("helm install", func(t *testing.T) {
		helm := hackbuild.Run(t, "build-helm.sh")
		k.meshPath(t, "store", func() {
			home := t.TempDir()
			cmd := exec.Command(strings.TrimSpace(helm), "install", "ferry", "../../deploy/helm/ferry",
				"--namespace", "ferry-system", "--create-namespace", "--take-ownership",
				"--set", "images.operator.repository="+imageRepo+"/ferry-operator", "--set", "images.operator.tag="+imageTag,
				"--set", "images.agent.repository="+imageRepo+"/ferry-agent", "--set", "images.agent.tag="+imageTag,
				"--wait", "--timeout", installWait, "--kubeconfig", k.Kubeconfig)
			cmd.Env = append(os.Environ(), "HELM_CACHE_HOME="+home+"/cache", "HELM_CONFIG_HOME="+home+"/config", "HELM_DATA_HOME="+home+"/data")
			out, err := cmd.CombinedOutput()
			t.Logf("helm install:\n%s", out)
			if err != nil || !strings.Contains(string(out), "STATUS: deployed") {
				t.Fatalf("helm install --wait: %v", err)
			}
		})
	})
}

// meshPath installs Ferry with install, enrolls ns and checks the mesh carries
// its pods' traffic, then uninstalls and checks the node's kernel is clean and
// the ferry-system namespace gone (so the next install starts afresh).
func (k *cluster) meshPath(t *testing.T, ns string, install func()) {
	ctx := t.Context()
	start := time.Now()
	install()
	t.Logf("figure: install --wait took %v on %d nodes", time.Since(start).Round(100*time.Millisecond), len(k.nodes))

	if _, err := k.client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	enrolled := time.Now()
	k.run(t, "enroll", ns)
	for _, sa := range []string{"web", "client"} {
		if _, err := k.client.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	// STRICT for the whole namespace, before its pods start: web must still become
	// Ready (kubelet's probe is plaintext from the node), and plaintext from outside
	// the mesh must be refused.
	k.strict(t, ns)
	// The server on the first node; one client beside it, one on the second node.
	server, other := k.nodes[0], k.nodes[1]
	web := k.deployEcho(t, ns, "web", server.Name)

	// Pod to pod on one node, then through the Service's cluster IP from the other
	// node, across the fabric, captured there: each a Job of the client image that
	// exits 0 only if every byte came back.
	k.runClient(t, ns, "to-pod", server.Name, netip.AddrPortFrom(web.podIP, 8080))
	t.Logf("figure: from ferry enroll to the first meshed connection done: %v", time.Since(enrolled).Round(100*time.Millisecond))
	k.refusedFromOutside(t, other.Name, netip.AddrPortFrom(web.podIP, 8080))
	pcap := filepath.Join(t.TempDir(), "fabric.pcap")
	stop := wiretest.Capture(t, kubetest.FabricNetnsPath, pcap)
	clientIP := k.runClient(t, ns, "to-service", other.Name, netip.AddrPortFrom(web.clusterIP, 8080))
	stop()
	checkFabric(t, pcap, web, clientIP)

	// Each Job's connection, by its pod, in ferry observe on the client's node:
	// outbound from the client between two enrolled pods, both identities known,
	// carried by the node's proxy (same-node) or the mTLS tunnel to the other node.
	for _, want := range []struct {
		job      string
		node     *kubetest.Node
		security string
	}{{"to-pod", server, "same-node"}, {"to-service", other, "mtls"}} {
		flows := k.flows(t, want.node)
		found := false
		for _, f := range flows {
			if strings.HasPrefix(f.Source.Pod, want.job+"-") && f.Source.Namespace == ns &&
				f.Source.Identity == "spiffe://cluster.local/ns/"+ns+"/sa/client" &&
				f.Destination.Identity == "spiffe://cluster.local/ns/"+ns+"/sa/web" &&
				f.Destination.IP == web.podIP.String() && f.Service == ns+"/web" && f.Security == want.security &&
				f.Verdict == "VERDICT_FORWARDED" && f.BytesSent == echoBytes && f.BytesReceived == echoBytes {
				found = true
			}
		}
		if !found {
			t.Errorf("no forwarded %s flow from job %s (%s/client) to %s/web of %d bytes each way with both identities in ferry observe on %s:\n%s",
				want.security, want.job, ns, ns, echoBytes, want.node.Name, flowsText(flows))
		}
	}

	k.checkPrometheus(t, ns)

	k.run(t, "uninstall", "--yes", "--image-repo", imageRepo, "--image-tag", imageTag, "--timeout", "2m")
	for _, n := range k.nodes {
		if _, err := os.Stat(n.HostPath(bpfPinFolder)); !os.IsNotExist(err) {
			entries, _ := os.ReadDir(n.HostPath(bpfPinFolder))
			t.Errorf("after ferry uninstall %s is still there on %s (%v): %d entries", bpfPinFolder, n.Name, err, len(entries))
		}
	}
	if out, err := exec.Command("bpftool", "cgroup", "show", k.cgroupRoot(t)).CombinedOutput(); err != nil || strings.Contains(string(out), "ferry") {
		t.Errorf("after ferry uninstall, bpftool cgroup show %s: %v\n%s", k.cgroupRoot(t), err, out)
	}
	deadline := time.Now().Add(2 * time.Minute)
	for {
		_, err := k.client.CoreV1().Namespaces().Get(ctx, "ferry-system", metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("namespace ferry-system still there 2m after ferry uninstall: %v", err)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// echoBytes is what each client connection sends and expects back.
const echoBytes = 100000

// echoServer is a Deployment of the echo server and its Service.
type echoServer struct {
	podIP, clusterIP netip.Addr
}

// deployEcho creates a Deployment NAME (one replica of ferry lab echo-server on
// 8080 on node, service account NAME) and a Service NAME on 8080, and waits until
// its pod is Ready.
func (k *cluster) deployEcho(t *testing.T, ns, name, node string) echoServer {
	t.Helper()
	ctx := t.Context()
	labels := map[string]string{"app": name}
	dep := &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: appsv1.DeploymentSpec{
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: corev1.PodSpec{
					ServiceAccountName: name,
					NodeSelector:       map[string]string{corev1.LabelHostname: node},
					Containers: []corev1.Container{{
						Name: "echo", Image: imageRepo + "/ferry:" + imageTag,
						Args:  []string{"lab", "echo-server", "--listen", ":8080"},
						Ports: []corev1.ContainerPort{{ContainerPort: 8080}},
						ReadinessProbe: &corev1.Probe{
							ProbeHandler:  corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt32(8080)}},
							PeriodSeconds: 1,
						},
					}},
				},
			},
		},
	}
	if _, err := k.client.AppsV1().Deployments(ns).Create(ctx, dep, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec:       corev1.ServiceSpec{Selector: labels, Ports: []corev1.ServicePort{{Name: "tcp-echo", Port: 8080, TargetPort: intstr.FromInt32(8080)}}},
	}
	created, err := k.client.CoreV1().Services(ns).Create(ctx, svc, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var e echoServer
	e.clusterIP = netip.MustParseAddr(created.Spec.ClusterIP)
	k.waitPods(t, ns, "app="+name, func(p *corev1.Pod) bool {
		for _, c := range p.Status.Conditions {
			if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
				e.podIP = netip.MustParseAddr(p.Status.PodIP)
				return true
			}
		}
		return false
	})
	return e
}

// runClient runs a Job NAME (service account "client") on node whose ferry lab
// echo-client, started through ferry await, sends echoBytes to to, waits until it
// has succeeded, and returns its pod's IP.
func (k *cluster) runClient(t *testing.T, ns, name, node string, to netip.AddrPort) netip.Addr {
	t.Helper()
	// Through ferry await: the Job connects at once, and its first connection must
	// not leave before the agent has the pod.
	k.startJob(t, ns, name, node, "client", "await", "--timeout", "1m", "--", "ferry", "lab", "echo-client", "--to", to.String(), "--bytes", fmt.Sprint(echoBytes))
	var ip netip.Addr
	k.waitPods(t, ns, "job="+name, func(p *corev1.Pod) bool {
		if p.Status.Phase == corev1.PodFailed {
			t.Fatalf("job %s: echo-client to %s failed: %+v", name, to, p.Status.ContainerStatuses)
		}
		if p.Status.Phase != corev1.PodSucceeded {
			return false
		}
		ip = netip.MustParseAddr(p.Status.PodIP)
		return true
	})
	return ip
}

// strict makes every pod of ns STRICT with a PeerAuthentication, as a user would.
func (k *cluster) strict(t *testing.T, ns string) {
	t.Helper()
	dyn, err := dynamic.NewForConfig(k.RestConfig)
	if err != nil {
		t.Fatal(err)
	}
	pa := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "ferry.io/v1alpha1", "kind": "PeerAuthentication",
		"metadata": map[string]any{"name": "strict", "namespace": ns},
		"spec":     map[string]any{"mtls": map[string]any{"mode": "Strict"}},
	}}
	gvr := schema.GroupVersionResource{Group: "ferry.io", Version: "v1alpha1", Resource: "peerauthentications"}
	if _, err := dyn.Resource(gvr).Namespace(ns).Create(t.Context(), pa, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create PeerAuthentication: %v", err)
	}
}

// refusedFromOutside runs, in a namespace outside the mesh on node, a Job whose
// echo-client connects to a STRICT pod's port in plaintext, and checks that it
// fails: refused in the pod's namespace.
func (k *cluster) refusedFromOutside(t *testing.T, node string, to netip.AddrPort) {
	t.Helper()
	ctx := t.Context()
	const ns = "outside"
	if _, err := k.client.CoreV1().Namespaces().Get(ctx, ns, metav1.GetOptions{}); apierrors.IsNotFound(err) {
		if _, err := k.client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	name := fmt.Sprintf("plaintext-%d", time.Now().UnixNano()%100000)
	k.startJob(t, ns, name, node, "", "lab", "echo-client", "--to", to.String(), "--bytes", "1000", "--timeout", "20s")
	k.waitPods(t, ns, "job="+name, func(p *corev1.Pod) bool {
		if p.Status.Phase == corev1.PodSucceeded {
			t.Fatalf("plaintext from outside the mesh (%s on %s) to STRICT %s was carried", name, node, to)
		}
		return p.Status.Phase == corev1.PodFailed
	})
}

// startJob creates a Job NAME on node (pods labelled job=NAME, service account sa,
// or the namespace's default when empty) running the ferry image with args, once.
func (k *cluster) startJob(t *testing.T, ns, name, node, sa string, args ...string) {
	t.Helper()
	job := &batchv1.Job{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: batchv1.JobSpec{
			BackoffLimit: new(int32(0)),
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: map[string]string{"job": name}},
				Spec: corev1.PodSpec{
					ServiceAccountName: sa,
					NodeSelector:       map[string]string{corev1.LabelHostname: node},
					RestartPolicy:      corev1.RestartPolicyNever,
					Containers:         []corev1.Container{{Name: "client", Image: imageRepo + "/ferry:" + imageTag, Args: args}},
				},
			},
		},
	}
	if _, err := k.client.BatchV1().Jobs(ns).Create(t.Context(), job, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// checkFabric checks what the fabric between the nodes carried while a client on
// one node talked to web on the other: the workload's addresses never with data
// on another port than 15008 (no plaintext connection between the pods, and the
// Service's cluster IP never on the wire at all), and TLS application data on
// 15008, at least as much as the echo sent both ways.
func checkFabric(t *testing.T, pcap string, web echoServer, client netip.Addr) {
	t.Helper()
	pods := fmt.Sprintf("(ip.addr == %s || ip.addr == %s)", web.podIP, client)
	if clear := wiretest.Tshark(t, pcap, "-Y", pods+" && tcp.len > 0 && tcp.srcport != 15008 && tcp.dstport != 15008",
		"-T", "fields", "-e", "ip.src", "-e", "tcp.srcport", "-e", "ip.dst", "-e", "tcp.dstport"); len(clear) > 0 {
		t.Errorf("%d packets with data between the workload's pods on other ports than 15008 crossed the fabric, e.g. %v", len(clear), clear[:min(5, len(clear))])
	}
	if vip := wiretest.Tshark(t, pcap, "-Y", "ip.addr == "+web.clusterIP.String()); len(vip) > 0 {
		t.Errorf("the Service's cluster IP %s crossed the fabric: %v", web.clusterIP, vip[:min(5, len(vip))])
	}
	// TLS 1.3 writes its encrypted records' type as the outer "opaque type" (23); which
	// field tshark names it by has changed between Debian's builds, so either counts.
	if tls := wiretest.Tshark(t, pcap, "-d", "tcp.port==15008,tls", "-Y", "tls.record.content_type == 23 || tls.record.opaque_type == 23"); len(tls) == 0 {
		t.Error("no TLS application data on 15008 on the fabric: the connection did not cross it in the tunnel")
	}
	total := 0
	for _, l := range wiretest.Tshark(t, pcap, "-Y", "tcp.port == 15008 && tcp.len > 0", "-T", "fields", "-e", "tcp.len") {
		n, err := strconv.Atoi(l)
		if err != nil {
			t.Fatalf("tshark tcp.len %q: %v", l, err)
		}
		total += n
	}
	if total < 2*echoBytes {
		t.Errorf("%d bytes of TCP data on 15008 crossed the fabric, want at least the %d the echo sent both ways", total, 2*echoBytes)
	}
	t.Logf("fabric: %d bytes of TCP data on 15008 (each packet seen on both nodes' ports), none between the pods elsewhere", total)
}

// waitPods waits up to two minutes until a pod matching selector satisfies done.
func (k *cluster) waitPods(t *testing.T, ns, selector string, done func(*corev1.Pod) bool) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		pods, err := k.client.CoreV1().Pods(ns).List(t.Context(), metav1.ListOptions{LabelSelector: selector})
		if err != nil {
			t.Fatal(err)
		}
		for i := range pods.Items {
			if done(&pods.Items[i]) {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no pod %s in %s done after 2m", selector, ns)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// flow is what ferry observe -o json prints for one flow, the fields checked here.
type flow struct {
	Source, Destination struct {
		Pod, Namespace, Identity, IP string
		Port                         int
	}
	Service, Verdict, Security, Reason string
	BytesSent                          int `json:"bytes_sent,string"`
	BytesReceived                      int `json:"bytes_received,string"`
}

// flows is what ferry observe on node n shows, from its agent's observer socket.
func (k *cluster) flows(t *testing.T, n *kubetest.Node) []flow {
	t.Helper()
	out := k.run(t, "observe", "--agent-socket", n.HostPath("/run/ferry/observer.sock"), "--last", "100", "-o", "json")
	var fs []flow
	for line := range strings.Lines(out) {
		if !strings.HasPrefix(line, "{") {
			continue
		}
		var f flow
		if err := json.Unmarshal([]byte(line), &f); err != nil {
			t.Fatalf("ferry observe -o json: %v: %s", err, line)
		}
		fs = append(fs, f)
	}
	return fs
}

func flowsText(fs []flow) string {
	var b strings.Builder
	for _, f := range fs {
		fmt.Fprintf(&b, "  %+v\n", f)
	}
	return b.String()
}

// cgroupRoot is the node's cgroup v2 root, where the agent attached capture.
func (k *cluster) cgroupRoot(t *testing.T) string {
	t.Helper()
	root, err := datapath.ResolveCgroup("/sys/fs/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	return root
}
