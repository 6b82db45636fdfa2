package flows

import (
	"context"

	"github.com/ferrymesh/ferry/api/ferryv1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Server serves a ring over the Observer gRPC API.
type Server struct {
	ferryv1.UnimplementedObserverServer
	ring *Ring
	node string
}

// NewServer returns an Observer service for ring, recorded on node.
func NewServer(ring *Ring, node string) *Server { return &Server{ring: ring, node: node} }

// Register adds the service to a gRPC server.
func (s *Server) Register(r grpc.ServiceRegistrar) { ferryv1.RegisterObserverServer(r, s) }

// GetFlows sends the stored flows that match, then with follow the new ones.
func (s *Server) GetFlows(req *ferryv1.GetFlowsRequest, stream grpc.ServerStreamingServer[ferryv1.GetFlowsResponse]) error {
	if err := CheckFilter(req.GetFilter()); err != nil {
		return status.Error(codes.InvalidArgument, err.Error())
	}
	q := Query{Filter: req.GetFilter(), Number: int(req.GetNumber())}
	if req.GetSince() != nil {
		q.Since = req.GetSince().AsTime()
	}
	// Subscribe before reading the ring, so no flow falls between the two.
	var sub *Subscription
	if req.GetFollow() {
		sub = s.ring.Subscribe()
		defer sub.Close()
	}
	for _, f := range s.ring.Flows(q) {
		if sub != nil && f.GetId() > sub.After {
			continue // the subscription delivers it
		}
		if err := stream.Send(&ferryv1.GetFlowsResponse{Flow: f}); err != nil {
			return err
		}
	}
	if sub == nil {
		return nil
	}
	ctx := stream.Context()
	for {
		select {
		case <-ctx.Done():
			return nil
		case f := <-sub.C():
			if !Match(f, q.Filter) || (!q.Since.IsZero() && f.GetTime().AsTime().Before(q.Since)) {
				continue
			}
			if err := stream.Send(&ferryv1.GetFlowsResponse{Flow: f}); err != nil {
				return err
			}
		}
	}
}

// ServerStatus reports the ring's fill and counters.
func (s *Server) ServerStatus(context.Context, *ferryv1.ServerStatusRequest) (*ferryv1.ServerStatusResponse, error) {
	st := s.ring.Status()
	return &ferryv1.ServerStatusResponse{
		NumFlows:  uint64(st.Flows),
		MaxFlows:  uint64(st.Capacity),
		SeenFlows: st.Seen,
		LostFlows: st.Lost,
		Nodes:     []string{s.node},
	}, nil
}
