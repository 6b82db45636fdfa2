package relay

import (
	"context"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/api/ferryv1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// fakeAgent serves stored flows and, to followers, the flows pushed with add.
type fakeAgent struct {
	ferryv1.UnimplementedObserverServer
	node   string
	mu     sync.Mutex
	stored []*ferryv1.Flow
	subs   []chan *ferryv1.Flow
	nextID uint64
}

func (a *fakeAgent) add(at time.Time, pod string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.nextID++
	f := &ferryv1.Flow{Id: a.nextID, Node: a.node, Time: timestamppb.New(at), Source: &ferryv1.Endpoint{Pod: pod}}
	a.stored = append(a.stored, f)
	for _, c := range a.subs {
		c <- f
	}
}

func (a *fakeAgent) GetFlows(req *ferryv1.GetFlowsRequest, s grpc.ServerStreamingServer[ferryv1.GetFlowsResponse]) error {
	a.mu.Lock()
	fs := append([]*ferryv1.Flow(nil), a.stored...)
	var c chan *ferryv1.Flow
	if req.GetFollow() {
		c = make(chan *ferryv1.Flow, 100)
		a.subs = append(a.subs, c)
	}
	a.mu.Unlock()
	if n := int(req.GetNumber()); n > 0 && len(fs) > n {
		fs = fs[len(fs)-n:]
	}
	for _, f := range fs {
		if req.GetSince() != nil && f.GetTime().AsTime().Before(req.GetSince().AsTime()) {
			continue
		}
		if err := s.Send(&ferryv1.GetFlowsResponse{Flow: f}); err != nil {
			return err
		}
	}
	if c == nil {
		return nil
	}
	for {
		select {
		case <-s.Context().Done():
			return nil
		case f := <-c:
			s.Send(&ferryv1.GetFlowsResponse{Flow: f})
		}
	}
}

func (a *fakeAgent) ServerStatus(context.Context, *ferryv1.ServerStatusRequest) (*ferryv1.ServerStatusResponse, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return &ferryv1.ServerStatusResponse{NumFlows: uint64(len(a.stored)), Nodes: []string{a.node}}, nil
}

// serve runs a on a unix socket and returns its relay address.
func serve(t *testing.T, a *fakeAgent) string {
	t.Helper()
	path := t.TempDir() + "/observer.sock"
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	ferryv1.RegisterObserverServer(s, a)
	go s.Serve(ln)
	t.Cleanup(s.Stop)
	return "unix://" + path
}

func pods(fs []*ferryv1.Flow) string {
	var out []string
	for _, f := range fs {
		out = append(out, f.GetSource().GetPod())
	}
	return strings.Join(out, " ")
}

func TestRelayMergesTwoNodesInTimeOrder(t *testing.T) {
	t0 := time.Now().Add(-time.Minute)
	n1, n2 := &fakeAgent{node: "node1"}, &fakeAgent{node: "node2"}
	for i, p := range []string{"a1", "b2", "c1", "d1", "e2", "f2"} {
		agent := n1
		if strings.HasSuffix(p, "2") {
			agent = n2
		}
		agent.add(t0.Add(time.Duration(i)*time.Second), p)
	}
	down := "unix://" + t.TempDir() + "/nobody.sock"
	r, err := New(Config{Agents: []Agent{{"node1", serve(t, n1)}, {"node2", serve(t, n2)}, {"node3", down}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer r.Stop()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	collect := func(req *ferryv1.GetFlowsRequest) ([]*ferryv1.Flow, []string) {
		var got []*ferryv1.Flow
		var errs []string
		err := r.Flows(ctx, req, func(f *ferryv1.Flow) error { got = append(got, f); return nil },
			func(e AgentError) { errs = append(errs, e.Agent) })
		if err != nil {
			t.Fatal(err)
		}
		return got, errs
	}
	got, errs := collect(&ferryv1.GetFlowsRequest{})
	if pods(got) != "a1 b2 c1 d1 e2 f2" {
		t.Errorf("merged %q, want time order a1 b2 c1 d1 e2 f2", pods(got))
	}
	if len(errs) != 1 || errs[0] != "node3" {
		t.Errorf("unavailable agents %v, want [node3]", errs)
	}
	if got, _ := collect(&ferryv1.GetFlowsRequest{Number: 3}); pods(got) != "d1 e2 f2" {
		t.Errorf("last 3: %q, want d1 e2 f2", pods(got))
	}

	// Follow: the stored flows, then new ones from both nodes, in time order even when
	// a node reports a flow after the other node's later one.
	fctx, fcancel := context.WithCancel(ctx)
	out := make(chan *ferryv1.Flow, 100)
	done := make(chan error, 1)
	go func() {
		done <- r.Flows(fctx, &ferryv1.GetFlowsRequest{Follow: true, Number: 2}, func(f *ferryv1.Flow) error { out <- f; return nil }, func(AgentError) {})
	}()
	var followed []*ferryv1.Flow
	next := func() {
		select {
		case f := <-out:
			followed = append(followed, f)
		case <-ctx.Done():
			t.Fatalf("follow stopped after %q", pods(followed))
		}
	}
	next()
	next()
	now := time.Now()
	n1.add(now.Add(20*time.Millisecond), "h1")
	n2.add(now.Add(10*time.Millisecond), "g2") // earlier, reported later
	n2.add(now.Add(30*time.Millisecond), "i2")
	next()
	next()
	next()
	fcancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if pods(followed) != "e2 f2 g2 h1 i2" {
		t.Errorf("followed %q, want e2 f2 g2 h1 i2", pods(followed))
	}

	st, err := r.ServerStatus(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(st.GetNodes()) != "[node1 node2]" || st.GetNumFlows() != 9 || len(st.GetUnavailable()) != 1 {
		t.Errorf("status %v", st)
	}
}

// An agent that restarts during follow (its flow IDs start again at 1) is read again
// from where it stopped.
func TestRelayFollowSurvivesAgentRestart(t *testing.T) {
	path := t.TempDir() + "/observer.sock"
	start := func(a *fakeAgent) *grpc.Server {
		ln, err := net.Listen("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		s := grpc.NewServer()
		ferryv1.RegisterObserverServer(s, a)
		go s.Serve(ln)
		return s
	}
	first := &fakeAgent{node: "node1"}
	srv := start(first)
	r, err := New(Config{Agents: []Agent{{"node1", "unix://" + path}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer r.Stop()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out := make(chan *ferryv1.Flow, 10)
	errs := make(chan AgentError, 10)
	done := make(chan error, 1)
	go func() {
		done <- r.Flows(ctx, &ferryv1.GetFlowsRequest{Follow: true}, func(f *ferryv1.Flow) error { out <- f; return nil },
			func(e AgentError) { errs <- e })
	}()
	next := func(want string) {
		t.Helper()
		for {
			select {
			case f := <-out:
				if want == "after" && f.GetSource().GetPod() == "before" {
					continue // added again while the follower attached
				}
				if f.GetSource().GetPod() != want {
					t.Fatalf("followed %s, want %s", f.GetSource().GetPod(), want)
				}
				return
			case <-time.After(100 * time.Millisecond):
				if want == "before" {
					first.add(time.Now(), "before") // until the follower is attached
				}
			case <-ctx.Done():
				t.Fatalf("no flow %s", want)
			}
		}
	}
	first.add(time.Now(), "before")
	next("before")
	srv.Stop()
	select {
	case <-errs:
	case <-ctx.Done():
		t.Fatal("the broken stream was not reported")
	}
	second := &fakeAgent{node: "node1"} // IDs from 1 again
	srv = start(second)
	defer srv.Stop()
	second.add(time.Now(), "after")
	next("after")
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// The relay serves the Observer API itself: a client reads both nodes through it.
func TestRelayServesObserverAPI(t *testing.T) {
	n1, n2 := &fakeAgent{node: "node1"}, &fakeAgent{node: "node2"}
	t0 := time.Now().Add(-time.Minute)
	n2.add(t0, "first")
	n1.add(t0.Add(time.Second), "second")
	r, err := New(Config{Agents: []Agent{{"node1", serve(t, n1)}, {"node2", serve(t, n2)}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer r.Stop()
	ln, err := net.Listen("unix", t.TempDir()+"/relay.sock")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	served := make(chan error, 1)
	go func() { served <- r.Serve(ctx, ln) }()
	conn, err := grpc.NewClient("unix://"+ln.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	stream, err := ferryv1.NewObserverClient(conn).GetFlows(ctx, &ferryv1.GetFlowsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for {
		m, err := stream.Recv()
		if err != nil {
			break
		}
		got = append(got, m.GetFlow().GetSource().GetPod())
	}
	if strings.Join(got, " ") != "first second" {
		t.Errorf("through the relay: %v, want [first second]", got)
	}
	cancel()
	if err := <-served; err != nil {
		t.Fatal(err)
	}
}

// The operator hands the relay the agents it finds as they come and go: a relay with
// none answers Unavailable, then reads the agents it was given, then only those that
// remain.
func TestRelaySetAgents(t *testing.T) {
	n1, n2 := &fakeAgent{node: "node1"}, &fakeAgent{node: "node2"}
	t0 := time.Now().Add(-time.Minute)
	n1.add(t0, "a1")
	n2.add(t0.Add(time.Second), "b2")
	a1, a2 := serve(t, n1), serve(t, n2)
	r, err := New(Config{})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer r.Stop()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	read := func() (string, error) {
		var got []*ferryv1.Flow
		err := r.Flows(ctx, &ferryv1.GetFlowsRequest{}, func(f *ferryv1.Flow) error { got = append(got, f); return nil }, nil)
		return pods(got), err
	}
	if _, err := read(); err == nil {
		t.Fatal("a relay with no agent answered")
	}
	for _, tc := range []struct {
		agents []Agent
		want   string
	}{
		{[]Agent{{"node1", a1}}, "a1"},
		{[]Agent{{"node1", a1}, {"node2", a2}}, "a1 b2"},
		{[]Agent{{"node2", a2}}, "b2"},
	} {
		if err := r.SetAgents(tc.agents); err != nil {
			t.Fatal(err)
		}
		if got, err := read(); err != nil || got != tc.want {
			t.Fatalf("with agents %v: flows %q, %v; want %q", tc.agents, got, err, tc.want)
		}
	}
}

// An agent on TCP is read over mutual TLS only: without ClientTLS the relay refuses
// it rather than reading flows in plaintext.
func TestTCPAgentNeedsTLS(t *testing.T) {
	r, err := New(Config{Agents: []Agent{{"node1", "10.0.0.5:4245"}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Start(context.Background()); err == nil {
		r.Stop()
		t.Fatal("the relay reads an agent on TCP without TLS")
	}
}
