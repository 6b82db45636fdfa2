package kubetest_test

import (
	"context"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/kubetest"
	"github.com/ferrymesh/ferry/internal/privileged"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
)

// TestNodeRunsPod brings up a real node (containerd, kubelet, CNI bridge in a
// network namespace), schedules a pod of the ko-built workload image through the
// scheduler, and checks that it runs and answers HTTP on its pod IP.
func TestNodeRunsPod(t *testing.T) {
	privileged.Require(t)
	bins := kubetest.BuildNode(t)
	images := kubetest.BuildImages(t)
	c := kubetest.Start(t)
	node := c.StartNode(t, bins, images["pause"].Ref, []string{images["pause"].Tarball, images["ferry"].Tarball})

	client, err := kubernetes.NewForConfig(c.RestConfig)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	noToken := false
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "echo", Namespace: "default"},
		Spec: corev1.PodSpec{
			AutomountServiceAccountToken: &noToken,
			Containers: []corev1.Container{{
				Name:            "echo",
				Image:           images["ferry"].Ref,
				ImagePullPolicy: corev1.PullNever,
				Command:         []string{"/ko-app/ferry", "lab", "echo-server", "--listen", ":8080", "--http"},
				Env: []corev1.EnvVar{{Name: "FERRY_LAB_POD", ValueFrom: &corev1.EnvVarSource{
					FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.name"}}}},
				Ports: []corev1.ContainerPort{{ContainerPort: 8080}},
				ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{
					HTTPGet: &corev1.HTTPGetAction{Path: "/", Port: intstr.FromInt32(8080)}}, PeriodSeconds: 1},
			}},
		},
	}
	if _, err := client.CoreV1().Pods("default").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	var got *corev1.Pod
	for {
		got, err = client.CoreV1().Pods("default").Get(ctx, "echo", metav1.GetOptions{})
		if err == nil && got.Status.Phase == corev1.PodRunning && podReady(got) && got.Status.PodIP != "" {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("pod not Running and Ready: %+v (%v)", got.Status, err)
		}
		time.Sleep(500 * time.Millisecond)
	}
	if got.Spec.NodeName != kubetest.NodeName {
		t.Errorf("pod scheduled on %q, want %q", got.Spec.NodeName, kubetest.NodeName)
	}
	t.Logf("pod %s Running on %s with IP %s", got.Name, got.Spec.NodeName, got.Status.PodIP)

	// A socket belongs to the namespace it was made in: dial from the node's, where
	// the pod network is, then speak HTTP over it from anywhere.
	addr := net.JoinHostPort(got.Status.PodIP, "8080")
	var conn net.Conn
	if err := node.Do(func() error {
		var err error
		conn, err = net.DialTimeout("tcp", addr, 5*time.Second)
		return err
	}); err != nil {
		t.Fatalf("dial the pod from the node: %v", err)
	}
	tr := &http.Transport{DialContext: func(context.Context, string, string) (net.Conn, error) { return conn, nil }}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Get("http://" + addr + "/")
	if err != nil {
		t.Fatalf("GET / on the pod: %v", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("read the answer: %v", err)
	}
	body := string(b)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET / on the pod: %s: %s", resp.Status, body)
	}
	header := resp.Header.Get("Ferry-Lab-Pod")
	if header != "echo" {
		t.Errorf("Ferry-Lab-Pod = %q, want %q (body %s)", header, "echo", body)
	}
	t.Logf("pod answered: %s", body)
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}
