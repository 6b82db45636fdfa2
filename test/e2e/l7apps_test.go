package e2e

// The L7 tests' own apps where no packaged program does the job: a gRPC server and
// client of grpc-go's interop TestService (grpc.testing, the service every gRPC
// implementation's interop suite speaks), and a WebSocket echo server and client
// (github.com/coder/websocket). grpc-go's own interop binaries would pull in its xDS
// stack and Google auth, so the test cases are written here after the interop spec,
// with message limits raised for 16 MiB messages. Like the scenarios, they run as
// this test binary re-executed in a pod: a server with FERRY_E2E_APP set, a client as
// a scenario printing one JSON line.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/coder/websocket"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	testpb "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"
)

const appEnv = "FERRY_E2E_APP"

// maxGRPCMessage is the message limit of the test's gRPC server and client: room
// for the 16 MiB messages.
const maxGRPCMessage = 32 << 20

// grpcStats is what the gRPC server saw, written to its stats file as it changes.
type grpcStats struct {
	Pod       string `json:"pod"`
	Unary     int64  `json:"unary"`
	Cancelled int64  `json:"cancelled"`
	Deadline  int64  `json:"deadline"`
}

// runApp is called from TestMain in a re-executed server: args are the app's name
// and its arguments. It serves until SIGTERM or SIGINT.
func runApp(args []string) int {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	var err error
	switch {
	case len(args) == 3 && args[0] == "grpc-server": // PORT STATSFILE
		err = grpcServer(ctx, args[1], args[2])
	case len(args) == 2 && args[0] == "ws-server": // PORT
		err = wsServer(ctx, args[1])
	default:
		err = fmt.Errorf("usage: grpc-server PORT STATSFILE | ws-server PORT (got %q)", args)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

func listen(port string) (net.Listener, error) {
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	return lc.Listen(context.Background(), "tcp", ":"+port)
}

// testService implements grpc.testing.TestService as the interop spec describes it,
// counting unary calls and the streams that ended by cancellation or deadline.
type testService struct {
	testpb.UnimplementedTestServiceServer
	unary, cancelled, deadline atomic.Int64
}

func (s *testService) EmptyCall(context.Context, *testpb.Empty) (*testpb.Empty, error) {
	return &testpb.Empty{}, nil
}

func (s *testService) UnaryCall(_ context.Context, in *testpb.SimpleRequest) (*testpb.SimpleResponse, error) {
	s.unary.Add(1)
	if st := in.GetResponseStatus(); st.GetCode() != 0 {
		return nil, status.Error(codes.Code(st.GetCode()), st.GetMessage())
	}
	return &testpb.SimpleResponse{Payload: &testpb.Payload{Body: make([]byte, in.GetResponseSize())}}, nil
}

func (s *testService) StreamingOutputCall(in *testpb.StreamingOutputCallRequest, stream grpc.ServerStreamingServer[testpb.StreamingOutputCallResponse]) error {
	for _, p := range in.GetResponseParameters() {
		if err := s.sleep(stream.Context(), p.GetIntervalUs()); err != nil {
			return err
		}
		if err := stream.Send(&testpb.StreamingOutputCallResponse{Payload: &testpb.Payload{Body: make([]byte, p.GetSize())}}); err != nil {
			return err
		}
	}
	return nil
}

func (s *testService) StreamingInputCall(stream grpc.ClientStreamingServer[testpb.StreamingInputCallRequest, testpb.StreamingInputCallResponse]) error {
	var sum int32
	for {
		in, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return stream.SendAndClose(&testpb.StreamingInputCallResponse{AggregatedPayloadSize: sum})
		}
		if err != nil {
			s.ended(stream.Context())
			return err
		}
		sum += int32(len(in.GetPayload().GetBody()))
	}
}

func (s *testService) FullDuplexCall(stream grpc.BidiStreamingServer[testpb.StreamingOutputCallRequest, testpb.StreamingOutputCallResponse]) error {
	for {
		in, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			s.ended(stream.Context())
			return err
		}
		if st := in.GetResponseStatus(); st.GetCode() != 0 {
			return status.Error(codes.Code(st.GetCode()), st.GetMessage())
		}
		for _, p := range in.GetResponseParameters() {
			if err := s.sleep(stream.Context(), p.GetIntervalUs()); err != nil {
				return err
			}
			if err := stream.Send(&testpb.StreamingOutputCallResponse{Payload: &testpb.Payload{Body: make([]byte, p.GetSize())}}); err != nil {
				return err
			}
		}
	}
}

// sleep waits us microseconds unless the call ends first, which it counts.
func (s *testService) sleep(ctx context.Context, us int32) error {
	select {
	case <-time.After(time.Duration(us) * time.Microsecond):
		return nil
	case <-ctx.Done():
		s.ended(ctx)
		return status.FromContextError(ctx.Err()).Err()
	}
}

// ended counts a call that ended before it completed, by why.
func (s *testService) ended(ctx context.Context) {
	switch {
	case errors.Is(ctx.Err(), context.DeadlineExceeded):
		s.deadline.Add(1)
	case errors.Is(ctx.Err(), context.Canceled):
		s.cancelled.Add(1)
	}
}

// grpcServer serves the TestService on port and keeps statsFile up to date.
func grpcServer(ctx context.Context, port, statsFile string) error {
	lis, err := listen(port)
	if err != nil {
		return err
	}
	svc := &testService{}
	srv := grpc.NewServer(grpc.MaxRecvMsgSize(maxGRPCMessage), grpc.MaxSendMsgSize(maxGRPCMessage))
	testpb.RegisterTestServiceServer(srv, svc)
	go func() {
		<-ctx.Done()
		srv.Stop()
	}()
	go func() {
		var last grpcStats
		for ctx.Err() == nil {
			st := grpcStats{Pod: os.Getenv("FERRY_LAB_POD"), Unary: svc.unary.Load(), Cancelled: svc.cancelled.Load(), Deadline: svc.deadline.Load()}
			if st != last {
				data, _ := json.Marshal(st)
				tmp := statsFile + ".tmp"
				if os.WriteFile(tmp, data, 0o644) == nil && os.Rename(tmp, statsFile) == nil {
					last = st
				}
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()
	return srv.Serve(lis)
}

// wsServer echoes every WebSocket message on port back to its sender.
func wsServer(ctx context.Context, port string) error {
	lis, err := listen(port)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		defer c.CloseNow()
		for {
			typ, msg, err := c.Read(r.Context())
			if err != nil {
				return
			}
			if err := c.Write(r.Context(), typ, msg); err != nil {
				return
			}
		}
	})}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	if err := srv.Serve(lis); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// l7Scenario runs the L7 client scenarios; ok is false for a name it does not know.
//
//	grpc ADDR CASE...   interop test cases over one channel (see grpcCase), or
//	                    unary:N for N unary calls
//	ws ADDR N           N WebSocket messages echoed in order over one connection
func l7Scenario(name, addr string, args []string) (res scenarioResult, ok bool, err error) {
	start := time.Now()
	switch name {
	case "grpc":
		conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxGRPCMessage), grpc.MaxCallSendMsgSize(maxGRPCMessage)))
		if err != nil {
			return res, true, err
		}
		defer conn.Close()
		tc := testpb.NewTestServiceClient(conn)
		for _, c := range args {
			if err := grpcCase(tc, c); err != nil {
				return res, true, fmt.Errorf("%s: %w", c, err)
			}
		}
		return scenarioResult{Seconds: time.Since(start).Seconds()}, true, nil
	case "ws":
		n := 0
		if len(args) > 0 {
			n, _ = strconv.Atoi(args[0])
		}
		sent, err := wsEcho(addr, n)
		return scenarioResult{Bytes: sent, Seconds: time.Since(start).Seconds()}, true, err
	}
	return res, false, nil
}

// grpcCase runs one interop test case (named as in grpc's interop spec) or unary:N,
// or large_16m: a 16 MiB request answered by a 16 MiB response.
func grpcCase(tc testpb.TestServiceClient, name string) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	body := func(n int) *testpb.Payload { return &testpb.Payload{Body: make([]byte, n)} }
	params := func(sizes ...int32) []*testpb.ResponseParameters {
		var ps []*testpb.ResponseParameters
		for _, s := range sizes {
			ps = append(ps, &testpb.ResponseParameters{Size: s})
		}
		return ps
	}
	if n, ok := strings.CutPrefix(name, "unary:"); ok {
		count, err := strconv.Atoi(n)
		if err != nil {
			return err
		}
		for i := range count {
			if _, err := tc.UnaryCall(ctx, &testpb.SimpleRequest{ResponseSize: 16, Payload: body(16)}); err != nil {
				return fmt.Errorf("call %d: %w", i, err)
			}
		}
		return nil
	}
	switch name {
	case "empty_unary":
		_, err := tc.EmptyCall(ctx, &testpb.Empty{})
		return err
	case "large_unary", "large_16m":
		req, resp := 271828, 314159
		if name == "large_16m" {
			req, resp = 16<<20, 16<<20
		}
		r, err := tc.UnaryCall(ctx, &testpb.SimpleRequest{ResponseSize: int32(resp), Payload: body(req)})
		if err != nil {
			return err
		}
		if got := len(r.GetPayload().GetBody()); got != resp {
			return fmt.Errorf("response of %d bytes, want %d", got, resp)
		}
		return nil
	case "client_streaming":
		stream, err := tc.StreamingInputCall(ctx)
		if err != nil {
			return err
		}
		for _, n := range []int{27182, 8, 1828, 45904} {
			if err := stream.Send(&testpb.StreamingInputCallRequest{Payload: body(n)}); err != nil {
				return err
			}
		}
		r, err := stream.CloseAndRecv()
		if err != nil {
			return err
		}
		if r.GetAggregatedPayloadSize() != 74922 {
			return fmt.Errorf("aggregated size %d, want 74922", r.GetAggregatedPayloadSize())
		}
		return nil
	case "server_streaming":
		want := []int32{31415, 9, 2653, 58979}
		stream, err := tc.StreamingOutputCall(ctx, &testpb.StreamingOutputCallRequest{ResponseParameters: params(want...)})
		if err != nil {
			return err
		}
		for i := 0; ; i++ {
			r, err := stream.Recv()
			if errors.Is(err, io.EOF) {
				if i != len(want) {
					return fmt.Errorf("%d responses, want %d", i, len(want))
				}
				return nil
			}
			if err != nil {
				return err
			}
			if i >= len(want) || len(r.GetPayload().GetBody()) != int(want[i]) {
				return fmt.Errorf("response %d of %d bytes, want sizes %v", i, len(r.GetPayload().GetBody()), want)
			}
		}
	case "ping_pong":
		stream, err := tc.FullDuplexCall(ctx)
		if err != nil {
			return err
		}
		for i, sz := range [][2]int{{31415, 27182}, {9, 8}, {2653, 1828}, {58979, 45904}} {
			if err := stream.Send(&testpb.StreamingOutputCallRequest{ResponseParameters: params(int32(sz[0])), Payload: body(sz[1])}); err != nil {
				return err
			}
			r, err := stream.Recv()
			if err != nil {
				return fmt.Errorf("pong %d: %w", i, err)
			}
			if len(r.GetPayload().GetBody()) != sz[0] {
				return fmt.Errorf("pong %d of %d bytes, want %d", i, len(r.GetPayload().GetBody()), sz[0])
			}
		}
		if err := stream.CloseSend(); err != nil {
			return err
		}
		if _, err := stream.Recv(); !errors.Is(err, io.EOF) {
			return fmt.Errorf("after close: %v, want the end of the stream", err)
		}
		return nil
	case "timeout_on_sleeping_server":
		ctx, cancel := context.WithTimeout(ctx, time.Millisecond)
		defer cancel()
		stream, err := tc.FullDuplexCall(ctx)
		if err == nil {
			err = stream.Send(&testpb.StreamingOutputCallRequest{Payload: body(27182)})
			if err == nil || errors.Is(err, io.EOF) {
				_, err = stream.Recv()
			}
		}
		return wantCode(err, codes.DeadlineExceeded)
	case "deadline_on_server": // a 300 ms deadline on a call the server answers after 5 s
		ctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
		defer cancel()
		stream, err := tc.StreamingOutputCall(ctx, &testpb.StreamingOutputCallRequest{
			ResponseParameters: []*testpb.ResponseParameters{{Size: 1, IntervalUs: 5e6}}})
		if err == nil {
			_, err = stream.Recv()
		}
		return wantCode(err, codes.DeadlineExceeded)
	case "cancel_after_begin":
		ctx, cancel := context.WithCancel(ctx)
		stream, err := tc.StreamingInputCall(ctx)
		if err != nil {
			cancel()
			return err
		}
		cancel()
		_, err = stream.CloseAndRecv()
		return wantCode(err, codes.Canceled)
	case "cancel_after_first_response":
		ctx, cancel := context.WithCancel(ctx)
		defer cancel()
		stream, err := tc.FullDuplexCall(ctx)
		if err != nil {
			return err
		}
		if err := stream.Send(&testpb.StreamingOutputCallRequest{ResponseParameters: params(31415), Payload: body(27182)}); err != nil {
			return err
		}
		if _, err := stream.Recv(); err != nil {
			return err
		}
		cancel()
		_, err = stream.Recv()
		return wantCode(err, codes.Canceled)
	}
	return fmt.Errorf("unknown test case")
}

func wantCode(err error, want codes.Code) error {
	if got := status.Code(err); got != want {
		return fmt.Errorf("status %v (%v), want %v", got, err, want)
	}
	return nil
}

// wsEcho sends n numbered text messages over one WebSocket connection to
// ws://addr/ and checks each comes back, in order.
func wsEcho(addr string, n int) (int64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, resp, err := websocket.Dial(ctx, "ws://"+addr+"/", nil)
	if err != nil {
		return 0, fmt.Errorf("dial: %w", err)
	}
	if resp.Body != nil {
		resp.Body.Close()
	}
	defer c.CloseNow()
	var sent int64
	for i := range n {
		msg := fmt.Sprintf("%s%d", Marker, i)
		if err := c.Write(ctx, websocket.MessageText, []byte(msg)); err != nil {
			return sent, fmt.Errorf("message %d: %w", i, err)
		}
		_, got, err := c.Read(ctx)
		if err != nil {
			return sent, fmt.Errorf("echo of message %d: %w", i, err)
		}
		if string(got) != msg {
			return sent, fmt.Errorf("echo of message %d is %q", i, got)
		}
		sent += int64(len(msg))
	}
	return sent, c.Close(websocket.StatusNormalClosure, "done")
}
