// This file holds `ferry ui`: a web page with the live service map and flow table,
// served from this machine and fed by the agents' Observer APIs through an
// in-process relay. The page (ui/index.html) is plain HTML, JavaScript and SVG.

package main

import (
	"context"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/ferrymesh/ferry/agent/flows"
	"github.com/ferrymesh/ferry/api/ferryv1"
	"github.com/ferrymesh/ferry/internal/listener"
	"github.com/ferrymesh/ferry/operator/relay"
	"github.com/spf13/cobra"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/timestamppb"
)

//go:embed ui/index.html
var uiPage []byte

// uiMaxFlows bounds one /api/flows answer.
const uiMaxFlows = 2000

func newUICommand() *cobra.Command {
	var (
		src    sourceFlags
		listen string
	)
	cmd := &cobra.Command{
		Use:   "ui",
		Short: "Serve a web page with the live service map and the flows",
		Long: `Serve a web page that shows, from the agents' flows, a live service map (workloads as
nodes; connections as edges with their rate, error rate and whether they were carried
over mutual TLS; requests carried at L7 as edges to the Service they called, with their
rate, success rate (a response that is not 5xx, and gRPC status OK) and p99 latency
over the last minute) and a filterable table of the flows, refreshed every second.

The page reads the agents through this process (an in-process relay merges their flows
in time order), so it works against a lab from the host: pass --lab PREFIX. Listen on
loopback unless you mean to show flows to the network: they name pods and identities.`,
		Example: `  sudo ferry ui --lab fy --listen 127.0.0.1:8099
  sudo ferry ui --agent-socket /run/ferry/observer.sock`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			r, names, err := src.relay(cmd.Context())
			if err != nil {
				return err
			}
			defer r.Stop()
			lc := listener.Config()
			ln, err := lc.Listen(cmd.Context(), "tcp", listen)
			if err != nil {
				return fmt.Errorf("ui listener: %w", err)
			}
			srv := &http.Server{Handler: uiHandler(r), ReadHeaderTimeout: 5 * time.Second}
			fmt.Fprintf(cmd.OutOrStdout(), "ferry ui: http://%s/ (flows from %s); Ctrl-C stops\n", ln.Addr(), strings.Join(names, ", "))
			go func() {
				<-cmd.Context().Done()
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				defer cancel()
				srv.Shutdown(ctx)
			}()
			if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				return err
			}
			return nil
		},
	}
	src.add(cmd)
	cmd.Flags().StringVar(&listen, "listen", "127.0.0.1:8099", "address to serve the page on")
	return cmd
}

// uiHandler serves the page and its JSON API:
//
//	GET /api/flows?since=RFC3339NANO&last=N   flows, oldest first
//	GET /api/status                           the agents' ring status, unreachable agents
func uiHandler(r *relay.Relay) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Header().Set("Cache-Control", "no-store")
		w.Write(uiPage)
	})
	mux.HandleFunc("GET /api/flows", func(w http.ResponseWriter, req *http.Request) {
		q := req.URL.Query()
		fr := &ferryv1.GetFlowsRequest{Number: uiMaxFlows}
		if s := q.Get("since"); s != "" {
			t, err := time.Parse(time.RFC3339Nano, s)
			if err != nil {
				http.Error(w, "since: "+err.Error(), http.StatusBadRequest)
				return
			}
			fr.Since = timestamppb.New(t)
		}
		if s := q.Get("last"); s != "" {
			n, err := strconv.ParseUint(s, 10, 32)
			if err != nil || n == 0 || n > uiMaxFlows {
				http.Error(w, fmt.Sprintf("last: want 1 to %d", uiMaxFlows), http.StatusBadRequest)
				return
			}
			fr.Number = n
		}
		ctx, cancel := context.WithTimeout(req.Context(), 5*time.Second)
		defer cancel()
		var out []json.RawMessage
		var unavailable []string
		err := r.Flows(ctx, fr, func(f *ferryv1.Flow) error {
			b, err := protojson.MarshalOptions{UseProtoNames: true, EmitDefaultValues: true}.Marshal(f)
			out = append(out, b)
			return err
		}, func(e relay.AgentError) { unavailable = append(unavailable, e.Error()) })
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		writeAPI(w, map[string]any{"flows": nonNil(out), "unavailable": nonNil(unavailable)})
	})
	mux.HandleFunc("GET /api/status", func(w http.ResponseWriter, req *http.Request) {
		st, err := r.ServerStatus(req.Context(), &ferryv1.ServerStatusRequest{})
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		writeAPI(w, map[string]any{
			"nodes": nonNil(st.GetNodes()), "unavailable": nonNil(st.GetUnavailable()),
			"flows": st.GetNumFlows(), "capacity": st.GetMaxFlows(), "seen": st.GetSeenFlows(),
			"verdicts": []string{flows.VerdictName(ferryv1.Verdict_VERDICT_FORWARDED), flows.VerdictName(ferryv1.Verdict_VERDICT_DROPPED), flows.VerdictName(ferryv1.Verdict_VERDICT_ERROR)},
		})
	})
	return mux
}

func nonNil[T any](s []T) []T {
	if s == nil {
		return []T{}
	}
	return s
}

func writeAPI(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	_ = json.NewEncoder(w).Encode(v) // a client gone mid-answer is not our error
}
