package kubetest_test

import (
	"fmt"
	"io"
	"net"
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

// TestNode brings up two real nodes (containerd, kubelet, CNI bridge, each in
// its own namespaces) with the ko-built images imported, and checks what kubectl
// get nodes would show: both registered, Ready, with their addresses on the
// fabric; then that a pod of the ferry image runs on each node's pod network: it
// becomes Ready (kubelet's TCP probe reaches it) with an IP of its node's range,
// and answers a connection from the other node, across the fabric.
func TestNode(t *testing.T) {
	privileged.Require(t)
	bins := kubetest.BuildNode(t)
	images := kubetest.BuildImages(t)
	c := kubetest.Start(t)
	nodes := c.StartNodes(t, bins, images["pause"].Ref, []string{images["pause"].Tarball, images["ferry"].Tarball}, 2)

	client, err := kubernetes.NewForConfig(c.RestConfig)
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	for _, n := range nodes {
		node, err := client.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
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
		if ip != n.IP {
			t.Errorf("node %s InternalIP = %q, want %q", n.Name, ip, n.IP)
		}
		t.Logf("node %s Ready, kubelet %s, runtime %s", node.Name, node.Status.NodeInfo.KubeletVersion, node.Status.NodeInfo.ContainerRuntimeVersion)
	}

	ips := map[string]netip.Addr{}
	for _, n := range nodes {
		pod := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "echo-" + n.Name, Namespace: "default"},
			Spec: corev1.PodSpec{NodeName: n.Name, Containers: []corev1.Container{{
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
	}
	for _, n := range nodes {
		ips[n.Name] = waitReady(t, client, "echo-"+n.Name)
		if !netip.MustParsePrefix(n.PodCIDR).Contains(ips[n.Name]) {
			t.Errorf("pod on %s has IP %s, want one of %s", n.Name, ips[n.Name], n.PodCIDR)
		}
	}
	// From node 1's namespace to the pod on node 2: the route over the fabric.
	to := netip.AddrPortFrom(ips[nodes[1].Name], 8080)
	err = nodes[0].Do(func() error {
		conn, err := net.DialTimeout("tcp", to.String(), 5*time.Second)
		if err != nil {
			return err
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := conn.Write([]byte("ping")); err != nil {
			return err
		}
		buf := make([]byte, 4)
		if _, err := io.ReadFull(conn, buf); err != nil {
			return err
		}
		if string(buf) != "ping" {
			return fmt.Errorf("echoed %q", buf)
		}
		return nil
	})
	if err != nil {
		t.Errorf("from %s to the pod on %s (%s): %v", nodes[0].Name, nodes[1].Name, to, err)
	}
}

// waitReady waits up to two minutes for the pod default/name to be Ready and
// returns its IP.
func waitReady(t *testing.T, client kubernetes.Interface, name string) netip.Addr {
	t.Helper()
	ctx := t.Context()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		p, err := client.CoreV1().Pods("default").Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for _, cond := range p.Status.Conditions {
			if cond.Type == corev1.PodReady && cond.Status == corev1.ConditionTrue {
				return netip.MustParseAddr(p.Status.PodIP)
			}
		}
		if time.Now().After(deadline) {
			ev, _ := client.CoreV1().Events("default").List(ctx, metav1.ListOptions{})
			for _, e := range ev.Items {
				t.Logf("event %s %s: %s", e.Type, e.Reason, e.Message)
			}
			t.Fatalf("pod %s not Ready after 2m: %s %+v", name, p.Status.Phase, p.Status.ContainerStatuses)
		}
		time.Sleep(time.Second)
	}
}
