// Package promtest runs the real Prometheus server (Debian prometheus,
// hack/install-deps.sh) inside a test's network namespace, where it reaches what
// it scrapes, and asks it through its HTTP API from there: nothing is sent from
// the root namespace to a test address.
package promtest

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/agent/netns"
	"github.com/ferrymesh/ferry/internal/privileged"
)

// Port is where Prometheus listens, on loopback inside its namespace.
const Port = 9090

// Server is a running Prometheus.
type Server struct {
	client *http.Client
}

// Start writes config as prometheus.yml into dir and runs Prometheus with it
// inside the network namespace at netnsPath, its data in dir, until t ends. The
// end of its log is printed if t failed.
func Start(t testing.TB, netnsPath, dir, config string) *Server {
	t.Helper()
	bin := privileged.LookPath(t, "prometheus", "Debian prometheus, hack/install-deps.sh")
	ns, err := netns.Open(netnsPath)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close() })
	file := filepath.Join(dir, "prometheus.yml")
	if err := os.WriteFile(file, []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	logPath := filepath.Join(dir, "prometheus.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("nsenter", "--net="+netnsPath, bin,
		"--config.file="+file,
		"--storage.tsdb.path="+filepath.Join(dir, "data"),
		fmt.Sprintf("--web.listen-address=127.0.0.1:%d", Port))
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		logf.Close()
		t.Fatalf("prometheus: %v", err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		logf.Close()
		if t.Failed() {
			data, _ := os.ReadFile(logPath)
			lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
			t.Logf("end of the prometheus log:\n%s", strings.Join(lines[max(0, len(lines)-30):], "\n"))
		}
	})
	return &Server{client: &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			var c net.Conn
			err := ns.Do(func() error {
				var d net.Dialer
				var err error
				c, err = d.DialContext(ctx, network, addr)
				return err
			})
			return c, err
		},
	}}}
}

// Get asks the HTTP API path with the query q and returns the answer's data.
func (s *Server) Get(path string, q url.Values) (json.RawMessage, error) {
	resp, err := s.client.Get(fmt.Sprintf("http://127.0.0.1:%d%s?%s", Port, path, q.Encode()))
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var r struct {
		Status string `json:"status"`
		Error  string `json:"error"`
		Data   json.RawMessage
	}
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
		return nil, fmt.Errorf("%s: %s: %w", path, resp.Status, err)
	}
	if r.Status != "success" {
		return nil, fmt.Errorf("%s %v: %s", path, q, r.Error)
	}
	return r.Data, nil
}

// Query returns the number of series (or 1 for a scalar) expr gives now, and the
// answer's data as text.
func (s *Server) Query(expr string) (int, string, error) {
	data, err := s.Get("/api/v1/query", url.Values{"query": {expr}})
	if err != nil {
		return 0, "", err
	}
	var d struct {
		Result []json.RawMessage `json:"result"`
	}
	if err := json.Unmarshal(data, &d); err != nil {
		if strings.Contains(string(data), `"scalar"`) {
			return 1, string(data), nil
		}
		return 0, "", err
	}
	return len(d.Result), string(data), nil
}

// Rule is one rule as Prometheus reports it loaded.
type Rule struct {
	Name      string `json:"name"`
	Type      string `json:"type"` // "alerting" or "recording"
	Health    string `json:"health"`
	LastError string `json:"lastError"`
	State     string `json:"state"` // of an alert: "inactive", "pending", "firing"
}

// Rules returns every rule Prometheus loaded.
func (s *Server) Rules() ([]Rule, error) {
	data, err := s.Get("/api/v1/rules", nil)
	if err != nil {
		return nil, err
	}
	var rs struct {
		Groups []struct {
			Rules []Rule `json:"rules"`
		} `json:"groups"`
	}
	if err := json.Unmarshal(data, &rs); err != nil {
		return nil, err
	}
	var all []Rule
	for _, g := range rs.Groups {
		all = append(all, g.Rules...)
	}
	return all, nil
}

// WaitFor polls cond every 500 ms until it holds, failing t with cond's last
// report after timeout.
func WaitFor(t testing.TB, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, last := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("%s: not after %v; last: %s", what, timeout, last)
			return
		}
		time.Sleep(500 * time.Millisecond)
	}
}
