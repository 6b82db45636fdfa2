package operator_test

// TestScale: the control plane at the size of issue 14 (10,000 pods, 1,000
// services, 100 agents) through a real kube-apiserver. It asserts that every
// agent converges to exactly the state a fresh full stream gives, after a full
// sync and after updates carried as deltas; the figures (sync time, update
// latency, bytes per update, operator memory) are logged, never asserted.
//
//	FERRY_PRIVILEGED_TESTS=1 go test -run TestScale -v ./operator

import (
	"context"
	"fmt"
	"log/slog"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/agent/controlplane"
	"github.com/ferrymesh/ferry/api/ferryv1"
	"github.com/ferrymesh/ferry/operator"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

const (
	scaleNodes      = 100
	scaleNamespaces = 10
	scalePods       = 10000
	scaleServices   = 1000
)

// scaleAgent is one simulated agent: the real agent/controlplane stream client,
// whose applier keeps the last state it was given.
type scaleAgent struct {
	node  string
	bytes atomic.Int64 // wire size of the NodeStates received
	msgs  atomic.Int64

	mu      sync.Mutex
	state   *ferryv1.NodeState
	applied map[uint64]time.Time // version -> when applied
}

func (a *scaleAgent) apply(st *ferryv1.NodeState, _ bool) error {
	if st.GetNode() != a.node {
		return fmt.Errorf("state for node %q", st.GetNode())
	}
	a.mu.Lock()
	a.state = st
	a.applied[st.GetVersion()] = time.Now()
	a.mu.Unlock()
	return nil
}

func (a *scaleAgent) current() *ferryv1.NodeState {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.state
}

// tokenConn adds an agent's bearer token to every call and counts the bytes of
// the messages it receives.
type tokenConn struct {
	*grpc.ClientConn
	token string
	agent *scaleAgent
}

func (c tokenConn) NewStream(ctx context.Context, desc *grpc.StreamDesc, method string, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	s, err := c.ClientConn.NewStream(bearer(ctx, c.token), desc, method, opts...)
	if err != nil {
		return nil, err
	}
	return countingStream{s, c.agent}, nil
}

type countingStream struct {
	grpc.ClientStream
	agent *scaleAgent
}

func (s countingStream) RecvMsg(m any) error {
	err := s.ClientStream.RecvMsg(m)
	if err == nil {
		s.agent.bytes.Add(int64(proto.Size(m.(proto.Message))))
		s.agent.msgs.Add(1)
	}
	return err
}

// selfCPU is the user and system CPU time of the test process so far.
func selfCPU() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func scaleIP(i int) string { return fmt.Sprintf("10.%d.%d.%d", 120+i/62500, i/250%250, i%250+2) }

func TestScale(t *testing.T) {
	nodes := make([]string, scaleNodes)
	for i := range nodes {
		nodes[i] = fmt.Sprintf("node%03d", i)
	}
	c := startCluster(t, nodes...)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()

	begin := time.Now()
	for n := range scaleNamespaces {
		if _, err := c.CreateNamespace(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("scale%d", n), Labels: map[string]string{"ferry.io/mesh": "enabled"}}}); err != nil {
			t.Fatal(err)
		}
	}
	// Pod i is in namespace i%10 and selected by service (i/10)%100 of its
	// namespace: 10 pods per service.
	pod := func(i int) (ns, name, svc string) {
		return fmt.Sprintf("scale%d", i%scaleNamespaces), fmt.Sprintf("p%d", i), fmt.Sprintf("s%d", (i/scaleNamespaces)%(scaleServices/scaleNamespaces))
	}
	parallel(t, 48, scaleServices, func(i int) error {
		_, err := c.client.CoreV1().Services(fmt.Sprintf("scale%d", i%scaleNamespaces)).Create(ctx, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("s%d", i/scaleNamespaces)},
			Spec: corev1.ServiceSpec{
				Selector: map[string]string{"app": fmt.Sprintf("s%d", i/scaleNamespaces)},
				Ports:    []corev1.ServicePort{{Name: "http", Port: 80}},
			},
		}, metav1.CreateOptions{})
		return err
	})
	parallel(t, 48, scalePods, func(i int) error {
		ns, name, svc := pod(i)
		return c.createPod(ctx, ns, name, nodes[i%scaleNodes], scaleIP(i), map[string]string{"app": svc})
	})
	t.Logf("created %d services and %d pods (create + status, %d goroutines) in %d namespaces through the API server in %v",
		scaleServices, scalePods, 48, scaleNamespaces, time.Since(begin).Round(time.Millisecond))

	p := runOperator(t, c.Kubeconfig, "scale")
	waitFor(t, 3*time.Minute, "all workloads and services in the view", func() bool {
		w, _ := p.metric("ferry_operator_workloads")
		s, _ := p.metric("ferry_operator_services")
		return w == scalePods && s == scaleServices
	})
	t.Logf("operator view complete %v after process start", time.Since(p.started).Round(time.Millisecond))
	waitFor(t, time.Minute, "ready", p.ready)
	rss0, _ := p.metric("process_resident_memory_bytes")
	heap0, _ := p.metric("go_memstats_heap_inuse_bytes")

	tokens := make([]string, scaleNodes)
	for i := range nodes {
		tokens[i] = c.token(t, systemNS, operator.DefaultAgentSA, "ferry-agent-"+nodes[i], "ferry-operator")
	}
	sock, caFile := filepath.Join(p.dir, "grpc.sock"), c.bundleFile(t)
	log := slog.New(slog.DiscardHandler)
	agents := make([]*scaleAgent, scaleNodes)
	opCPU0, _ := p.metric("process_cpu_seconds_total")
	selfCPU0 := selfCPU()
	start := time.Now()
	for i, n := range nodes {
		a := &scaleAgent{node: n, applied: map[uint64]time.Time{}}
		agents[i] = a
		s := controlplane.NewStream(tokenConn{dial(t, sock, caFile), tokens[i], a}, n, a.apply, log)
		go s.Run(ctx)
	}
	var synced time.Time
	waitFor(t, 2*time.Minute, "every agent has the full state", func() bool {
		for _, a := range agents {
			if st := a.current(); st == nil || len(st.GetWorkloads()) != scalePods || len(st.GetServices()) != scaleServices {
				return false
			}
		}
		synced = time.Now()
		return true
	})
	var fullBytes int64
	for _, a := range agents {
		fullBytes += a.bytes.Load()
	}
	t.Logf("full sync: %d agents connected and applied %d workloads and %d services in %v (polled every 20 ms); %.1f MiB of NodeStates in all, %.1f MiB per agent",
		scaleNodes, scalePods, scaleServices, synced.Sub(start).Round(time.Millisecond), float64(fullBytes)/(1<<20), float64(fullBytes)/scaleNodes/(1<<20))
	opCPU1, _ := p.metric("process_cpu_seconds_total")
	t.Logf("CPU during the full sync: operator %.2f s, test process (100 agents' TLS, decoding, merging) %.2f s",
		opCPU1-opCPU0, (selfCPU() - selfCPU0).Seconds())
	checkConverged(t, ctx, sock, caFile, tokens, agents)
	opCPU2, _ := p.metric("process_cpu_seconds_total")

	// Updates: each is one API change; every agent must see it, by delta.
	var latencies []time.Duration
	var updateBytes, updateMsgs int64
	newPod := scalePods
	updates := []struct {
		what   string
		change func() error
		seen   func(*ferryv1.NodeState) bool
	}{}
	for k := range 5 {
		i := newPod + k
		ns, name, svc := pod(i)
		updates = append(updates, struct {
			what   string
			change func() error
			seen   func(*ferryv1.NodeState) bool
		}{
			fmt.Sprintf("pod %s/%s added", ns, name),
			func() error {
				return c.createPod(ctx, ns, name, nodes[i%scaleNodes], scaleIP(i), map[string]string{"app": svc})
			},
			func(st *ferryv1.NodeState) bool { return hasEndpoint(st, ns, svc, ns, name) },
		})
	}
	for k := range 5 {
		// Pod k moves from its service to service s99 of its namespace.
		ns, name, svc := pod(k)
		to := fmt.Sprintf("s%d", scaleServices/scaleNamespaces-1)
		updates = append(updates, struct {
			what   string
			change func() error
			seen   func(*ferryv1.NodeState) bool
		}{
			fmt.Sprintf("pod %s/%s label app=%s -> %s", ns, name, svc, to),
			func() error {
				_, err := c.client.CoreV1().Pods(ns).Patch(ctx, name, types.MergePatchType, fmt.Appendf(nil, `{"metadata":{"labels":{"app":%q}}}`, to), metav1.PatchOptions{})
				return err
			},
			func(st *ferryv1.NodeState) bool {
				return hasEndpoint(st, ns, to, ns, name) && !hasEndpoint(st, ns, svc, ns, name)
			},
		})
	}
	for _, u := range updates {
		for _, a := range agents {
			updateBytes -= a.bytes.Load()
			updateMsgs -= a.msgs.Load()
		}
		at := time.Now()
		if err := u.change(); err != nil {
			t.Fatalf("%s: %v", u.what, err)
		}
		seen := make([]time.Duration, len(agents))
		waitFor(t, time.Minute, u.what+" at every agent", func() bool {
			done := true
			for i, a := range agents {
				if seen[i] != 0 {
					continue
				}
				a.mu.Lock()
				if a.state != nil && u.seen(a.state) {
					seen[i] = a.applied[a.state.GetVersion()].Sub(at)
				} else {
					done = false
				}
				a.mu.Unlock()
			}
			return done
		})
		latencies = append(latencies, seen...)
		for _, a := range agents {
			updateBytes += a.bytes.Load()
			updateMsgs += a.msgs.Load()
		}
	}
	opCPU3, _ := p.metric("process_cpu_seconds_total")
	t.Logf("operator CPU over the %d updates: %.2f s", len(updates), opCPU3-opCPU2)
	checkConverged(t, ctx, sock, caFile, tokens, agents)
	slices.Sort(latencies)
	q := func(f float64) time.Duration {
		return latencies[int(f*float64(len(latencies)-1))].Round(time.Millisecond)
	}
	t.Logf("%d updates (5 pods added, 5 pod labels changed) x %d agents, from the API call to the agent's applier: p50 %v, p99 %v, max %v",
		len(updates), scaleNodes, q(0.5), q(0.99), q(1))
	t.Logf("bytes per update: %d NodeState messages, %.0f bytes per agent per update on average (a full state is %.1f MiB)",
		updateMsgs, float64(updateBytes)/float64(len(updates)*scaleNodes), float64(fullBytes)/scaleNodes/(1<<20))
	rss, _ := p.metric("process_resident_memory_bytes")
	heap, _ := p.metric("go_memstats_heap_inuse_bytes")
	t.Logf("operator memory (its metrics): before agents RSS %.1f MiB, heap in use %.1f MiB; with %d agents after the updates RSS %.1f MiB, heap in use %.1f MiB",
		rss0/(1<<20), heap0/(1<<20), scaleNodes, rss/(1<<20), heap/(1<<20))
}

// checkConverged asserts every agent holds exactly the state a new stream without
// deltas gets for its node.
func checkConverged(t *testing.T, ctx context.Context, sock, caFile string, tokens []string, agents []*scaleAgent) {
	t.Helper()
	conn := dial(t, sock, caFile)
	for i, a := range agents {
		s, err := ferryv1.NewDiscoveryClient(conn).StreamState(bearer(ctx, tokens[i]))
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Send(&ferryv1.StateRequest{Node: a.node}); err != nil {
			t.Fatal(err)
		}
		full, err := s.Recv()
		if err != nil {
			t.Fatal(err)
		}
		s.CloseSend()
		waitFor(t, 30*time.Second, a.node+" at version of the full state", func() bool { return a.current().GetVersion() >= full.GetVersion() })
		if got := a.current(); !proto.Equal(got, full) {
			t.Fatalf("agent %s: state built from deltas (version %d, %d workloads, %d services) differs from the full state (version %d, %d workloads, %d services)",
				a.node, got.GetVersion(), len(got.GetWorkloads()), len(got.GetServices()), full.GetVersion(), len(full.GetWorkloads()), len(full.GetServices()))
		}
	}
}

func hasEndpoint(st *ferryv1.NodeState, svcNS, svc, podNS, pod string) bool {
	uid := ""
	for _, w := range st.GetWorkloads() {
		if w.GetNamespace() == podNS && w.GetName() == pod {
			uid = w.GetUid()
		}
	}
	if uid == "" {
		return false
	}
	for _, s := range st.GetServices() {
		if s.GetNamespace() == svcNS && s.GetName() == svc {
			return slices.Contains(s.GetEndpoints(), uid)
		}
	}
	return false
}

// parallel runs f(0..n-1) on up to width goroutines and fails t on any error.
func parallel(t *testing.T, width, n int, f func(int) error) {
	t.Helper()
	var wg sync.WaitGroup
	var mu sync.Mutex
	var first error
	sem := make(chan struct{}, width)
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if err := f(i); err != nil {
				mu.Lock()
				if first == nil {
					first = err
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if first != nil {
		t.Fatal(first)
	}
}

// createPod creates a running pod on node with address ip, as the scheduler and a
// kubelet would leave it.
func (c *cluster) createPod(ctx context.Context, ns, name, node, ip string, labels map[string]string) error {
	p, err := c.client.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels},
		Spec: corev1.PodSpec{
			NodeName: node, ServiceAccountName: "default",
			Containers: []corev1.Container{{Name: "app", Image: "example.invalid/app"}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		return err
	}
	p.Status.Phase = corev1.PodRunning
	p.Status.PodIP = ip
	p.Status.PodIPs = []corev1.PodIP{{IP: ip}}
	_, err = c.client.CoreV1().Pods(ns).UpdateStatus(ctx, p, metav1.UpdateOptions{})
	return err
}
