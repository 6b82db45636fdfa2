package kubetest_test

import (
	"net/netip"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/kubetest"
	"github.com/ferrymesh/ferry/internal/privileged"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
)

// TestNode brings up a real node (containerd, kubelet, CNI bridge in a network
// namespace) with the ko-built images imported, and checks what kubectl get nodes
// would show: the node registered, Ready, with its address in the node netns; then
// that a pod of the ferry image runs on the pod network: it becomes Ready
// (kubelet's TCP probe reaches it) with an IP of the pod range.
func TestNode(t *testing.T) {
	privileged.Require(t)
	bins := kubetest.BuildNode(t)
	images := kubetest.BuildImages(t)
	c := kubetest.Start(t)
	c.StartNode(t, bins, images["pause"].Ref, []string{images["pause"].Tarball, images["ferry"].Tarball})

	client, err := kubernetes.NewForConfig(c.RestConfig)
	if err != nil {
		t.Fatal(err)
	}
	node, err := client.CoreV1().Nodes().Get(t.Context(), kubetest.NodeName, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("get node: %v", err)
	}
	ready := false
	for _, cond := range node.Status.Conditions {
		if cond.Type == corev1.NodeReady && cond.Status == corev1.ConditionTrue {
			ready = true
		}
	}
	if !ready {
		t.Errorf("node %s not Ready: %+v", node.Name, node.Status.Conditions)
	}
	var ip string
	for _, a := range node.Status.Addresses {
		if a.Type == corev1.NodeInternalIP {
			ip = a.Address
		}
	}
	if ip != kubetest.NodeIP {
		t.Errorf("node InternalIP = %q, want %q", ip, kubetest.NodeIP)
	}
	t.Logf("node %s Ready, kubelet %s, runtime %s", node.Name, node.Status.NodeInfo.KubeletVersion, node.Status.NodeInfo.ContainerRuntimeVersion)

	ctx := t.Context()
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "echo", Namespace: "default"},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{
			Name:  "echo",
			Image: images["ferry"].Ref,
			Args:  []string{"lab", "echo-server", "--listen", ":8080"},
			ReadinessProbe: &corev1.Probe{
				ProbeHandler:  corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt32(8080)}},
				PeriodSeconds: 1,
			},
		}}},
	}
	if _, err := client.CoreV1().Pods("default").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(2 * time.Minute)
	for {
		p, err := client.CoreV1().Pods("default").Get(ctx, "echo", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for _, cond := range p.Status.Conditions {
			if cond.Type == corev1.PodReady && cond.Status == corev1.ConditionTrue {
				if ip := netip.MustParseAddr(p.Status.PodIP); !netip.MustParsePrefix(kubetest.PodCIDR).Contains(ip) {
					t.Errorf("pod IP %s, want one of %s", ip, kubetest.PodCIDR)
				}
				return
			}
		}
		if time.Now().After(deadline) {
			ev, _ := client.CoreV1().Events("default").List(ctx, metav1.ListOptions{})
			for _, e := range ev.Items {
				t.Logf("event %s %s: %s", e.Type, e.Reason, e.Message)
			}
			t.Fatalf("pod not Ready after 2m: %s %+v", p.Status.Phase, p.Status.ContainerStatuses)
		}
		time.Sleep(time.Second)
	}
}
