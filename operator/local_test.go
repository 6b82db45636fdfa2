package operator_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/api/ferryv1"
	"github.com/ferrymesh/ferry/operator"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

const manifests = `apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    ferry.io/mesh: enabled
---
apiVersion: v1
kind: Node
metadata:
  name: node1
---
apiVersion: v1
kind: Node
metadata:
  name: node2
---
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: shop
  labels: {app: web}
spec:
  nodeName: node1
  serviceAccountName: web
  containers: [{name: app, image: none}]
status:
  podIP: 10.102.1.10
---
apiVersion: v1
kind: Pod
metadata:
  name: db
  namespace: shop
  labels: {app: db, ferry.io/mesh: disabled}
spec:
  nodeName: node2
  serviceAccountName: db
  containers: [{name: app, image: none}]
status:
  podIP: 10.102.2.10
---
apiVersion: v1
kind: Pod
metadata:
  name: api
  namespace: shop
  labels: {app: api}
spec:
  nodeName: node2
  serviceAccountName: api
  containers: [{name: app, image: none}]
status:
  podIP: 10.102.2.11
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
# Other kinds may share the folder; local mode skips them.
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
spec: {}
`

// localOperator runs an operator in local mode on a temp folder.
func localOperator(t *testing.T) (op *operator.Operator, dir, state, sock string) {
	t.Helper()
	base := t.TempDir()
	dir, state = filepath.Join(base, "manifests"), filepath.Join(base, "state")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "shop.yaml"), []byte(manifests), 0o644); err != nil {
		t.Fatal(err)
	}
	sock = filepath.Join(base, "grpc.sock")
	op, err := operator.New(operator.Config{
		Local: dir, StateDir: state, GRPCAddr: "unix://" + sock, CertTTL: time.Hour, PollInterval: 50 * time.Millisecond,
	}, slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	if err != nil {
		t.Fatal(err)
	}
	if err := op.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { op.Stop(context.Background()) })
	waitFor(t, 10*time.Second, "operator ready", op.Ready)
	return op, dir, state, sock
}

func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func dial(t *testing.T, sock, caFile string) *grpc.ClientConn {
	t.Helper()
	pemData, err := os.ReadFile(caFile)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(pemData)
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: roots, ServerName: "localhost"})))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func withToken(ctx context.Context, t *testing.T, state, node string) context.Context {
	t.Helper()
	if node == "" {
		return ctx
	}
	tok, err := os.ReadFile(filepath.Join(state, "tokens", node))
	if err != nil {
		t.Fatal(err)
	}
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+strings.TrimSpace(string(tok)))
}

// stateStream opens a state stream as node's agent (ctx carries its token) and
// asks for the state.
func stateStream(t *testing.T, ctx context.Context, conn *grpc.ClientConn, node string) ferryv1.Discovery_StreamStateClient {
	t.Helper()
	stream, err := ferryv1.NewDiscoveryClient(conn).StreamState(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&ferryv1.StateRequest{Node: node}); err != nil {
		t.Fatal(err)
	}
	return stream
}

// untilLoadBalancers reads states, acknowledging each, until the services' load
// balancers are want (service name → load_balancer).
func untilLoadBalancers(t *testing.T, stream ferryv1.Discovery_StreamStateClient, node, what string, want map[string]string) {
	t.Helper()
	var got map[string]string
	for !maps.Equal(got, want) {
		st, err := stream.Recv()
		if err != nil {
			t.Fatalf("%s: services' load balancers %v, want %v: %v", what, got, want, err)
		}
		got = map[string]string{}
		for _, s := range st.GetServices() {
			got[s.GetName()] = s.GetLoadBalancer()
		}
		if err := stream.Send(&ferryv1.StateRequest{Node: node, VersionAck: st.GetVersion(), ResponseTo: st.GetVersion()}); err != nil {
			t.Fatal(err)
		}
	}
}

func csr(t *testing.T) []byte {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
}

func TestLocalModeStreamsNodeState(t *testing.T) {
	_, dir, state, sock := localOperator(t)
	conn := dial(t, sock, filepath.Join(state, "ca.crt"))
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	stream := stateStream(t, withToken(ctx, t, state, "node1"), conn, "node1")
	st, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, w := range st.GetWorkloads() {
		got = append(got, w.GetNamespace()+"/"+w.GetName()+" "+w.GetNode()+" "+strings.Join(w.GetIps(), ",")+" "+w.GetIdentity())
	}
	want := []string{
		"shop/api node2 10.102.2.11 spiffe://cluster.local/ns/shop/sa/api",
		"shop/web node1 10.102.1.10 spiffe://cluster.local/ns/shop/sa/web",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("workloads:\n%s\nwant (db opted out):\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if st.GetNode() != "node1" || len(st.GetTrustBundlePem()) == 0 || len(st.GetCertificates()) != 0 {
		t.Fatalf("state: node %q, bundle %d bytes, %d certificates", st.GetNode(), len(st.GetTrustBundlePem()), len(st.GetCertificates()))
	}
	if len(st.GetServices()) != 1 || len(st.GetServices()[0].GetEndpoints()) != 1 {
		t.Fatalf("services: %v", st.GetServices())
	}
	if err := stream.Send(&ferryv1.StateRequest{Node: "node1", VersionAck: st.GetVersion(), ResponseTo: st.GetVersion()}); err != nil {
		t.Fatal(err)
	}

	// Removing the namespace label takes every pod out; the stream carries it.
	edited := strings.Replace(manifests, "ferry.io/mesh: enabled", "team: shop", 1)
	if err := os.WriteFile(filepath.Join(dir, "shop.yaml"), []byte(edited), 0o644); err != nil {
		t.Fatal(err)
	}
	next, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if next.GetVersion() <= st.GetVersion() || len(next.GetWorkloads()) != 0 {
		t.Fatalf("after unlabel: version %d (was %d), %d workloads", next.GetVersion(), st.GetVersion(), len(next.GetWorkloads()))
	}

	// A stream that names another node than its token is refused.
	other, err := ferryv1.NewDiscoveryClient(conn).StreamState(withToken(ctx, t, state, "node1"))
	if err != nil {
		t.Fatal(err)
	}
	other.Send(&ferryv1.StateRequest{Node: "node2"})
	if _, err := other.Recv(); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("stream for node2 with node1's token: %v, want PermissionDenied", err)
	}
}

func TestLocalModeCertificates(t *testing.T) {
	_, _, state, sock := localOperator(t)
	conn := dial(t, sock, filepath.Join(state, "ca.crt"))
	certs := ferryv1.NewCertificatesClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	web := "spiffe://cluster.local/ns/shop/sa/web"

	resp, err := certs.Sign(withToken(ctx, t, state, "node1"), &ferryv1.SignRequest{Identity: web, CsrPem: csr(t)})
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(resp.GetCertChainPem())
	leaf, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != web || len(leaf.DNSNames) != 0 || len(leaf.IPAddresses) != 0 {
		t.Fatalf("certificate names: URIs %v DNS %v IPs %v; want exactly %s", leaf.URIs, leaf.DNSNames, leaf.IPAddresses, web)
	}
	for _, tc := range []struct {
		name, node, id string
		code           codes.Code
	}{
		{"service account with no pod on the node", "node2", web, codes.PermissionDenied},
		{"no token", "", web, codes.Unauthenticated},
		{"other trust domain", "node1", "spiffe://evil.example/ns/shop/sa/web", codes.InvalidArgument},
	} {
		_, err := certs.Sign(withToken(ctx, t, state, tc.node), &ferryv1.SignRequest{Identity: tc.id, CsrPem: csr(t)})
		if status.Code(err) != tc.code {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.code)
		}
	}
	bad := metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer not-a-token")
	if _, err := certs.Sign(bad, &ferryv1.SignRequest{Identity: web, CsrPem: csr(t)}); status.Code(err) != codes.Unauthenticated {
		t.Errorf("unknown token: %v, want Unauthenticated", err)
	}
}

func TestLocalModeMalformedManifest(t *testing.T) {
	op, dir, state, sock := localOperator(t)
	bad := `apiVersion: v1
kind: Pod
metadata:
  name: broken
  namespace: shop
spec:
  nodeName: [node1]
`
	if err := os.WriteFile(filepath.Join(dir, "broken.yaml"), []byte(bad), 0o644); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "manifest error", func() bool { return len(op.ManifestErrors()) > 0 })
	if n := len(op.ManifestErrors()); n != 1 {
		t.Fatalf("%d manifest errors, want the one of broken.yaml: %v", n, op.ManifestErrors())
	}
	msg := op.ManifestErrors()[0].Error()
	if !strings.Contains(msg, "broken.yaml") || !strings.Contains(msg, "spec.nodeName") {
		t.Fatalf("error %q does not name the file and the field", msg)
	}
	t.Logf("reported: %s", msg)
	// Everything else is still served.
	conn := dial(t, sock, filepath.Join(state, "ca.crt"))
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	stream, err := ferryv1.NewDiscoveryClient(conn).StreamState(withToken(ctx, t, state, "node2"))
	if err != nil {
		t.Fatal(err)
	}
	stream.Send(&ferryv1.StateRequest{Node: "node2"})
	st, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if len(st.GetWorkloads()) != 2 {
		t.Fatalf("%d workloads served, want 2", len(st.GetWorkloads()))
	}
}

// The sample manifests in deploy/examples/local load without errors.
func TestExampleManifests(t *testing.T) {
	state := t.TempDir()
	op, err := operator.New(operator.Config{
		Local: "../deploy/examples/local", StateDir: state, GRPCAddr: "unix://" + filepath.Join(state, "grpc.sock"),
	}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	if err := op.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer op.Stop(context.Background())
	waitFor(t, 10*time.Second, "operator ready", op.Ready)
	if errs := op.ManifestErrors(); len(errs) != 0 {
		t.Fatalf("manifest errors: %v", errs)
	}
	snap, _ := op.View().Current()
	if len(snap.Workloads) != 2 || len(snap.Services) != 1 {
		t.Fatalf("%d workloads and %d services, want web and api, and service api", len(snap.Workloads), len(snap.Services))
	}
	if len(snap.Services[0].RouteTables) != 1 || len(snap.ConfigStatus) != 1 || !snap.ConfigStatus[0].Conditions[0].Status {
		t.Fatalf("api's route tables %v, statuses %v; want routes.yaml's route accepted", snap.Services[0].RouteTables, snap.ConfigStatus)
	}
	for _, node := range []string{"node1", "node2"} {
		if _, err := os.Stat(filepath.Join(state, "tokens", node)); err != nil {
			t.Errorf("token of %s: %v", node, err)
		}
	}
}

const webPolicy = `# Ferry's TrafficPolicy: how the proxy balances requests to Service web.
apiVersion: ferry.io/v1alpha1
kind: TrafficPolicy
metadata:
  name: web-lb
  namespace: shop
spec:
  targetRefs: [{kind: Service, name: web}]
  loadBalancer: {type: RoundRobin}
`

// laterPolicy is written after webPolicy; its name sorts first, so only its
// creation time (stamped by local mode as an API server would) keeps it from
// taking web over.
const laterPolicy = `apiVersion: v1
kind: Service
metadata:
  name: api
  namespace: shop
spec:
  selector: {app: api}
  ports: [{name: http, port: 80}]
---
apiVersion: ferry.io/v1alpha1
kind: TrafficPolicy
metadata:
  name: aa-later
  namespace: shop
spec:
  targetRefs: [{kind: Service, name: web}, {kind: Service, name: api}]
  loadBalancer: {type: LeastRequest}
`

func TestLocalModeTrafficPolicy(t *testing.T) {
	op, dir, state, sock := localOperator(t)
	write := func(name, content string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("policy.yaml", webPolicy)
	conn := dial(t, sock, filepath.Join(state, "ca.crt"))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	stream := stateStream(t, withToken(ctx, t, state, "node1"), conn, "node1")
	until := func(what string, want map[string]string) {
		t.Helper()
		untilLoadBalancers(t, stream, "node1", what, want)
	}
	until("policy.yaml added", map[string]string{"web": "RoundRobin"})

	// creationTimestamp counts whole seconds, as the API server's does, and two
	// policies of the same second are ordered by name: start the next second.
	time.Sleep(time.Until(time.Now().Truncate(time.Second).Add(time.Second)))
	write("later.yaml", laterPolicy)
	until("later.yaml added", map[string]string{"web": "RoundRobin", "api": "LeastRequest"})

	// A misspelt field: the file is not loaded and the error names it.
	write("bad.yaml", strings.NewReplacer("web-lb", "typo", "{type: RoundRobin}", "{typ: Random}").Replace(webPolicy))
	waitFor(t, 10*time.Second, "manifest error", func() bool { return len(op.ManifestErrors()) > 0 })
	if errs := op.ManifestErrors(); len(errs) != 1 || !strings.Contains(errs[0].Error(), "bad.yaml") || !strings.Contains(errs[0].Error(), "spec.loadBalancer.typ") {
		t.Fatalf("manifest errors %v; want one naming bad.yaml and spec.loadBalancer.typ", errs)
	}
	t.Logf("reported: %s", op.ManifestErrors()[0])
	if err := os.Remove(filepath.Join(dir, "bad.yaml")); err != nil {
		t.Fatal(err)
	}

	// A value the proxy cannot apply rejects web-lb's new generation whole; the
	// last good one stays in force, still older than aa-later.
	write("policy.yaml", strings.Replace(webPolicy, "{type: RoundRobin}", "{type: RoundRobin, hashHeader: x-user}", 1))
	waitFor(t, 10*time.Second, "web-lb's generation 2 rejected", func() bool {
		s, _ := op.View().Current()
		return slices.ContainsFunc(s.ConfigStatus, func(cs *ferryv1.ConfigStatus) bool {
			return cs.Name == "shop/web-lb" && cs.Generation == 2 && cs.InForceGeneration == 1 && cs.File == "policy.yaml"
		})
	})
	if err := os.Remove(filepath.Join(dir, "later.yaml")); err != nil {
		t.Fatal(err)
	}
	until("later.yaml removed", map[string]string{"web": "RoundRobin"})
	write("policy.yaml", strings.Replace(webPolicy, "RoundRobin", "Random", 1))
	until("web-lb fixed", map[string]string{"web": "Random"})
}

const routeFile = `apiVersion: v1
kind: Service
metadata:
  name: api
  namespace: shop
spec:
  selector: {app: api}
  ports: [{name: http, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: split
  namespace: shop
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - backendRefs: [{name: web, port: 80, weight: 90}, {name: api, port: 80, weight: 10}]
`

// untilRoutes reads states, acknowledging each, until the weights of the backends
// of web's first route rule are want; it returns the state.
func untilRoutes(t *testing.T, stream ferryv1.Discovery_StreamStateClient, node, what string, want []uint32) *ferryv1.NodeState {
	t.Helper()
	for {
		st, err := stream.Recv()
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if err := stream.Send(&ferryv1.StateRequest{Node: node, VersionAck: st.GetVersion(), ResponseTo: st.GetVersion()}); err != nil {
			t.Fatal(err)
		}
		var got []uint32
		for _, s := range st.GetServices() {
			if s.GetName() == "web" && len(s.GetRouteTables()) > 0 {
				for _, b := range s.GetRouteTables()[0].GetRules()[0].GetBackends() {
					got = append(got, b.GetWeight())
				}
			}
		}
		if slices.Equal(got, want) {
			return st
		}
	}
}

func TestLocalModeRoutes(t *testing.T) {
	base := t.TempDir()
	dir, state, sock := filepath.Join(base, "manifests"), filepath.Join(base, "state"), filepath.Join(base, "grpc.sock")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	// Files are replaced whole, as editors save them: the loader's poll must not
	// see an empty file, which would delete the route (and its last good
	// generation) for a moment.
	write := func(name, content string) {
		t.Helper()
		tmp := filepath.Join(base, name)
		if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	write("shop.yaml", manifests)
	write("route.yaml", routeFile)
	logs := &logBuffer{}
	op, err := operator.New(operator.Config{
		Local: dir, StateDir: state, GRPCAddr: "unix://" + sock, CertTTL: time.Hour, PollInterval: 50 * time.Millisecond,
	}, slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelInfo})))
	if err != nil {
		t.Fatal(err)
	}
	if err := op.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		op.Stop(context.Background())
		if t.Failed() {
			t.Logf("operator log:\n%s", logs)
		}
	})
	waitFor(t, 10*time.Second, "operator ready", op.Ready)
	conn := dial(t, sock, filepath.Join(state, "ca.crt"))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// Every node gets the routes: clients of web may be on any of them.
	for _, node := range []string{"node1", "node2"} {
		stream := stateStream(t, withToken(ctx, t, state, node), conn, node)
		untilRoutes(t, stream, node, node+": route.yaml read", []uint32{90, 10})
	}
	stream := stateStream(t, withToken(ctx, t, state, "node1"), conn, "node1")
	untilRoutes(t, stream, "node1", "stream opened", []uint32{90, 10})

	start := time.Now()
	write("route.yaml", strings.Replace(routeFile, "weight: 90", "weight: 50", 1))
	untilRoutes(t, stream, "node1", "weight changed", []uint32{50, 10})
	t.Logf("a route change reached the agent's stream %v after the file was written (poll interval 50ms)", time.Since(start))

	// A backend that does not exist: the change is rejected, the operator's log
	// names the file and the field, and generation 2 stays in force.
	write("route.yaml", strings.Replace(routeFile, "{name: api, port: 80, weight: 10}", "{name: apii, port: 80, weight: 10}", 1))
	waitFor(t, 10*time.Second, "the rejection logged", func() bool {
		return len(logs.lines("level=ERROR", "route rejected; its last good generation stays in force", "file=route.yaml",
			"field=spec.rules[0].backendRefs[1].name", "reason=BackendNotFound", "in_force_generation=2")) == 1
	})
	s, _ := op.View().Current()
	for _, svc := range s.Services {
		if svc.Name == "web" && svc.RouteTables[0].Rules[0].Backends[0].Weight != 50 {
			t.Fatalf("web's table after a rejected change: %v", svc.RouteTables)
		}
	}
}
