// Package node installs Ferry onto a real Kubernetes node (kubelet, containerd,
// kube-proxy: internal/kubetest) the way a user does, with the images ko builds,
// and checks what the user would: the agent and operator run, enrolled pods talk
// over the mesh with their service accounts' identities, and uninstalling leaves
// nothing in the node's kernel.
package node

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/agent/datapath"
	"github.com/ferrymesh/ferry/internal/hackbuild"
	"github.com/ferrymesh/ferry/internal/kubetest"
	"github.com/ferrymesh/ferry/internal/privileged"
	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
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

// cluster is a real node with Ferry's images imported, and the ferry CLI.
type cluster struct {
	*kubetest.Cluster
	node   *kubetest.Node
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
	n := c.StartNode(t, bins, images["pause"].Ref, tarballs)
	if out, err := exec.Command(n.Ctr, append(n.CtrArgs, "images", "tag", images["pause"].Ref, nodePause)...).CombinedOutput(); err != nil {
		t.Fatalf("ctr images tag: %v: %s", err, out)
	}
	client, err := kubernetes.NewForConfig(c.RestConfig)
	if err != nil {
		t.Fatal(err)
	}
	ferry := filepath.Join(t.TempDir(), "ferry")
	if out, err := exec.Command("go", "build", "-o", ferry, "github.com/ferrymesh/ferry/cmd/ferry").CombinedOutput(); err != nil {
		t.Fatalf("go build ferry: %v: %s", err, out)
	}
	k := &cluster{Cluster: c, node: n, client: client, ferry: ferry}
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

// The user's path on a real node, installed with ferry install --wait and then
// with helm install --wait (the chart's objects, values for the images), each
// with the ko-built images: ferry enroll a namespace, its pods talk pod to pod and
// through a Service, and ferry observe shows it with their service accounts'
// identities; ferry uninstall leaves nothing of Ferry in the node's kernel.
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
	t.Logf("figure: install --wait took %v on one node", time.Since(start).Round(100*time.Millisecond))

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
	web := k.deployEcho(t, ns, "web")

	// Pod to pod, then through the Service's cluster IP: each a Job of the client
	// image that exits 0 only if every byte came back.
	k.runClient(t, ns, "to-pod", netip.AddrPortFrom(web.podIP, 8080))
	t.Logf("figure: from ferry enroll to the first meshed connection done: %v", time.Since(enrolled).Round(100*time.Millisecond))
	k.runClient(t, ns, "to-service", netip.AddrPortFrom(web.clusterIP, 8080))

	flows := k.flows(t)
	// Each Job's connection, by its pod: outbound from the client, carried by the
	// node's proxy between two enrolled pods (same-node), both identities known.
	for _, job := range []string{"to-pod", "to-service"} {
		found := false
		for _, f := range flows {
			if strings.HasPrefix(f.Source.Pod, job+"-") && f.Source.Namespace == ns &&
				f.Source.Identity == "spiffe://cluster.local/ns/"+ns+"/sa/client" &&
				f.Destination.Identity == "spiffe://cluster.local/ns/"+ns+"/sa/web" &&
				f.Destination.IP == web.podIP.String() && f.Service == ns+"/web" && f.Security == "same-node" &&
				f.Verdict == "VERDICT_FORWARDED" && f.BytesSent == echoBytes && f.BytesReceived == echoBytes {
				found = true
			}
		}
		if !found {
			t.Errorf("no forwarded same-node flow from job %s (%s/client) to %s/web of %d bytes each way with both identities in ferry observe:\n%s", job, ns, ns, echoBytes, flowsText(flows))
		}
	}

	k.run(t, "uninstall", "--yes", "--image-repo", imageRepo, "--image-tag", imageTag, "--timeout", "2m")
	if _, err := os.Stat(bpfPinFolder); !os.IsNotExist(err) {
		entries, _ := os.ReadDir(bpfPinFolder)
		t.Errorf("after ferry uninstall %s is still there (%v): %d entries", bpfPinFolder, err, len(entries))
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
// 8080, service account NAME) and a Service NAME on 8080, and waits until its pod
// is Ready.
func (k *cluster) deployEcho(t *testing.T, ns, name string) echoServer {
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

// runClient runs a Job NAME (service account "client") whose ferry lab
// echo-client, started through ferry await, sends echoBytes to to, and waits
// until it has succeeded.
func (k *cluster) runClient(t *testing.T, ns, name string, to netip.AddrPort) {
	t.Helper()
	job := &batchv1.Job{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: batchv1.JobSpec{
			BackoffLimit: new(int32(0)),
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: map[string]string{"job": name}},
				Spec: corev1.PodSpec{
					ServiceAccountName: "client",
					RestartPolicy:      corev1.RestartPolicyNever,
					Containers: []corev1.Container{{
						Name: "client", Image: imageRepo + "/ferry:" + imageTag,
						// Through ferry await: the Job connects at once, and its first
						// connection must not leave before the agent has the pod.
						Args: []string{"await", "--timeout", "1m", "--", "ferry", "lab", "echo-client", "--to", to.String(), "--bytes", fmt.Sprint(echoBytes)},
					}},
				},
			},
		},
	}
	if _, err := k.client.BatchV1().Jobs(ns).Create(t.Context(), job, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	k.waitPods(t, ns, "job="+name, func(p *corev1.Pod) bool {
		if p.Status.Phase == corev1.PodFailed {
			t.Fatalf("job %s: echo-client to %s failed: %+v", name, to, p.Status.ContainerStatuses)
		}
		return p.Status.Phase == corev1.PodSucceeded
	})
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

// flows is what ferry observe on the node shows, from the agent's observer socket.
func (k *cluster) flows(t *testing.T) []flow {
	t.Helper()
	out := k.run(t, "observe", "--agent-socket", "/run/ferry/observer.sock", "--last", "100", "-o", "json")
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
