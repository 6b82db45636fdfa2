package operator_test

// The operator against a real kube-apiserver (internal/kubetest): TokenReview of
// bound pod tokens, the CA Secret and bundle ConfigMap, leader election between two
// processes, and a full sync of 1,000 pods and 200 services.

import (
	"bufio"
	"context"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/api/ferryv1"
	"github.com/ferrymesh/ferry/internal/kubetest"
	"github.com/ferrymesh/ferry/operator"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/clientcmd"
)

const systemNS = "ferry-system"

// cluster is a kube-apiserver with the objects an installed Ferry has: its
// namespace, the agent service account, nodes and one agent pod per node.
type cluster struct {
	*kubetest.Cluster
	client kubernetes.Interface
}

func startCluster(t *testing.T, nodes ...string) *cluster {
	t.Helper()
	kc := kubetest.Start(t)
	client, err := kubernetes.NewForConfig(kc.RestConfig)
	if err != nil {
		t.Fatal(err)
	}
	c := &cluster{Cluster: kc, client: client}
	ctx := context.Background()
	if _, err := kc.CreateNamespace(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: systemNS}}); err != nil {
		t.Fatal(err)
	}
	c.serviceAccount(t, systemNS, operator.DefaultAgentSA)
	for _, n := range nodes {
		if _, err := client.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		c.pod(t, systemNS, "ferry-agent-"+n, n, operator.DefaultAgentSA, "", nil)
	}
	return c
}

func (c *cluster) serviceAccount(t testing.TB, ns, name string) {
	t.Helper()
	_, err := c.client.CoreV1().ServiceAccounts(ns).Create(context.Background(), &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
}

// pod creates a pod scheduled on node and, with ip set, gives it that address as a
// kubelet would.
func (c *cluster) pod(t testing.TB, ns, name, node, sa, ip string, labels map[string]string) *corev1.Pod {
	t.Helper()
	ctx := context.Background()
	p, err := c.client.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels},
		Spec: corev1.PodSpec{
			NodeName:           node,
			ServiceAccountName: sa,
			Containers:         []corev1.Container{{Name: "app", Image: "example.invalid/app"}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if ip == "" {
		return p
	}
	p.Status.Phase = corev1.PodRunning
	p.Status.PodIP = ip
	p.Status.PodIPs = []corev1.PodIP{{IP: ip}}
	p, err = c.client.CoreV1().Pods(ns).UpdateStatus(ctx, p, metav1.UpdateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// token is a projected token of sa bound to pod, for audience.
func (c *cluster) token(t *testing.T, ns, sa, pod, audience string) string {
	t.Helper()
	p, err := c.client.CoreV1().Pods(ns).Get(context.Background(), pod, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	tr, err := c.client.CoreV1().ServiceAccounts(ns).CreateToken(context.Background(), sa, &authnv1.TokenRequest{
		Spec: authnv1.TokenRequestSpec{
			Audiences:      []string{audience},
			BoundObjectRef: &authnv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod, UID: p.UID},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return tr.Status.Token
}

// operatorKubeconfig applies deploy/operator/rbac.yaml and returns a kubeconfig
// that acts as the operator's service account under it.
func (c *cluster) operatorKubeconfig(t *testing.T) string {
	t.Helper()
	data, err := os.ReadFile("../deploy/operator/rbac.yaml")
	if err != nil {
		t.Fatalf("operator RBAC: %v", err)
	}
	ctx := context.Background()
	r := utilyaml.NewYAMLReader(bufio.NewReader(strings.NewReader(string(data))))
	for {
		doc, err := r.Read()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		obj, _, err := scheme.Codecs.UniversalDeserializer().Decode(doc, nil, nil)
		if err != nil {
			if strings.TrimSpace(string(doc)) == "" || strings.Contains(err.Error(), "Object 'Kind' is missing") {
				continue
			}
			t.Fatalf("operator RBAC: %v", err)
		}
		rbac := c.client.RbacV1()
		switch o := obj.(type) {
		case *rbacv1.ClusterRole:
			_, err = rbac.ClusterRoles().Create(ctx, o, metav1.CreateOptions{})
		case *rbacv1.ClusterRoleBinding:
			_, err = rbac.ClusterRoleBindings().Create(ctx, o, metav1.CreateOptions{})
		case *rbacv1.Role:
			_, err = rbac.Roles(o.Namespace).Create(ctx, o, metav1.CreateOptions{})
		case *rbacv1.RoleBinding:
			_, err = rbac.RoleBindings(o.Namespace).Create(ctx, o, metav1.CreateOptions{})
		default:
			t.Fatalf("operator RBAC: unexpected %T", obj)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	cfg, err := clientcmd.LoadFromFile(c.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	for _, ai := range cfg.AuthInfos {
		ai.Impersonate = "system:serviceaccount:" + systemNS + ":ferry-operator"
		ai.ImpersonateGroups = []string{"system:serviceaccounts", "system:serviceaccounts:" + systemNS, "system:authenticated"}
	}
	path := filepath.Join(t.TempDir(), "operator.kubeconfig")
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		t.Fatal(err)
	}
	return path
}

// bundleFile waits for the trust bundle ConfigMap the leader publishes and writes
// it to a file, as agents mount it for --operator-ca.
func (c *cluster) bundleFile(t *testing.T) string {
	t.Helper()
	var cm *corev1.ConfigMap
	waitFor(t, 10*time.Second, "bundle ConfigMap", func() bool {
		var err error
		cm, err = c.client.CoreV1().ConfigMaps(systemNS).Get(context.Background(), operator.BundleConfig, metav1.GetOptions{})
		return err == nil
	})
	caFile := filepath.Join(t.TempDir(), "ca.crt")
	if err := os.WriteFile(caFile, []byte(cm.Data[operator.BundleKey]), 0o644); err != nil {
		t.Fatal(err)
	}
	return caFile
}

func bearer(ctx context.Context, token string) context.Context {
	if token == "" {
		return ctx
	}
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
}

func TestClusterMode(t *testing.T) {
	c := startCluster(t, "node1", "node2")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if _, err := c.CreateNamespace(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop", Labels: map[string]string{"ferry.io/mesh": "enabled"}}}); err != nil {
		t.Fatal(err)
	}
	c.serviceAccount(t, "shop", "web")
	c.serviceAccount(t, "shop", "api")
	c.pod(t, "shop", "web", "node1", "web", "10.102.1.10", map[string]string{"app": "web"})
	c.pod(t, "shop", "api", "node2", "api", "10.102.2.10", map[string]string{"app": "api"})

	sock := filepath.Join(t.TempDir(), "grpc.sock")
	// The operator runs with the permissions deploy/ gives it, and leader election
	// on, so a missing RBAC rule fails here.
	op, err := operator.New(operator.Config{
		Kubeconfig: c.operatorKubeconfig(t), Namespace: systemNS, GRPCAddr: "unix://" + sock,
		AgentServiceAccount: operator.DefaultAgentSA, CertTTL: time.Hour, LeaderElect: true,
	}, slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	if err != nil {
		t.Fatal(err)
	}
	if err := op.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer op.Stop(context.Background())
	waitFor(t, 30*time.Second, "operator ready", op.Ready)

	// The CA root is in its Secret, and the trust bundle in the ConfigMap agents mount.
	secret, err := c.client.CoreV1().Secrets(systemNS).Get(ctx, "ferry-ca", metav1.GetOptions{})
	if err != nil {
		t.Fatalf("CA Secret: %v", err)
	}
	caFile := c.bundleFile(t)
	if b, _ := os.ReadFile(caFile); string(b) != string(secret.Data["tls.crt"]) {
		t.Fatal("ConfigMap ferry-ca-bundle does not hold the CA certificate of Secret ferry-ca")
	}
	conn := dial(t, sock, caFile)

	node1 := c.token(t, systemNS, operator.DefaultAgentSA, "ferry-agent-node1", "ferry-operator")
	node2 := c.token(t, systemNS, operator.DefaultAgentSA, "ferry-agent-node2", "ferry-operator")
	stream, err := ferryv1.NewDiscoveryClient(conn).StreamState(bearer(ctx, node1))
	if err != nil {
		t.Fatal(err)
	}
	stream.Send(&ferryv1.StateRequest{Node: "node1"})
	st, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if len(st.GetWorkloads()) != 2 || st.GetWorkloads()[1].GetIdentity() != "spiffe://cluster.local/ns/shop/sa/web" {
		t.Fatalf("workloads: %v", st.GetWorkloads())
	}
	stream.Send(&ferryv1.StateRequest{Node: "node1", VersionAck: st.GetVersion(), ResponseTo: st.GetVersion()})

	certs := ferryv1.NewCertificatesClient(conn)
	web := "spiffe://cluster.local/ns/shop/sa/web"
	resp, err := certs.Sign(bearer(ctx, node1), &ferryv1.SignRequest{Identity: web, CsrPem: csr(t)})
	if err != nil {
		t.Fatalf("sign for a pod on the agent's node: %v", err)
	}
	block, _ := pem.Decode(resp.GetCertChainPem())
	leaf, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != web || len(leaf.DNSNames)+len(leaf.IPAddresses)+len(leaf.EmailAddresses) != 0 {
		t.Fatalf("certificate names: URIs %v DNS %v; want exactly %s", leaf.URIs, leaf.DNSNames, web)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(secret.Data["tls.crt"])
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Fatalf("certificate does not chain to the CA Secret: %v", err)
	}

	webPod := c.token(t, "shop", "web", "web", "ferry-operator")
	wrongAudience := c.token(t, systemNS, operator.DefaultAgentSA, "ferry-agent-node1", kubetest.Issuer)
	for _, tc := range []struct {
		name, token string
		code        codes.Code
	}{
		{"no pod of the service account on the agent's node (another node's token)", node2, codes.PermissionDenied},
		{"no token", "", codes.Unauthenticated},
		{"token of a workload, not the agent", webPod, codes.Unauthenticated},
		{"token for another audience", wrongAudience, codes.Unauthenticated},
		{"garbage token", "not-a-jwt", codes.Unauthenticated},
	} {
		_, err := certs.Sign(bearer(ctx, tc.token), &ferryv1.SignRequest{Identity: web, CsrPem: csr(t)})
		if status.Code(err) != tc.code {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.code)
		} else {
			t.Logf("refused as expected, %s: %v", tc.name, status.Convert(err).Message())
		}
	}
	// A stream for node2 with node1's token is refused.
	other, err := ferryv1.NewDiscoveryClient(conn).StreamState(bearer(ctx, node1))
	if err != nil {
		t.Fatal(err)
	}
	other.Send(&ferryv1.StateRequest{Node: "node2"})
	if _, err := other.Recv(); status.Code(err) != codes.PermissionDenied {
		t.Errorf("stream for node2 with node1's token: %v, want PermissionDenied", err)
	}

	// Removing the label takes the namespace's pods out of every node's state.
	ns, err := c.client.CoreV1().Namespaces().Get(ctx, "shop", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	delete(ns.Labels, "ferry.io/mesh")
	if _, err := c.client.CoreV1().Namespaces().Update(ctx, ns, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	next, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if len(next.GetWorkloads()) != 0 || next.GetVersion() <= st.GetVersion() {
		t.Fatalf("after removing the label: version %d (was %d), %d workloads", next.GetVersion(), st.GetVersion(), len(next.GetWorkloads()))
	}
}

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// operatorBinary builds cmd/ferry-operator once per test binary.
func operatorBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "ferry-operator-test-")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "ferry-operator")
		out, err := exec.Command("go", "build", "-o", binPath, "github.com/ferrymesh/ferry/cmd/ferry-operator").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("build ferry-operator: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

// process is a ferry-operator process with its health and metrics on sockets.
type process struct {
	cmd     *exec.Cmd
	dir     string
	log     string
	done    chan struct{}
	started time.Time
}

func runOperator(t *testing.T, kubeconfig, id string, args ...string) *process {
	t.Helper()
	dir := t.TempDir()
	p := &process{dir: dir, log: filepath.Join(dir, "operator.log"), done: make(chan struct{})}
	logf, err := os.Create(p.log)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	p.cmd = exec.Command(operatorBinary(t), append([]string{
		"--kubeconfig", kubeconfig, "--namespace", systemNS, "--id", id,
		"--grpc-addr", "unix://" + filepath.Join(dir, "grpc.sock"),
		"--health-addr", "unix://" + filepath.Join(dir, "health.sock"),
		"--metrics-addr", "unix://" + filepath.Join(dir, "metrics.sock"),
	}, args...)...)
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	p.started = time.Now()
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		p.cmd.Process.Kill()
		<-p.done
		if t.Failed() {
			b, _ := os.ReadFile(p.log)
			t.Logf("log of operator %s:\n%s", id, b)
		}
	})
	return p
}

func (p *process) get(path string) (string, int, error) {
	sock := "health.sock"
	if path == "/metrics" {
		sock = "metrics.sock"
	}
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", filepath.Join(p.dir, sock))
		},
	}}
	defer client.CloseIdleConnections()
	resp, err := client.Get("http://operator" + path)
	if err != nil {
		return "", 0, err
	}
	defer resp.Body.Close()
	var b strings.Builder
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		b.WriteString(sc.Text())
		b.WriteByte('\n')
	}
	return b.String(), resp.StatusCode, nil
}

// metric reads one unlabelled sample from /metrics; ok is false when it is absent.
func (p *process) metric(name string) (float64, bool) {
	body, code, err := p.get("/metrics")
	if err != nil || code != http.StatusOK {
		return 0, false
	}
	for _, line := range strings.Split(body, "\n") {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			return f, err == nil
		}
	}
	return 0, false
}

func (p *process) ready() bool {
	_, code, err := p.get("/readyz")
	return err == nil && code == http.StatusOK
}

func leaseHolder(t *testing.T, c *cluster) string {
	l, err := c.client.CoordinationV1().Leases(systemNS).Get(context.Background(), operator.LeaseName, metav1.GetOptions{})
	if err != nil || l.Spec.HolderIdentity == nil {
		return ""
	}
	return *l.Spec.HolderIdentity
}

// Two replicas: one leads (it alone creates the CA), both serve; killing the
// leader hands the Lease to the other (the time it took is logged).
func TestLeaderElection(t *testing.T) {
	c := startCluster(t, "node1")
	const lease = 4 * time.Second
	args := []string{"--leader-elect", "--lease-duration", lease.String(), "--renew-deadline", "3s", "--retry-period", "250ms"}
	ops := map[string]*process{
		"op1": runOperator(t, c.Kubeconfig, "op1", args...),
		"op2": runOperator(t, c.Kubeconfig, "op2", args...),
	}
	waitFor(t, 60*time.Second, "both replicas ready", func() bool { return ops["op1"].ready() && ops["op2"].ready() })
	leader := leaseHolder(t, c)
	if ops[leader] == nil {
		t.Fatalf("lease holder %q is not one of the replicas", leader)
	}
	follower := "op1"
	if leader == "op1" {
		follower = "op2"
	}
	if v, _ := ops[leader].metric("ferry_operator_leader"); v != 1 {
		t.Fatalf("leader %s reports ferry_operator_leader %v", leader, v)
	}
	if v, _ := ops[follower].metric("ferry_operator_leader"); v != 0 {
		t.Fatalf("follower %s reports ferry_operator_leader %v", follower, v)
	}
	killed := time.Now()
	ops[leader].cmd.Process.Signal(syscall.SIGKILL)
	<-ops[leader].done
	// The deadline only stops a hung test; how long the handover took is reported,
	// not asserted (on a loaded machine it can exceed the lease without a bug).
	waitFor(t, time.Minute, "the follower to take the lease", func() bool { return leaseHolder(t, c) == follower })
	took := time.Since(killed)
	waitFor(t, 30*time.Second, "the new leader to say so", func() bool { v, _ := ops[follower].metric("ferry_operator_leader"); return v == 1 })
	t.Logf("leader %s killed; %s took over the lease in %v (lease duration %v, retry period 250ms)", leader, follower, took.Round(time.Millisecond), lease)
}

// A full sync of 1,000 pods and 200 services created through the API: how long a
// fresh operator takes to serve them, and its memory.
func TestFullSyncScale(t *testing.T) {
	const (
		nodes      = 10
		namespaces = 5
		pods       = 1000
		services   = 200
	)
	var names []string
	for i := range nodes {
		names = append(names, fmt.Sprintf("node%d", i+1))
	}
	c := startCluster(t, names...)
	ctx := context.Background()
	begin := time.Now()
	for n := range namespaces {
		ns := fmt.Sprintf("scale%d", n)
		if _, err := c.CreateNamespace(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns, Labels: map[string]string{"ferry.io/mesh": "enabled"}}}); err != nil {
			t.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	sem := make(chan struct{}, 16)
	for i := range pods {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			ns := fmt.Sprintf("scale%d", i%namespaces)
			ip := fmt.Sprintf("10.102.%d.%d", i/250, i%250+2)
			c.pod(t, ns, fmt.Sprintf("p%d", i), names[i%nodes], "default", ip, map[string]string{"app": fmt.Sprintf("s%d", (i/namespaces)%(services/namespaces))})
		}()
	}
	for i := range services {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			ns := fmt.Sprintf("scale%d", i%namespaces)
			_, err := c.client.CoreV1().Services(ns).Create(ctx, &corev1.Service{
				ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("s%d", i/namespaces)},
				Spec: corev1.ServiceSpec{
					Selector: map[string]string{"app": fmt.Sprintf("s%d", i/namespaces)},
					Ports:    []corev1.ServicePort{{Name: "http", Port: 80}},
				},
			}, metav1.CreateOptions{})
			if err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	t.Logf("created %d pods (with status) and %d services in %d namespaces through the API in %v", pods, services, namespaces, time.Since(begin).Round(time.Millisecond))

	p := runOperator(t, c.Kubeconfig, "scale")
	var synced time.Duration
	waitFor(t, 2*time.Minute, "all workloads and services in the view", func() bool {
		w, _ := p.metric("ferry_operator_workloads")
		s, _ := p.metric("ferry_operator_services")
		if w == pods && s == services {
			synced = time.Since(p.started)
			return true
		}
		return false
	})
	waitFor(t, time.Minute, "ready", p.ready)
	rss, _ := p.metric("process_resident_memory_bytes")
	heap, _ := p.metric("go_memstats_heap_inuse_bytes")
	t.Logf("full sync of %d pods and %d services: %v from process start to the complete view (metrics polled every ~20 ms); RSS %.1f MiB, heap in use %.1f MiB",
		pods, services, synced.Round(time.Millisecond), rss/(1<<20), heap/(1<<20))
}
