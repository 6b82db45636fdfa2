// Package relay merges the flow streams of many agents into one, in time order, as
// hubble-relay does for Cilium. It serves the same Observer gRPC API the agents do,
// so a client reads one node or the whole cluster the same way, and it can be used
// in-process (ferry observe --lab, ferry ui) through Flows.
package relay

import (
	"cmp"
	"container/heap"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"sync"
	"time"

	"github.com/ferrymesh/ferry/api/ferryv1"
	"github.com/ferrymesh/ferry/internal/observertls"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// DefaultLag is how long follow mode holds a flow for a slower agent's earlier
// flows to arrive before sending it: the price of time order, well under a second.
const DefaultLag = 250 * time.Millisecond

// Agent is one agent's Observer API.
type Agent struct {
	// Name says which agent in errors and status (the node name, usually).
	Name string
	// Address is "unix:///path/observer.sock" or "host:port".
	Address string
}

// Config configures a Relay.
type Config struct {
	Agents []Agent
	// Lag: see DefaultLag (default when 0).
	Lag time.Duration
	Log *slog.Logger
	// ClientTLS reads agents at host:port over mutual TLS (observertls.ClientConfig); agents
	// on TCP are refused without it, since the Observer API on TCP is mTLS only.
	ClientTLS *tls.Config
	// ServerTLS, when set, makes Serve require mutual TLS (observertls.ServerConfig).
	ServerTLS *tls.Config
}

// Relay merges the flows of its agents: Config.Agents, or the set SetAgents gave it
// last (the operator follows the agent pods as they come and go).
type Relay struct {
	ferryv1.UnimplementedObserverServer
	cfg     Config
	log     *slog.Logger
	mu      sync.Mutex
	started bool
	agents  []agentConn
}

// agentConn is one agent and the relay's connection to it.
type agentConn struct {
	Agent
	conn *grpc.ClientConn
}

// New validates cfg. Connections are made on Start.
func New(cfg Config) (*Relay, error) {
	if err := checkAgents(cfg.Agents); err != nil {
		return nil, err
	}
	if cfg.Lag <= 0 {
		cfg.Lag = DefaultLag
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	return &Relay{cfg: cfg, log: cfg.Log}, nil
}

func checkAgents(agents []Agent) error {
	for _, a := range agents {
		if a.Address == "" {
			return fmt.Errorf("relay config: agent %q has no address", a.Name)
		}
	}
	return nil
}

// Start creates the agents' clients; they connect on first use and reconnect on
// their own, so an agent that is down now is read when it comes back.
func (r *Relay) Start(context.Context) error {
	r.mu.Lock()
	r.started = true
	r.mu.Unlock()
	return r.SetAgents(r.cfg.Agents)
}

// SetAgents replaces the set of agents the relay reads. Connections to agents that
// stay are kept; queries in progress go on with the set they started with.
func (r *Relay) SetAgents(agents []Agent) error {
	if err := checkAgents(agents); err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.started {
		r.cfg.Agents = agents
		return nil
	}
	old := map[string]agentConn{}
	for _, a := range r.agents {
		old[a.Address] = a
	}
	next := make([]agentConn, 0, len(agents))
	for _, a := range agents {
		if ac, ok := old[a.Address]; ok {
			delete(old, a.Address)
			ac.Name = a.Name
			next = append(next, ac)
			continue
		}
		target, creds := a.Address, insecure.NewCredentials()
		var err error
		if observertls.IsTCP(target) {
			target = "passthrough:///" + target
			if r.cfg.ClientTLS == nil {
				err = observertls.ErrNoTLS
			} else {
				creds = credentials.NewTLS(r.cfg.ClientTLS)
			}
		}
		var c *grpc.ClientConn
		if err == nil {
			c, err = grpc.NewClient(target, grpc.WithTransportCredentials(creds))
		}
		if err != nil {
			for _, ac := range next {
				if _, kept := old[ac.Address]; !kept {
					ac.conn.Close()
				}
			}
			return fmt.Errorf("relay: agent %s: %w", a.Name, err)
		}
		next = append(next, agentConn{Agent: a, conn: c})
	}
	for _, gone := range old {
		gone.conn.Close()
	}
	r.agents = next
	return nil
}

// Stop closes the agents' connections; streams in progress end.
func (r *Relay) Stop() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, a := range r.agents {
		a.conn.Close()
	}
	r.agents, r.started = nil, false
}

// Register adds the relay's Observer service to a gRPC server.
func (r *Relay) Register(s grpc.ServiceRegistrar) { ferryv1.RegisterObserverServer(s, r) }

// agentClient is one agent's Observer client, named for errors.
type agentClient struct {
	name string
	ferryv1.ObserverClient
}

func (r *Relay) clients() ([]agentClient, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.started {
		return nil, errors.New("relay is not started")
	}
	if len(r.agents) == 0 {
		return nil, status.Error(codes.Unavailable, "the relay knows no agent yet")
	}
	out := make([]agentClient, len(r.agents))
	for i, a := range r.agents {
		out[i] = agentClient{a.Name, ferryv1.NewObserverClient(a.conn)}
	}
	return out, nil
}

// AgentError is an agent the relay could not read; the others' flows still come.
type AgentError struct {
	Agent string
	Err   error
}

func (e AgentError) Error() string { return fmt.Sprintf("agent %s: %v", e.Agent, e.Err) }

// Flows calls send with the flows req asks for, from every agent, in time order:
// the stored ones (the last req.Number of them, cluster-wide), then with req.Follow
// new ones until ctx ends. Agents that cannot be read are reported to onErr (which
// may be nil) and left out; Flows fails only when no agent can be read or send fails.
func (r *Relay) Flows(ctx context.Context, req *ferryv1.GetFlowsRequest, send func(*ferryv1.Flow) error, onErr func(AgentError)) error {
	clients, err := r.clients()
	if err != nil {
		return err
	}
	if onErr == nil {
		onErr = func(e AgentError) { r.log.Warn("agent unavailable", "agent", e.Agent, "error", e.Err) }
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	// Follow streams open before the stored flows are read, so no flow falls between;
	// the overlap is removed by ID.
	live := make(chan item, 1024)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	if req.GetFollow() {
		// The overlap with the stored flows is a couple of seconds back, never before
		// what the client asked for.
		from := time.Now().Add(-2 * time.Second)
		if req.GetSince() != nil && req.GetSince().AsTime().After(from) {
			from = req.GetSince().AsTime()
		}
		for i, c := range clients {
			wg.Add(1)
			go func() {
				defer wg.Done()
				r.follow(ctx, i, c, req.GetFilter(), from, live, onErr)
			}()
		}
	}

	stored, lastID, reached, err := r.stored(ctx, clients, req, onErr)
	if err != nil {
		return err
	}
	if reached == 0 && !req.GetFollow() {
		return status.Error(codes.Unavailable, "no agent could be read")
	}
	for _, f := range stored {
		if err := send(f); err != nil {
			return err
		}
	}
	if !req.GetFollow() {
		return nil
	}
	return r.merge(ctx, len(clients), reached, live, lastID, send)
}

// retryFollow is how long follow mode waits before reading an agent again after its
// stream failed (the agent restarted, or is not up yet).
const retryFollow = time.Second

// follow streams agent i's new flows into live until ctx ends. When the stream
// breaks it marks the agent ended (so the merge does not wait for it), and reads the
// agent again from its last flow's time once it answers: an agent restart loses no
// flow the new agent records. A restarted agent numbers its flows from 1 again, so
// the first stream alone is matched against the stored flows by ID.
func (r *Relay) follow(ctx context.Context, i int, c agentClient, flt *ferryv1.FlowFilter, from time.Time, live chan<- item, onErr func(AgentError)) {
	put := func(it item) bool {
		select {
		case live <- it:
			return true
		case <-ctx.Done():
			return false
		}
	}
	reported := false
	for attempt := 0; ; attempt++ {
		stream, err := c.GetFlows(ctx, &ferryv1.GetFlowsRequest{Filter: flt, Since: timestamppb.New(from), Follow: true})
		for err == nil {
			var m *ferryv1.GetFlowsResponse
			if m, err = stream.Recv(); err == nil {
				if reported { // back after an outage
					reported = false
					r.log.Info("agent readable again", "agent", c.name)
				}
				f := m.GetFlow()
				from = f.GetTime().AsTime().Add(time.Nanosecond)
				if !put(item{agent: i, flow: f, resumed: attempt > 0}) {
					return
				}
			}
		}
		if ctx.Err() != nil {
			return
		}
		if !reported && !errors.Is(err, io.EOF) {
			onErr(AgentError{c.name, err})
			reported = true
		}
		if !put(item{agent: i, done: true}) {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(retryFollow):
		}
	}
}

// stored reads every agent's stored flows and merges them in time order.
func (r *Relay) stored(ctx context.Context, clients []agentClient, req *ferryv1.GetFlowsRequest, onErr func(AgentError)) (flows []*ferryv1.Flow, lastID []uint64, reached int, err error) {
	type result struct {
		flows []*ferryv1.Flow
		err   error
	}
	results := make([]result, len(clients))
	var wg sync.WaitGroup
	for i, c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			stream, err := c.GetFlows(ctx, &ferryv1.GetFlowsRequest{Filter: req.GetFilter(), Since: req.GetSince(), Number: req.GetNumber()})
			if err != nil {
				results[i].err = err
				return
			}
			for {
				m, err := stream.Recv()
				if errors.Is(err, io.EOF) {
					return
				}
				if err != nil {
					results[i].err = err
					return
				}
				results[i].flows = append(results[i].flows, m.GetFlow())
			}
		}()
	}
	wg.Wait()
	lastID = make([]uint64, len(clients))
	for i, res := range results {
		if res.err != nil {
			if status.Code(res.err) == codes.InvalidArgument {
				return nil, nil, 0, res.err
			}
			onErr(AgentError{clients[i].name, res.err})
			continue
		}
		reached++
		for _, f := range res.flows {
			lastID[i] = max(lastID[i], f.GetId())
		}
		flows = append(flows, res.flows...)
	}
	slices.SortStableFunc(flows, compareFlows)
	if n := int(req.GetNumber()); n > 0 && len(flows) > n {
		flows = flows[len(flows)-n:]
	}
	return flows, lastID, reached, nil
}

// compareFlows orders flows by time, then node and ID so equal times are stable.
func compareFlows(a, b *ferryv1.Flow) int {
	if c := a.GetTime().AsTime().Compare(b.GetTime().AsTime()); c != 0 {
		return c
	}
	if c := cmp.Compare(a.GetNode(), b.GetNode()); c != 0 {
		return c
	}
	return cmp.Compare(a.GetId(), b.GetId())
}

// item is a flow from one agent's follow stream, or the stream's end.
type item struct {
	agent int
	flow  *ferryv1.Flow
	done  bool
	// resumed: the flow comes from a stream opened after an outage, whose IDs may
	// have restarted; it is not matched against the stored flows' IDs.
	resumed bool
}

// merge sends followed flows in time order. Each agent's stream is in time order, so
// a flow can go once every agent has sent something later (its watermark), or once it
// is older than the lag, for agents that are quiet. It runs until ctx ends; it fails
// only when no agent could ever be read.
func (r *Relay) merge(ctx context.Context, n, reached int, live <-chan item, lastID []uint64, send func(*ferryv1.Flow) error) error {
	h := &flowHeap{}
	water := make([]time.Time, n)
	ended := make([]bool, n)
	everRead := reached > 0
	tick := time.NewTicker(r.cfg.Lag / 4)
	defer tick.Stop()
	flush := func() error {
		cut := time.Now().Add(-r.cfg.Lag)
		var low time.Time
		first := true
		for i := range n {
			if ended[i] {
				continue
			}
			if first || water[i].Before(low) {
				low, first = water[i], false
			}
		}
		if low.After(cut) {
			cut = low
		}
		for h.Len() > 0 && !(*h)[0].GetTime().AsTime().After(cut) {
			if err := send(heap.Pop(h).(*ferryv1.Flow)); err != nil {
				return err
			}
		}
		return nil
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case it := <-live:
			if it.done {
				ended[it.agent] = true
				if !slices.Contains(ended, false) && !everRead {
					return status.Error(codes.Unavailable, "no agent could be read")
				}
				continue
			}
			everRead = true
			ended[it.agent] = false
			if !it.resumed && it.flow.GetId() <= lastID[it.agent] {
				continue // already sent with the stored flows
			}
			if t := it.flow.GetTime().AsTime(); t.After(water[it.agent]) {
				water[it.agent] = t
			}
			heap.Push(h, it.flow)
		case <-tick.C:
		}
		if err := flush(); err != nil {
			return err
		}
	}
}

type flowHeap []*ferryv1.Flow

func (h flowHeap) Len() int           { return len(h) }
func (h flowHeap) Less(i, j int) bool { return compareFlows(h[i], h[j]) < 0 }
func (h flowHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *flowHeap) Push(x any)        { *h = append(*h, x.(*ferryv1.Flow)) }
func (h *flowHeap) Pop() any {
	old := *h
	f := old[len(old)-1]
	*h = old[:len(old)-1]
	return f
}

// GetFlows serves Flows over gRPC.
func (r *Relay) GetFlows(req *ferryv1.GetFlowsRequest, stream grpc.ServerStreamingServer[ferryv1.GetFlowsResponse]) error {
	return r.Flows(stream.Context(), req, func(f *ferryv1.Flow) error {
		return stream.Send(&ferryv1.GetFlowsResponse{Flow: f})
	}, nil)
}

// ServerStatus sums the agents' statuses; agents that do not answer are listed.
func (r *Relay) ServerStatus(ctx context.Context, _ *ferryv1.ServerStatusRequest) (*ferryv1.ServerStatusResponse, error) {
	clients, err := r.clients()
	if err != nil {
		return nil, err
	}
	sum := &ferryv1.ServerStatusResponse{}
	for _, c := range clients {
		st, err := c.ServerStatus(ctx, &ferryv1.ServerStatusRequest{})
		if err != nil {
			sum.Unavailable = append(sum.Unavailable, AgentError{c.name, err}.Error())
			continue
		}
		sum.NumFlows += st.GetNumFlows()
		sum.MaxFlows += st.GetMaxFlows()
		sum.SeenFlows += st.GetSeenFlows()
		sum.LostFlows += st.GetLostFlows()
		sum.Nodes = append(sum.Nodes, st.GetNodes()...)
	}
	return sum, nil
}

// Serve serves the relay's Observer API on ln until ctx ends (for the operator, or a
// relay of its own beside it).
func (r *Relay) Serve(ctx context.Context, ln net.Listener) error {
	var opts []grpc.ServerOption
	if r.cfg.ServerTLS != nil {
		opts = append(opts, grpc.Creds(credentials.NewTLS(r.cfg.ServerTLS)))
	}
	s := grpc.NewServer(opts...)
	r.Register(s)
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		select {
		case <-ctx.Done():
			s.Stop()
		case <-stop:
		}
	}()
	err := s.Serve(ln)
	if ctx.Err() != nil {
		return nil
	}
	return err
}
