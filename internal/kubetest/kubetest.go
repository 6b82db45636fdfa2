// Package kubetest runs a real kube-apiserver and etcd for a test, on loopback,
// built from Go modules by hack/build-kube.sh (see docs/testing-kube.md).
//
// There is no kube-controller-manager, scheduler or kubelet: objects are stored
// and validated, admission and RBAC apply, but nothing reconciles them. In
// particular no "default" ServiceAccount appears in a new namespace, and the
// ServiceAccount admission plugin rejects pods whose service account is
// missing: Start adds it to the default and kube-system namespaces, and
// Cluster.CreateNamespace to the namespaces it creates.
package kubetest

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/hackbuild"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

const (
	// AdminUser is the user of Cluster.RestConfig and Cluster.Kubeconfig. Its
	// group, system:masters, passes every RBAC check.
	AdminUser = "kubetest-admin"
	// Issuer is the service-account token issuer, and the audience tokens get
	// when a TokenRequest names none.
	Issuer = "https://kubernetes.default.svc.cluster.local"
	// ServiceCIDR is the range Service cluster IPs come from.
	ServiceCIDR = "10.96.0.0/16"
)

// How long to wait for each server to become ready; generous because tests
// may share two cores with a build.
const (
	etcdReadyTimeout      = 60 * time.Second
	apiserverReadyTimeout = 3 * time.Minute
	stopGrace             = 15 * time.Second
	logTailLines          = 150
)

// Cluster is a running kube-apiserver with its etcd.
type Cluster struct {
	// Kubeconfig is the path of a kubeconfig file for AdminUser.
	Kubeconfig string
	// RestConfig authenticates as AdminUser. Copy it (rest.CopyConfig) before
	// changing it.
	RestConfig *rest.Config
	// URL is the API server's address, https://127.0.0.1:<port>.
	URL string
	// Kubectl is the path of a kubectl of the API server's version, built by
	// hack/build-kube.sh; use it with --kubeconfig Kubeconfig.
	Kubectl string

	ca *ca
}

// Start runs etcd and kube-apiserver for t, waits until the API server is
// ready, and stops both and removes their files when t ends. The binaries are
// built by hack/build-kube.sh on first use (minutes; cached after). If they
// are missing and cannot be built, t is skipped, or fails under
// FERRY_PRIVILEGED_TESTS=1.
func Start(t testing.TB) *Cluster {
	t.Helper()
	apiserverBin, etcdBin, kubectlBin := binaries(t)

	dir := t.TempDir()
	var procs []*process
	t.Cleanup(func() {
		// Last started, first stopped: the API server before its etcd.
		for i := len(procs) - 1; i >= 0; i-- {
			if err := procs[i].stop(stopGrace); err != nil {
				t.Errorf("kubetest: %v", err)
			}
		}
		if t.Failed() {
			for _, p := range procs {
				t.Log(p.logTail(logTailLines))
			}
		}
	})
	fail := func(format string, args ...any) {
		t.Helper()
		for _, p := range procs {
			t.Log(p.logTail(logTailLines))
		}
		t.Fatalf("kubetest: "+format, args...)
	}

	begin := time.Now()
	etcd, etcdURL, err := startEtcd(etcdBin, dir)
	if etcd != nil {
		procs = append(procs, etcd)
	}
	if err != nil {
		fail("%v", err)
	}
	etcdReady := time.Now()

	c, apiserver, err := startAPIServer(apiserverBin, dir, etcdURL)
	if apiserver != nil {
		procs = append(procs, apiserver)
	}
	if err != nil {
		fail("%v", err)
	}
	c.Kubectl = kubectlBin
	t.Logf("kubetest: API server %s ready in %v (etcd %v), logs in %s",
		c.URL, time.Since(begin).Round(time.Millisecond), etcdReady.Sub(begin).Round(time.Millisecond), dir)
	return c
}

// UserConfig returns a client configuration that authenticates as user in
// groups with a client certificate, for tests of RBAC rules.
func (c *Cluster) UserConfig(user string, groups ...string) (*rest.Config, error) {
	certPEM, keyPEM, err := c.ca.client(user, groups)
	if err != nil {
		return nil, fmt.Errorf("client certificate: %w", err)
	}
	return c.restConfig(certPEM, keyPEM), nil
}

// CreateNamespace creates ns and its "default" ServiceAccount, which a real
// cluster's controller manager would add and pods need.
func (c *Cluster) CreateNamespace(ctx context.Context, ns *corev1.Namespace) (*corev1.Namespace, error) {
	client, err := kubernetes.NewForConfig(c.RestConfig)
	if err != nil {
		return nil, fmt.Errorf("client: %w", err)
	}
	created, err := client.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("create namespace: %w", err)
	}
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default"}}
	if _, err := client.CoreV1().ServiceAccounts(created.Name).Create(ctx, sa, metav1.CreateOptions{}); err != nil {
		return nil, fmt.Errorf("create default service account: %w", err)
	}
	return created, nil
}

func (c *Cluster) restConfig(certPEM, keyPEM []byte) *rest.Config {
	return &rest.Config{
		Host: c.URL,
		TLSClientConfig: rest.TLSClientConfig{
			CAData:   c.ca.certPEM,
			CertData: certPEM,
			KeyData:  keyPEM,
		},
		// Tests create objects in bursts; client-go's default of 5 QPS would
		// make them slow for no benefit against a private server.
		QPS:   200,
		Burst: 400,
	}
}

// binaries returns the paths of kube-apiserver, etcd and kubectl, building
// them first if they are not in the cache.
func binaries(t testing.TB) (apiserver, etcd, kubectl string) {
	t.Helper()
	b := hackbuild.Binaries(t, "build-kube.sh", "kube-apiserver", "etcd", "kubectl")
	return b["kube-apiserver"], b["etcd"], b["kubectl"]
}

// startEtcd runs a single-member etcd on loopback with a fresh data folder and
// waits until it is healthy. The ports are picked free just before; if another
// process takes one first, it tries again with new ones.
func startEtcd(bin, dir string) (*process, string, error) {
	var lastErr error
	for attempt := 1; attempt <= 3; attempt++ {
		ports, err := freePorts(2)
		if err != nil {
			return nil, "", err
		}
		clientURL := "http://127.0.0.1:" + strconv.Itoa(ports[0])
		peerURL := "http://127.0.0.1:" + strconv.Itoa(ports[1])
		dataDir := filepath.Join(dir, "etcd-data-"+strconv.Itoa(attempt))
		p, err := startProcess("etcd", filepath.Join(dir, "etcd-"+strconv.Itoa(attempt)+".log"), bin,
			"--name=kubetest",
			"--data-dir="+dataDir,
			"--listen-client-urls="+clientURL,
			"--advertise-client-urls="+clientURL,
			"--listen-peer-urls="+peerURL,
			"--initial-advertise-peer-urls="+peerURL,
			"--initial-cluster=kubetest="+peerURL,
			"--initial-cluster-state=new",
			// Test data is thrown away: durability only costs time.
			"--unsafe-no-fsync",
			"--log-level=warn",
		)
		if err != nil {
			return nil, "", err
		}
		err = waitReady(p, http.DefaultClient, clientURL+"/health", etcdReadyTimeout)
		if err == nil {
			return p, clientURL, nil
		}
		if !portTaken(p) {
			return p, "", err
		}
		lastErr = err
	}
	return nil, "", fmt.Errorf("etcd: no free ports after 3 attempts: %w", lastErr)
}

// startAPIServer writes the cluster's certificates, keys and kubeconfig, runs
// kube-apiserver against etcdURL and waits until /readyz answers ok.
func startAPIServer(bin, dir, etcdURL string) (*Cluster, *process, error) {
	pki := filepath.Join(dir, "pki")
	if err := os.Mkdir(pki, 0o700); err != nil {
		return nil, nil, fmt.Errorf("pki folder: %w", err)
	}
	authority, err := newCA()
	if err != nil {
		return nil, nil, err
	}
	servingCert, servingKey, err := authority.serving()
	if err != nil {
		return nil, nil, err
	}
	adminCert, adminKey, err := authority.client(AdminUser, []string{"system:masters"})
	if err != nil {
		return nil, nil, err
	}
	files := map[string][]byte{
		filepath.Join(pki, "ca.crt"):      authority.certPEM,
		filepath.Join(pki, "serving.crt"): servingCert,
		filepath.Join(pki, "serving.key"): servingKey,
	}
	if err := writeFiles(files); err != nil {
		return nil, nil, err
	}
	saKey, saPub, err := writeServiceAccountKeys(pki)
	if err != nil {
		return nil, nil, err
	}

	var lastErr error
	for attempt := 1; attempt <= 3; attempt++ {
		ports, err := freePorts(1)
		if err != nil {
			return nil, nil, err
		}
		c := &Cluster{URL: "https://127.0.0.1:" + strconv.Itoa(ports[0]), ca: authority}
		c.RestConfig = c.restConfig(adminCert, adminKey)
		p, err := startProcess("kube-apiserver", filepath.Join(dir, "kube-apiserver-"+strconv.Itoa(attempt)+".log"), bin,
			"--etcd-servers="+etcdURL,
			"--bind-address=127.0.0.1",
			"--advertise-address=127.0.0.1",
			"--secure-port="+strconv.Itoa(ports[0]),
			"--cert-dir="+pki,
			"--tls-cert-file="+filepath.Join(pki, "serving.crt"),
			"--tls-private-key-file="+filepath.Join(pki, "serving.key"),
			"--client-ca-file="+filepath.Join(pki, "ca.crt"),
			"--authorization-mode=RBAC",
			"--service-cluster-ip-range="+ServiceCIDR,
			"--service-account-issuer="+Issuer,
			"--service-account-key-file="+saPub,
			"--service-account-signing-key-file="+saKey,
			"--api-audiences="+Issuer,
			// Lab pods run privileged programs (the agent among them).
			"--allow-privileged=true",
			// The reconciler would publish 127.0.0.1 as the endpoint of the
			// "kubernetes" Service, which validation rejects (loopback).
			"--endpoint-reconciler-type=none",
			"--profiling=false",
		)
		if err != nil {
			return nil, nil, err
		}
		transport, err := rest.TransportFor(c.RestConfig)
		if err != nil {
			return nil, p, fmt.Errorf("client transport: %w", err)
		}
		err = waitReady(p, &http.Client{Transport: transport, Timeout: 5 * time.Second}, c.URL+"/readyz", apiserverReadyTimeout)
		if err == nil {
			err = addDefaultServiceAccounts(c.RestConfig, p)
		}
		if err == nil {
			c.Kubeconfig = filepath.Join(dir, "kubeconfig")
			if err := writeKubeconfig(c.Kubeconfig, c.URL, authority.certPEM, adminCert, adminKey); err != nil {
				return nil, p, err
			}
			return c, p, nil
		}
		if !portTaken(p) {
			return nil, p, err
		}
		lastErr = err
	}
	return nil, nil, fmt.Errorf("kube-apiserver: no free port after 3 attempts: %w", lastErr)
}

// addDefaultServiceAccounts adds the "default" ServiceAccount to the default
// and kube-system namespaces, as the missing controller manager would, so
// pods can be created there. kube-system itself appears a moment after the
// server is ready.
func addDefaultServiceAccounts(cfg *rest.Config, p *process) error {
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("client: %w", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, ns := range []string{metav1.NamespaceDefault, metav1.NamespaceSystem} {
		sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default"}}
		for {
			_, err := client.CoreV1().ServiceAccounts(ns).Create(ctx, sa, metav1.CreateOptions{})
			if err == nil || apierrors.IsAlreadyExists(err) {
				break
			}
			if exited, exitErr := p.exitErr(); exited {
				return exitErr
			}
			if !apierrors.IsNotFound(err) || ctx.Err() != nil {
				return fmt.Errorf("default service account in %s: %w", ns, err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	return nil
}

// waitReady polls url until it answers 200, the process exits or timeout passes.
func waitReady(p *process, client *http.Client, url string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var last string
	for {
		if exited, err := p.exitErr(); exited {
			return err
		}
		resp, err := client.Get(url)
		if err == nil {
			body := make([]byte, 512)
			n, _ := resp.Body.Read(body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = fmt.Sprintf("%s: %s", resp.Status, bytes.TrimSpace(body[:n]))
		} else {
			last = err.Error()
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not ready after %v: %s", p.name, timeout, last)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// portTaken reports whether p died because its port was taken meanwhile.
func portTaken(p *process) bool {
	if exited, _ := p.exitErr(); !exited {
		return false
	}
	data, err := os.ReadFile(p.logPath)
	return err == nil && bytes.Contains(data, []byte("address already in use"))
}

// freePorts returns n distinct ports that were free on 127.0.0.1 a moment ago.
func freePorts(n int) ([]int, error) {
	ports := make([]int, 0, n)
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("free port: %w", err)
		}
		// Held open until all are picked so the n ports differ.
		defer l.Close()
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

func writeKubeconfig(path, url string, caPEM, certPEM, keyPEM []byte) error {
	const name = "kubetest"
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters[name] = &clientcmdapi.Cluster{Server: url, CertificateAuthorityData: caPEM}
	cfg.AuthInfos[AdminUser] = &clientcmdapi.AuthInfo{ClientCertificateData: certPEM, ClientKeyData: keyPEM}
	cfg.Contexts[name] = &clientcmdapi.Context{Cluster: name, AuthInfo: AdminUser, Namespace: "default"}
	cfg.CurrentContext = name
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		return fmt.Errorf("kubeconfig: %w", err)
	}
	return nil
}
