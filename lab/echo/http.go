// This file holds ModeHTTP: a small HTTP server with the knobs traffic tests need
// from a backend. Every response names the pod in PodHTTPHeader, so a client sees
// which endpoint answered; every request is counted by its "tag" query parameter
// (a test's own tag), and /stats reports the counts.

package echo

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"
)

// PodHTTPHeader is the response header in which ModeHTTP names the pod that
// answered.
const PodHTTPHeader = "Ferry-Lab-Pod"

// MaxDelay caps /delay/{duration}.
const MaxDelay = time.Minute

// Stats is what GET /stats answers: per tag (the requests' "tag" query
// parameter, "" without one), the requests the server answered or saw end, and
// how many of those the client canceled before the answer was complete.
type Stats struct {
	Pod      string           `json:"pod"`
	Requests map[string]int64 `json:"requests"`
	Canceled map[string]int64 `json:"canceled"`
}

// Request is what GET /request/... answers: the request as the app saw it, after
// whatever the mesh changed on the way.
type Request struct {
	Pod     string      `json:"pod"`
	Method  string      `json:"method"`
	Host    string      `json:"host"`
	Path    string      `json:"path"`
	Query   string      `json:"query"`
	Headers http.Header `json:"headers"`
}

// httpServer holds ModeHTTP's counters.
type httpServer struct {
	opts Options

	mu       sync.Mutex
	requests map[string]int64
	canceled map[string]int64
	// fails counts the /fail requests seen per query string, so each test's share
	// fails on its own count.
	fails map[string]int64
}

func serveHTTP(ctx context.Context, ln net.Listener, opts Options) error {
	s := &httpServer{opts: opts, requests: map[string]int64{}, canceled: map[string]int64{}, fails: map[string]int64{}}
	srv := &http.Server{Handler: s.handler(), ReadHeaderTimeout: 10 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("http serve: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		srv.Close()
	}
	<-errc
	return nil
}

func (s *httpServer) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/echo", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/octet-stream")
		buf := make([]byte, 64*1024)
		for {
			n, err := r.Body.Read(buf)
			if n > 0 {
				if _, werr := w.Write(buf[:n]); werr != nil {
					return
				}
			}
			if err != nil {
				return
			}
		}
	})
	mux.HandleFunc("/bytes", func(w http.ResponseWriter, r *http.Request) {
		n, err := strconv.ParseInt(r.URL.Query().Get("n"), 10, 64)
		if err != nil || n < 0 || n > MaxBytes {
			http.Error(w, fmt.Sprintf("n: want an integer from 0 to %d", MaxBytes), http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Content-Length", strconv.FormatInt(n, 10))
		buf := make([]byte, 64*1024)
		var p Pattern
		for off := int64(0); off < n; {
			chunk := buf[:min(int64(len(buf)), n-off)]
			p.Fill(chunk, off)
			if _, err := w.Write(chunk); err != nil {
				return
			}
			off += int64(len(chunk))
		}
	})
	mux.HandleFunc("/status/{code}", func(w http.ResponseWriter, r *http.Request) {
		code, err := strconv.Atoi(r.PathValue("code"))
		if err != nil || code < 200 || code > 599 {
			http.Error(w, "code: want a status from 200 to 599", http.StatusBadRequest)
			return
		}
		w.WriteHeader(code)
	})
	mux.HandleFunc("/headers", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, r.Header)
	})
	mux.HandleFunc("/{$}", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, map[string]string{"pod": s.opts.Pod, "remote_addr": r.RemoteAddr})
	})
	// /fail?percent=P&code=C answers C to P% of the requests with the same query,
	// spread evenly over them (below 50% never two in a row): a backend shedding a
	// share of its load, whose failures a retry on the next request gets past.
	mux.HandleFunc("/fail", func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		percent, err1 := strconv.ParseFloat(q.Get("percent"), 64)
		code, err2 := strconv.Atoi(q.Get("code"))
		if err1 != nil || err2 != nil || percent < 0 || percent > 100 || code < 200 || code > 599 {
			http.Error(w, "want percent from 0 to 100 and code from 200 to 599", http.StatusBadRequest)
			return
		}
		s.mu.Lock()
		s.fails[r.URL.RawQuery]++
		n := s.fails[r.URL.RawQuery]
		s.mu.Unlock()
		// The n-th request fails when it takes the count of failures due to the next
		// whole number.
		if int64(float64(n)*percent/100) > int64(float64(n-1)*percent/100) {
			w.WriteHeader(code)
			return
		}
		writeJSON(w, map[string]string{"pod": s.opts.Pod})
	})
	// /delay/{duration} answers after the duration, unless the client goes away
	// first: the count of canceled requests in /stats says whether the server saw it
	// leave (a timeout in the mesh must cancel the request upstream).
	mux.HandleFunc("/delay/{d}", func(w http.ResponseWriter, r *http.Request) {
		d, err := time.ParseDuration(r.PathValue("d"))
		if err != nil || d < 0 || d > MaxDelay {
			http.Error(w, fmt.Sprintf("want a duration from 0 to %s", MaxDelay), http.StatusBadRequest)
			return
		}
		select {
		case <-time.After(d):
			writeJSON(w, map[string]string{"pod": s.opts.Pod})
		case <-r.Context().Done():
		}
	})
	mux.HandleFunc("/request/", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, Request{Pod: s.opts.Pod, Method: r.Method, Host: r.Host, Path: r.URL.Path, Query: r.URL.RawQuery, Headers: r.Header})
	})
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set(PodHTTPHeader, s.opts.Pod)
		if r.URL.Path == "/stats" {
			s.mu.Lock()
			st := Stats{Pod: s.opts.Pod, Requests: copyCounts(s.requests), Canceled: copyCounts(s.canceled)}
			s.mu.Unlock()
			writeJSON(w, st)
			return
		}
		defer s.count(r)
		if s.opts.Delay > 0 {
			select {
			case <-time.After(s.opts.Delay):
			case <-r.Context().Done():
				return
			}
		}
		if s.opts.FailStatus != 0 {
			w.WriteHeader(s.opts.FailStatus)
			return
		}
		mux.ServeHTTP(w, r)
	})
}

// count counts a request that ended under its tag, and as canceled when its client
// went away before the handler was done.
func (s *httpServer) count(r *http.Request) {
	tag := r.URL.Query().Get("tag")
	s.mu.Lock()
	defer s.mu.Unlock()
	s.requests[tag]++
	if r.Context().Err() != nil {
		s.canceled[tag]++
	}
}

func copyCounts(m map[string]int64) map[string]int64 {
	out := make(map[string]int64, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}
