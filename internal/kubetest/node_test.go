package kubetest_test

import (
	"context"
	"testing"

	"github.com/ferrymesh/ferry/internal/kubetest"
	"github.com/ferrymesh/ferry/internal/privileged"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// TestNodeRegistersReady brings up a real node (containerd, kubelet, CNI bridge in a
// network namespace) with the ko-built images imported, and checks what kubectl get
// nodes would show: the node registered, Ready, with its address in the node netns.
func TestNodeRegistersReady(t *testing.T) {
	privileged.Require(t)
	bins := kubetest.BuildNode(t)
	images := kubetest.BuildImages(t)
	c := kubetest.Start(t)
	c.StartNode(t, bins, images["pause"].Ref, []string{images["pause"].Tarball, images["ferry"].Tarball})

	client, err := kubernetes.NewForConfig(c.RestConfig)
	if err != nil {
		t.Fatal(err)
	}
	node, err := client.CoreV1().Nodes().Get(context.Background(), kubetest.NodeName, metav1.GetOptions{})
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
}
