package controlplane

import (
	"context"
	"log/slog"
	"math/rand/v2"
	"time"

	"github.com/ferrymesh/ferry/api/ferryv1"
	"google.golang.org/grpc"
)

// Applier applies one NodeState. fresh is true for the first state of a new stream,
// which replaces whatever was applied before even if its version is lower (another
// replica, or the operator restarted).
type Applier func(st *ferryv1.NodeState, fresh bool) error

// Stream keeps the agent's state stream open. Between streams the agent keeps
// serving the last state it applied.
type Stream struct {
	client ferryv1.DiscoveryClient
	node   string
	apply  Applier
	log    *slog.Logger

	// MinBackoff and MaxBackoff bound the wait between reconnects.
	MinBackoff, MaxBackoff time.Duration
}

// NewStream returns a stream for node over conn.
func NewStream(conn grpc.ClientConnInterface, node string, apply Applier, log *slog.Logger) *Stream {
	return &Stream{client: ferryv1.NewDiscoveryClient(conn), node: node, apply: apply, log: log, MinBackoff: 200 * time.Millisecond, MaxBackoff: 10 * time.Second}
}

// Run keeps a stream open until ctx ends, reconnecting with jittered exponential
// backoff.
func (s *Stream) Run(ctx context.Context) {
	var applied uint64
	backoff := s.MinBackoff
	for {
		got, err := s.once(ctx, &applied)
		if ctx.Err() != nil {
			return
		}
		if got {
			backoff = s.MinBackoff
		}
		// Full jitter: agents restarted together do not reconnect together.
		wait := time.Duration(rand.Int64N(int64(backoff))) + backoff/2
		s.log.Warn("operator stream ended; keeping the last state and reconnecting", "error", err, "retry_in", wait.Round(time.Millisecond))
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
		backoff = min(backoff*2, s.MaxBackoff)
	}
}

// once runs one stream; got says whether it delivered a state.
func (s *Stream) once(ctx context.Context, applied *uint64) (got bool, err error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	st, err := s.client.StreamState(ctx)
	if err != nil {
		return false, err
	}
	if err := st.Send(&ferryv1.StateRequest{Node: s.node, VersionAck: *applied, AcceptDeltas: true}); err != nil {
		return false, err
	}
	fresh := true
	// last is the full state of the last message received, applied or not: the
	// operator's next delta starts from it.
	var last *ferryv1.NodeState
	for {
		msg, err := st.Recv()
		if err != nil {
			return got, err
		}
		ns, err := Merge(last, msg)
		if err != nil {
			// Out of step with the operator: a new stream starts with a full state.
			return got, err
		}
		last = ns
		got = true
		req := &ferryv1.StateRequest{Node: s.node, ResponseTo: ns.GetVersion()}
		if err := s.apply(ns, fresh); err != nil {
			s.log.Error("state rejected; keeping the last good state", "version", ns.GetVersion(), "error", err)
			req.Error = err.Error()
		} else {
			if fresh {
				s.log.Info("connected to the operator; state applied", "version", ns.GetVersion(), "workloads", len(ns.GetWorkloads()))
			}
			*applied = ns.GetVersion()
			fresh = false
		}
		req.VersionAck = *applied
		if err := st.Send(req); err != nil {
			return got, err
		}
	}
}
