package e2e

// The control plane end to end: ferry-operator in local mode (the lab writes its
// pods as manifests), agents that get their state and certificates from it, on a
// lab of their own (prefix "cp", pods in 10.102.0.0/16).

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"github.com/ferrymesh/ferry/api/admin"
	"github.com/ferrymesh/ferry/api/ferryv1"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/kubetest"
	"github.com/ferrymesh/ferry/lab"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

const (
	cpPrefix = "cp"
	cpPodNet = 102
	// cpCertTTL is short so that certificates rotate (at half life) during the tests.
	cpCertTTL = 30 * time.Second
	latPods   = 50
)

var cpLab = onceLab{what: "control-plane lab", bringUp: cpBringUp}

// cpSetup returns the control-plane lab: namespace shop with a, b (node1) and c
// (node2) enrolled, d (node2) not enrolled; namespace lat with latPods pods spread
// over both nodes, for the enrollment latency measurement.
func cpSetup(t *testing.T) *env { return cpLab.get(t) }

func cpBringUp() (*env, error) {
	cfg := lab.Config{
		Prefix:   cpPrefix,
		PodNet:   cpPodNet,
		Operator: lab.OperatorConfig{Args: []string{"--cert-ttl", cpCertTTL.String()}},
		Nodes: []lab.NodeConfig{
			{Name: "node1", Pods: []lab.PodConfig{
				{Name: "a", Namespace: "shop", ServiceAccount: "web", Enrolled: true},
				{Name: "b", Namespace: "shop", ServiceAccount: "api", Enrolled: true},
			}},
			{Name: "node2", Pods: []lab.PodConfig{
				{Name: "c", Namespace: "shop", ServiceAccount: "db", Enrolled: true},
				{Name: "d", Namespace: "shop", ServiceAccount: "batch", Enrolled: false},
			}},
		},
	}
	for i := range latPods {
		n := &cfg.Nodes[i%2]
		n.Pods = append(n.Pods, lab.PodConfig{Name: fmt.Sprintf("l%d", i), Namespace: "lat", ServiceAccount: fmt.Sprintf("lat%d", i%5), Enrolled: true})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	e, err := newEnv(ctx, cfg, "ferry", "ferry-agent", "ferry-operator")
	if err != nil {
		return nil, err
	}
	for _, pod := range []string{"a", "c", "d"} {
		if err := e.startServer(ctx, pod, echoPort); err != nil {
			return e.fail(err)
		}
	}
	return e, nil
}

// waitEnrolled waits until node's agent has enrolled exactly the pods in want
// (names "namespace/pod"), holding a certificate for each.
func (e *env) waitEnrolled(t *testing.T, node string, want ...string) {
	t.Helper()
	sort.Strings(want)
	deadline := time.Now().Add(30 * time.Second)
	var got []string
	for time.Now().Before(deadline) {
		got = got[:0]
		for _, p := range e.status(t, node).Pods {
			got = append(got, p.Name)
		}
		sort.Strings(got)
		if slices.Equal(got, want) {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("agent on %s enrolled %v, want %v; end of its log:\n%s", node, got, want, tailFile(e.lab.AgentLog(node), 30))
}

func tailFile(path string, n int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := bytes.Split(bytes.TrimRight(data, "\n"), []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return string(bytes.Join(lines, []byte("\n")))
}

func shopPods(node string) []string {
	if node == "node1" {
		return []string{"shop/a", "shop/b"}
	}
	return []string{"shop/c"}
}

func latOn(node string) []string {
	var out []string
	for i := range latPods {
		if (i%2 == 0) == (node == "node1") {
			out = append(out, fmt.Sprintf("lat/l%d", i))
		}
	}
	return out
}

// Pods in a labelled namespace on two nodes are enrolled and carry mTLS with the
// identity of their service account; removing the label takes them out and their
// new connections are plaintext; putting it back brings mTLS back.
func TestControlPlaneEnrollment(t *testing.T) {
	e := cpSetup(t)
	for _, node := range []string{"node1", "node2"} {
		e.waitEnrolled(t, node, append(shopPods(node), latOn(node)...)...)
	}
	for _, node := range []string{"node1", "node2"} {
		if st := e.readyz(t, node); st != "HTTP/1.0 200 OK" {
			t.Fatalf("agent on %s: GET /readyz: %s", node, st)
		}
	}
	a, c := e.pod("a"), e.pod("c")
	if a.Identity != "spiffe://cluster.local/ns/shop/sa/web" || c.Identity != "spiffe://cluster.local/ns/shop/sa/db" {
		t.Fatalf("lab identities %s, %s", a.Identity, c.Identity)
	}
	e.mustRun(t, "a", "echo", e.addr("c", echoPort), "65536")
	in := e.findConn(t, "node2", func(cn connRecord) bool {
		return cn.Direction == admin.Inbound && cn.Security == admin.MTLS && cn.Src.Addr() == a.IP && cn.BytesSent == 65536
	})
	if in.SrcIdentity != a.Identity || in.DstIdentity != c.Identity {
		t.Fatalf("node2 reports %s → %s, want %s → %s", in.SrcIdentity, in.DstIdentity, a.Identity, c.Identity)
	}

	if err := e.lab.SetNamespaceEnrolled("shop", false); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := e.lab.SetNamespaceEnrolled("shop", true); err != nil {
			t.Error(err)
		}
		for _, node := range []string{"node1", "node2"} {
			e.waitEnrolled(t, node, append(shopPods(node), latOn(node)...)...)
		}
	})
	for _, node := range []string{"node1", "node2"} {
		e.waitEnrolled(t, node, latOn(node)...)
	}
	pcap := filepath.Join(t.TempDir(), "fabric.pcap")
	stop := e.capture(t, pcap)
	e.mustRun(t, "a", "echo", e.addr("c", echoPort), "65536")
	stop()
	raw, err := os.ReadFile(pcap)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(raw, []byte(Marker)) {
		t.Fatal("after the label was removed, a→c should cross the fabric in plaintext; the marker was not seen")
	}
	// The lat pods stay enrolled: node1 still carries l0's connections, and to c,
	// which left the mesh, in plaintext.
	e.mustRun(t, "l0", "echo", e.addr("c", echoPort), "4096")
	e.findConn(t, "node1", func(cn connRecord) bool {
		return cn.Direction == admin.Outbound && cn.Security == admin.Plaintext && cn.Src.Addr() == e.pod("l0").IP && cn.Dst.String() == e.addr("c", echoPort)
	})
}

// Certificates rotate at half life while a long-lived connection keeps flowing,
// and new connections use the new certificate.
func TestControlPlaneRotation(t *testing.T) {
	e := cpSetup(t)
	e.waitEnrolled(t, "node1", append(shopPods("node1"), latOn("node1")...)...)
	serial := func() string {
		for _, c := range e.status(t, "node1").Certificates {
			if c.Identity == e.pod("a").Identity {
				return c.Serial
			}
		}
		return ""
	}
	first := serial()
	if first == "" {
		t.Fatal("node1 holds no certificate for a")
	}
	for _, c := range e.status(t, "node1").Certificates {
		// NotBefore and NotAfter have whole seconds, and Issued is the agent's clock
		// when the answer came: half the lifetime, within a second either way.
		if half := c.RenewAt.Sub(c.Issued); half < cpCertTTL/2-time.Second || half > cpCertTTL/2+time.Second {
			t.Fatalf("%s renews %v after it was issued, want half its %v lifetime", c.Identity, half, cpCertTTL)
		}
	}
	// idle: echo, stay open for a whole certificate lifetime, echo again.
	done := make(chan error, 1)
	go func() {
		_, err := e.run(t, "a", "idle", e.addr("c", echoPort), fmt.Sprint(int(cpCertTTL.Seconds())+2))
		done <- err
	}()
	deadline := time.Now().Add(cpCertTTL)
	for serial() == first {
		if time.Now().After(deadline) {
			t.Fatalf("certificate of a not renewed within its lifetime %s", cpCertTTL)
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("certificate of a renewed: serial %s → %s", first, serial())
	e.mustRun(t, "a", "echo", e.addr("c", echoPort), "4096")
	if err := <-done; err != nil {
		t.Fatalf("the long-lived connection broke across rotations: %v", err)
	}
}

// With the operator killed, connections between known pods keep working, old and
// new; when it is back the agents resync without dropping connections.
func TestControlPlaneOperatorOutage(t *testing.T) {
	e := cpSetup(t)
	e.waitEnrolled(t, "node1", append(shopPods("node1"), latOn("node1")...)...)
	before := e.status(t, "node1").StateVersion
	// A connection open before the kill, held until the agents have resynced.
	release := e.hold(t, "a", e.addr("c", echoPort))
	e.waitLive(t, "node1", "a", "c", echoPort)
	if err := e.lab.StopOperator(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	e.mustRun(t, "b", "echo", e.addr("c", echoPort), "65536")
	e.findConn(t, "node2", func(cn connRecord) bool {
		return cn.Direction == admin.Inbound && cn.Security == admin.MTLS && cn.Src.Addr() == e.pod("b").IP && cn.BytesSent == 65536
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := e.lab.StartOperator(ctx); err != nil {
		t.Fatal(err)
	}
	resync := time.Now().Add(20 * time.Second)
	for time.Now().Before(resync) && e.status(t, "node1").StateVersion == before {
		time.Sleep(100 * time.Millisecond)
	}
	after := e.status(t, "node1").StateVersion
	if after == before {
		t.Fatalf("agent on node1 did not resync: state version still %d", before)
	}
	if err := release(); err != nil {
		t.Fatalf("a connection open across the outage broke: %v", err)
	}
	e.waitEnrolled(t, "node1", append(shopPods("node1"), latOn("node1")...)...)
	t.Logf("operator killed and restarted; node1 resynced from version %d to %d, connections kept", before, after)
}

// An agent restarted while the operator is down serves its pods at once from its
// state cache (state and certificates), and mTLS keeps working.
func TestControlPlaneAgentRestartWithoutOperator(t *testing.T) {
	e := cpSetup(t)
	all := append(shopPods("node1"), latOn("node1")...)
	e.waitEnrolled(t, "node1", all...)
	if err := e.lab.StopOperator(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := e.lab.StartOperator(ctx); err != nil {
			t.Error(err)
		}
	})
	e.restartAgent(t, "node1")
	e.waitEnrolled(t, "node1", all...)
	if log := tailFile(e.lab.AgentLog("node1"), 200); !strings.Contains(log, "serving the cached state until the operator answers") {
		t.Fatalf("the restarted agent did not start from its state cache:\n%s", tailFile(e.lab.AgentLog("node1"), 20))
	}
	// It holds the pods' keys: 0600, as the agent wrote it.
	checkMode(t, filepath.Join(filepath.Dir(e.lab.AgentSocket("node1")), "state.cache"), 0o600)
	e.mustRun(t, "a", "echo", e.addr("c", echoPort), "65536")
	e.findConn(t, "node2", func(cn connRecord) bool {
		return cn.Direction == admin.Inbound && cn.Security == admin.MTLS && cn.Src.Addr() == e.pod("a").IP && cn.BytesSent == 65536
	})
	e.mustRun(t, "c", "echo", e.addr("a", echoPort), "65536")
	e.findConn(t, "node1", func(cn connRecord) bool {
		return cn.Direction == admin.Inbound && cn.Security == admin.MTLS && cn.Src.Addr() == e.pod("c").IP && cn.BytesSent == 65536
	})
}

// Time from labelling a namespace (local mode: a manifest edit) to each of its
// pods' first mTLS connection, over latPods pods on two nodes.
func TestControlPlaneEnrollLatency(t *testing.T) {
	e := cpSetup(t)
	if err := e.lab.SetNamespaceEnrolled("lat", false); err != nil {
		t.Fatal(err)
	}
	e.waitEnrolled(t, "node1", shopPods("node1")...)
	e.waitEnrolled(t, "node2", shopPods("node2")...)
	ds := e.firstMTLS(t, func() {
		if err := e.lab.SetNamespaceEnrolled("lat", true); err != nil {
			t.Fatal(err)
		}
	})
	p := func(q float64) time.Duration { return ds[int(q*float64(len(ds)-1)+0.5)].Round(time.Millisecond) }
	t.Logf("local mode: label → first mTLS connection over %d pods on 2 nodes: p50 %v, p99 %v, max %v (manifests polled every 500 ms, probes every 50 ms)",
		len(ds), p(0.5), p(0.99), ds[len(ds)-1].Round(time.Millisecond))
}

// The control plane on a real kube-apiserver: pods created through the API, in a
// labelled namespace, with the lab's nodes and addresses, are enrolled by agents that
// authenticate with bound service-account tokens (TokenReview), and carry mTLS with
// the identities of their service accounts; removing the label takes them out.
// The cp lab's agents are pointed at this operator for the test, then back.
func TestControlPlaneKubeAPI(t *testing.T) {
	e := cpSetup(t)
	kc := kubetest.Start(t)
	client, err := kubernetes.NewForConfig(kc.RestConfig)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	must := func(_ any, err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(kc.CreateNamespace(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "ferry-system"}}))
	must(client.CoreV1().ServiceAccounts("ferry-system").Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "ferry-agent"}}, metav1.CreateOptions{}))
	must(kc.CreateNamespace(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop", Labels: map[string]string{"ferry.io/mesh": "enabled"}}}))
	pod := func(ns, name, node, sa, ip string) {
		t.Helper()
		p, err := client.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec:       corev1.PodSpec{NodeName: node, ServiceAccountName: sa, Containers: []corev1.Container{{Name: "app", Image: "example.invalid/app"}}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if ip == "" {
			return
		}
		p.Status.Phase, p.Status.PodIP, p.Status.PodIPs = corev1.PodRunning, ip, []corev1.PodIP{{IP: ip}}
		must(client.CoreV1().Pods(ns).UpdateStatus(ctx, p, metav1.UpdateOptions{}))
	}
	for _, node := range e.lab.Nodes() {
		must(client.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: node}}, metav1.CreateOptions{}))
		pod("ferry-system", "ferry-agent-"+node, node, "ferry-agent", "")
	}
	for _, name := range []string{"a", "b", "c"} {
		p := e.pod(name)
		sa := p.ServiceAccount
		must(client.CoreV1().ServiceAccounts("shop").Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{}))
		pod("shop", name, p.Node, sa, p.IP.String())
	}
	// The lat pods, in a namespace not labelled yet.
	must(kc.CreateNamespace(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "lat"}}))
	for i := range 5 {
		must(client.CoreV1().ServiceAccounts("lat").Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("lat%d", i)}}, metav1.CreateOptions{}))
	}
	for i := range latPods {
		p := e.pod(fmt.Sprintf("l%d", i))
		pod("lat", p.Name, p.Node, p.ServiceAccount, p.IP.String())
	}

	dir := t.TempDir()
	sock := filepath.Join(dir, "grpc.sock")
	opLog, err := os.Create(filepath.Join(dir, "operator.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer opLog.Close()
	op := exec.Command(filepath.Join(e.bin, "ferry-operator"), "--kubeconfig", kc.Kubeconfig, "--namespace", "ferry-system",
		"--grpc-addr", "unix://"+sock, "--health-addr", "", "--metrics-addr", "")
	op.Stdout, op.Stderr = opLog, opLog
	if err := op.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		op.Process.Signal(syscall.SIGTERM)
		op.Wait()
		if t.Failed() {
			t.Logf("operator log:\n%s", tailFile(opLog.Name(), 30))
		}
	})
	var bundle string
	deadline := time.Now().Add(30 * time.Second)
	for bundle == "" && time.Now().Before(deadline) {
		if cm, err := client.CoreV1().ConfigMaps("ferry-system").Get(ctx, "ferry-ca-bundle", metav1.GetOptions{}); err == nil {
			bundle = cm.Data["ca.crt"]
		}
		time.Sleep(50 * time.Millisecond)
	}
	if bundle == "" {
		t.Fatal("the operator published no ferry-ca-bundle ConfigMap")
	}
	caFile := filepath.Join(dir, "ca.crt")
	if err := os.WriteFile(caFile, []byte(bundle), 0o644); err != nil {
		t.Fatal(err)
	}

	// Each agent gets a token as its DaemonSet pod would: projected, audience
	// ferry-operator, bound to the agent pod on its node.
	for _, node := range e.lab.Nodes() {
		ap, err := client.CoreV1().Pods("ferry-system").Get(ctx, "ferry-agent-"+node, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		tr, err := client.CoreV1().ServiceAccounts("ferry-system").CreateToken(ctx, "ferry-agent", &authnv1.TokenRequest{Spec: authnv1.TokenRequestSpec{
			Audiences:      []string{"ferry-operator"},
			BoundObjectRef: &authnv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: ap.Name, UID: ap.UID},
		}}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		tok := filepath.Join(dir, "token-"+node)
		if err := os.WriteFile(tok, []byte(tr.Status.Token), 0o600); err != nil {
			t.Fatal(err)
		}
		e.restartAgent(t, node, "--operator", "unix://"+sock, "--token-file", tok, "--operator-ca", caFile)
	}
	t.Cleanup(func() {
		for _, node := range e.lab.Nodes() {
			e.restartAgent(t, node) // back to the lab's local-mode operator
			e.waitEnrolled(t, node, append(shopPods(node), latOn(node)...)...)
		}
	})
	for _, node := range e.lab.Nodes() {
		e.waitEnrolled(t, node, shopPods(node)...)
	}
	a := e.pod("a")
	e.mustRun(t, "a", "echo", e.addr("c", echoPort), "65536")
	in := e.findConn(t, "node2", func(cn connRecord) bool {
		return cn.Direction == admin.Inbound && cn.Security == admin.MTLS && cn.Src.Addr() == a.IP && cn.BytesSent == 65536
	})
	if in.SrcIdentity != "spiffe://cluster.local/ns/shop/sa/web" || in.DstIdentity != "spiffe://cluster.local/ns/shop/sa/db" {
		t.Fatalf("node2 reports %s → %s, want the service accounts web → db", in.SrcIdentity, in.DstIdentity)
	}

	// Remove the label through the API: the pods leave, new connections are plaintext.
	ns, err := client.CoreV1().Namespaces().Get(ctx, "shop", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	delete(ns.Labels, "ferry.io/mesh")
	must(client.CoreV1().Namespaces().Update(ctx, ns, metav1.UpdateOptions{}))
	for _, node := range e.lab.Nodes() {
		e.waitEnrolled(t, node)
	}
	pcap := filepath.Join(t.TempDir(), "fabric.pcap")
	stop := e.capture(t, pcap)
	e.mustRun(t, "a", "echo", e.addr("c", echoPort), "65536")
	stop()
	raw, err := os.ReadFile(pcap)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(raw, []byte(Marker)) {
		t.Fatal("after the label was removed, a→c should cross the fabric in plaintext")
	}

	// Label again: time until every pod is enrolled with its certificate.
	ns, err = client.CoreV1().Namespaces().Get(ctx, "shop", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ns.Labels = map[string]string{"ferry.io/mesh": "enabled"}
	start := time.Now()
	must(client.CoreV1().Namespaces().Update(ctx, ns, metav1.UpdateOptions{}))
	for _, node := range e.lab.Nodes() {
		e.waitEnrolled(t, node, shopPods(node)...)
	}
	t.Logf("kube-apiserver: label → 3 pods on 2 nodes enrolled with certificates in %v", time.Since(start).Round(time.Millisecond))
	e.mustRun(t, "a", "echo", e.addr("c", echoPort), "4096")
	e.findConn(t, "node2", func(cn connRecord) bool {
		return cn.Direction == admin.Inbound && cn.Security == admin.MTLS && cn.Src.Addr() == a.IP && cn.BytesSent == 4096
	})

	// Label lat: the time from the label to each pod's first mTLS connection, over
	// latPods pods. Each pod's client connects in a loop from the moment of the
	// label; a connection counts when the server's agent records it as mTLS.
	ns, err = client.CoreV1().Namespaces().Get(ctx, "lat", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ns.Labels = map[string]string{"ferry.io/mesh": "enabled"}
	ds := e.firstMTLS(t, func() { must(client.CoreV1().Namespaces().Update(ctx, ns, metav1.UpdateOptions{})) })
	p := func(q float64) time.Duration { return ds[int(q*float64(len(ds)-1)+0.5)].Round(time.Millisecond) }
	t.Logf("kube-apiserver: label → first mTLS connection over %d pods on 2 nodes: p50 %v, p99 %v, max %v", len(ds), p(0.5), p(0.99), ds[len(ds)-1].Round(time.Millisecond))
	for _, node := range e.lab.Nodes() {
		e.waitEnrolled(t, node, append(shopPods(node), latOn(node)...)...)
	}
}

// firstMTLS returns, sorted, for each lat pod the time from start to the first
// connection the destination's agent recorded as mTLS from it (the record's start).
// Each pod runs a probe that opens a connection every 50 ms to a server on the other
// node; the probes start before the label.
func (e *env) firstMTLS(t *testing.T, label func()) []time.Duration {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	var procs []*exec.Cmd
	defer func() {
		cancel()
		for _, p := range procs {
			p.Wait()
		}
	}()
	src := map[netip.Addr]string{}
	for i := range latPods {
		name := fmt.Sprintf("l%d", i)
		server := "c"
		if i%2 == 1 {
			server = "a"
		}
		src[e.pod(name).IP] = name
		cmd := e.lab.Command(ctx, name, e.self, "-test.run=^$")
		cmd.Env = append(cmd.Env, scenarioEnv+"=probe "+e.addr(server, echoPort)+" 30")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		procs = append(procs, cmd)
	}
	// Every probe is connecting (in plaintext, its pod is not in the mesh yet) before
	// the label: the destination's agent has recorded each.
	probing := time.Now()
	seen := map[string]bool{}
	for deadline := probing.Add(30 * time.Second); len(seen) < latPods; time.Sleep(50 * time.Millisecond) {
		for _, node := range e.lab.Nodes() {
			for _, cn := range e.conns(node) {
				if name, ok := src[cn.Src.Addr()]; ok && cn.Direction == admin.Inbound && cn.Security == admin.Plaintext && !cn.Start.Before(probing) {
					seen[name] = true
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d probes were recorded by their destination's agent within 30s", len(seen), latPods)
		}
	}
	start := time.Now()
	label()
	first := map[string]time.Time{}
	deadline := time.Now().Add(30 * time.Second)
	for len(first) < latPods && time.Now().Before(deadline) {
		for _, node := range e.lab.Nodes() {
			for _, cn := range e.conns(node) {
				name, ok := src[cn.Src.Addr()]
				if !ok || cn.Direction != admin.Inbound || cn.Security != admin.MTLS {
					continue
				}
				if f, seen := first[name]; !seen || cn.Start.Before(f) {
					first[name] = cn.Start
				}
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	if len(first) < latPods {
		t.Fatalf("%d of %d pods made an mTLS connection within 30s of the label", len(first), latPods)
	}
	var ds []time.Duration
	for _, f := range first {
		ds = append(ds, f.Sub(start))
	}
	slices.Sort(ds)
	return ds
}

// conns lists the live and ended connections node's agent recorded.
func (e *env) conns(node string) []connRecord {
	cs, err := e.admin(node).Connections(context.Background())
	if err != nil {
		return nil
	}
	return append(cs.Live, cs.Ended...)
}

// readyz asks node's agent GET /readyz on its health port, from inside the node's
// network namespace, and returns the status line.
func (e *env) readyz(t *testing.T, node string) string {
	t.Helper()
	ns, err := e.lab.Netns(node)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	var status string
	err = ns.Do(func() error {
		// A plain dial on this locked thread: an http.Client would dial from another.
		c, err := net.DialTimeout("tcp", "127.0.0.1:15021", 2*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(2 * time.Second))
		if _, err := c.Write([]byte("GET /readyz HTTP/1.0\r\nHost: agent\r\n\r\n")); err != nil {
			return err
		}
		line, err := bufio.NewReader(c).ReadString('\n')
		status = strings.TrimSpace(line)
		return err
	})
	if err != nil {
		t.Fatalf("GET /readyz on %s: %v", node, err)
	}
	return status
}

// The operator serves the cluster-wide flow relay: `ferry observe --server` on its
// socket shows flows recorded by both nodes' agents, merged in time order.
func TestControlPlaneRelay(t *testing.T) {
	e := cpSetup(t)
	for _, node := range []string{"node1", "node2"} {
		e.waitEnrolled(t, node, append(shopPods(node), latOn(node)...)...)
	}
	sock := e.lab.RelaySocket()
	if sock == "" {
		t.Fatal("the lab's operator serves no relay")
	}
	e.mustRun(t, "a", "echo", e.addr("c", echoPort), "4096")  // recorded by node1 (source) and node2 (destination)
	e.mustRun(t, "l1", "echo", e.addr("a", echoPort), "4096") // l1 runs on node2, a on node1
	want := map[string]bool{"node1": false, "node2": false}
	var flows []*ferryv1.Flow
	for deadline := time.Now().Add(carryWait); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		out, err := exec.Command(filepath.Join(e.bin, "ferry"), "observe", "--server", "unix://"+sock, "--last", "200", "-o", "json").Output()
		if err != nil {
			continue // the relay reaches the agents on first use
		}
		flows = parseFlows(t, out)
		for _, f := range flows {
			want[f.GetNode()] = true
		}
		if want["node1"] && want["node2"] {
			break
		}
	}
	if !want["node1"] || !want["node2"] {
		t.Fatalf("relay flows came from %v, want both nodes:\n%s", want, flowsText(flows))
	}
	for i := 1; i < len(flows); i++ {
		if flows[i].GetTime().AsTime().Before(flows[i-1].GetTime().AsTime()) {
			t.Fatalf("relay flows out of time order at %d:\n%s", i, flowsText(flows))
		}
	}
}
