package e2e

// The real Prometheus server (Debian prometheus) scrapes a lab of its own
// (prefix "hp", pods in 10.126.0.0/16): it runs in node1's network namespace,
// where it reaches both agents' --metrics-addr on the nodes' fabric addresses,
// and the local-mode operator's metrics through a bridge the test opens in that
// namespace to the operator's unix socket (the operator runs outside the lab's
// namespaces). Nothing is sent from the root namespace to a lab address.

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	agentnetns "github.com/ferrymesh/ferry/agent/netns"
	"github.com/ferrymesh/ferry/internal/promtest"
	"github.com/ferrymesh/ferry/lab"
)

const (
	hpPrefix = "hp"
	hpPodNet = 126
	// hpAgentMetrics is the agents' --metrics-addr port, on each node's addresses.
	hpAgentMetrics = 15020
	// hpOperatorMetrics is where the bridge to the operator's metrics listens in
	// node1's namespace (loopback).
	hpOperatorMetrics = 15014
)

var (
	hpVIPb = netip.MustParseAddr("10.96.0.226") // svc-b: pod b's HTTP echo
	hpVIPc = netip.MustParseAddr("10.96.0.227") // svc-c: pod c's HTTP echo
)

var hpLab = onceLab{what: "prometheus lab", bringUp: hpBringUp}

// hpOperatorSocket is the operator's metrics socket, in the lab's state folder
// (removed with the lab).
func hpOperatorSocket() string {
	return filepath.Join(lab.StateDirFor(hpPrefix), "operator-metrics.sock")
}

func hpBringUp() (*env, error) {
	cfg := lab.Config{
		Prefix:    hpPrefix,
		PodNet:    hpPodNet,
		AgentArgs: []string{"--metrics-addr", fmt.Sprintf(":%d", hpAgentMetrics)},
		// The lab disables the operator's TCP metrics; a later flag wins.
		Operator: lab.OperatorConfig{Args: []string{"--metrics-addr", "unix://" + hpOperatorSocket()}},
		Nodes: []lab.NodeConfig{
			{Name: "node1", Pods: []lab.PodConfig{
				{Name: "a", Namespace: "shop", ServiceAccount: "web", Enrolled: true},
			}},
			{Name: "node2", Pods: []lab.PodConfig{
				{Name: "b", Namespace: "shop", ServiceAccount: "api", Enrolled: true},
				{Name: "c", Namespace: "shop", ServiceAccount: "db", Enrolled: true},
			}},
		},
		Services: []lab.ServiceConfig{
			{Name: "svc-b", Namespace: "shop", ClusterIP: hpVIPb, Port: servicePort, TargetPort: echoHTTPPort, Pods: []string{"b"}, PortName: "http"},
			{Name: "svc-c", Namespace: "shop", ClusterIP: hpVIPc, Port: servicePort, TargetPort: echoHTTPPort, Pods: []string{"c"}, PortName: "http"},
		},
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	e, err := newEnv(ctx, cfg, "ferry", "ferry-agent", "ferry-operator")
	if err != nil {
		return nil, err
	}
	for _, pod := range []string{"b", "c"} {
		if err := e.startServer(ctx, pod, echoHTTPPort, "--http"); err != nil {
			return e.fail(err)
		}
		if err := e.startServer(ctx, pod, echoPort); err != nil {
			return e.fail(err)
		}
	}
	return e, nil
}

// nsBridge forwards TCP connections accepted on addr inside a namespace to a
// unix socket, until Close.
type nsBridge struct {
	ln net.Listener
	wg sync.WaitGroup
}

func startNSBridge(ns *agentnetns.Handle, addr, socket string) (*nsBridge, error) {
	var ln net.Listener
	err := ns.Do(func() error {
		var lc net.ListenConfig
		lc.SetMultipathTCP(false)
		var err error
		ln, err = lc.Listen(context.Background(), "tcp", addr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("bridge listen %s: %w", addr, err)
	}
	b := &nsBridge{ln: ln}
	b.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			b.wg.Go(func() {
				defer c.Close()
				u, err := net.Dial("unix", socket)
				if err != nil {
					return
				}
				defer u.Close()
				done := make(chan struct{})
				go func() { io.Copy(u, c); u.(*net.UnixConn).CloseWrite(); close(done) }()
				io.Copy(c, u)
				c.(*net.TCPConn).CloseWrite()
				<-done
			})
		}
	})
	return b, nil
}

func (b *nsBridge) Close() {
	b.ln.Close()
	b.wg.Wait()
}

// dashboard is the part of a Grafana dashboard the test reads.
type dashboard struct {
	Title      string `json:"title"`
	Templating struct {
		List []struct {
			Name  string          `json:"name"`
			Type  string          `json:"type"`
			Query json.RawMessage `json:"query"` // {"query": ...} for type query

		} `json:"list"`
	} `json:"templating"`
	Panels []struct {
		Title   string `json:"title"`
		Targets []struct {
			Expr string `json:"expr"`
		} `json:"targets"`
	} `json:"panels"`
}

// Prometheus scrapes both agents and the operator while mesh traffic runs
// (HTTP: a → svc-b across nodes, b → svc-c on the same node), and then every
// query of every panel of every dashboard in deploy/monitoring/dashboards/
// returns data, as does every dashboard variable's label_values query; the rules
// in deploy/monitoring/rules/ load and evaluate, and no alert fires.
func TestPrometheusDashboards(t *testing.T) {
	e := hpLab.get(t)
	e.waitEnrolled(t, "node1", "shop/a")
	e.waitEnrolled(t, "node2", "shop/b", "shop/c")
	st := e.lab.Status()
	var targets []string
	for _, n := range st.Nodes {
		targets = append(targets, fmt.Sprintf("%q", netip.AddrPortFrom(n.FabricIP, hpAgentMetrics).String()))
	}
	node1Agent := netip.AddrPortFrom(st.Nodes[0].FabricIP, hpAgentMetrics).String()

	ns, err := e.lab.Netns("node1")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close() })
	bridge, err := startNSBridge(ns, fmt.Sprintf("127.0.0.1:%d", hpOperatorMetrics), hpOperatorSocket())
	if err != nil {
		t.Fatal(err)
	}
	// After Prometheus has stopped (cleanups run last first): its scrape
	// connections through the bridge end with it.
	t.Cleanup(bridge.Close)

	rules, err := filepath.Abs("../../deploy/monitoring/rules/ferry.rules.yaml")
	if err != nil {
		t.Fatal(err)
	}
	config := fmt.Sprintf(`global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: [%q]
scrape_configs:
  - job_name: ferry-agent
    static_configs: [{targets: [%s]}]
  - job_name: ferry-operator
    static_configs: [{targets: ["127.0.0.1:%d"]}]
`, rules, strings.Join(targets, ", "), hpOperatorMetrics)
	pc := promtest.Start(t, ns.Path(), t.TempDir(), config)

	// Every target up.
	promtest.WaitFor(t, 60*time.Second, "Prometheus scrapes 2 agents and the operator", func() (bool, string) {
		n, data, err := pc.Query(`up == 1`)
		return err == nil && n == 3, fmt.Sprintf("up == 1: %d series, %v %s", n, err, data)
	})

	// Mesh traffic for a while, so counters have several samples.
	start := time.Now()
	for time.Since(start) < 12*time.Second {
		for _, c := range []struct {
			pod string
			vip netip.Addr
		}{{"a", hpVIPb}, {"b", hpVIPc}} {
			args := []string{"-sS", "--max-time", "10"}
			for range 10 {
				args = append(args, "-o", "/dev/null", fmt.Sprintf("http://%s/status/200", c.vip))
			}
			args = append(args, "-o", "/dev/null", fmt.Sprintf("http://%s/status/503", c.vip))
			if out, err := e.lab.Command(t.Context(), c.pod, "curl", args...).CombinedOutput(); err != nil {
				t.Fatalf("curl from %s to %s: %v\n%s", c.pod, c.vip, err, out)
			}
		}
		// And plain TCP, which the TCP metrics count by workload.
		e.mustRun(t, "a", "echo", e.addr("b", echoPort), "4096")
		e.mustRun(t, "b", "echo", e.addr("c", echoPort), "4096")
		time.Sleep(time.Second)
	}
	t.Logf("traffic sent for %v", time.Since(start).Round(time.Second))

	vars := map[string]string{"namespace": "shop", "workload": "b", "instance": node1Agent, "__rate_interval": "1m"}
	subst := func(expr string) string {
		return regexp.MustCompile(`\$\{?(\w+)\}?`).ReplaceAllStringFunc(expr, func(m string) string {
			name := strings.Trim(m, "${}")
			if v, ok := vars[name]; ok {
				return v
			}
			t.Errorf("no value for variable %s in %s", m, expr)
			return m
		})
	}
	files, _ := filepath.Glob("../../deploy/monitoring/dashboards/*.json")
	if len(files) < 3 {
		t.Fatalf("dashboards: %v", files)
	}
	// Every check polled together until all hold or 60 s pass.
	type check struct {
		what string
		ok   func() (bool, string)
	}
	var checks []check
	queries := 0
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var d dashboard
		if err := json.Unmarshal(data, &d); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		// Variables: Grafana's label_values(SELECTOR, LABEL) is Prometheus's
		// /api/v1/label/LABEL/values with match[]=SELECTOR.
		for _, v := range d.Templating.List {
			if v.Type != "query" {
				continue
			}
			var q struct{ Query string }
			if err := json.Unmarshal(v.Query, &q); err != nil {
				t.Fatalf("%s: variable %s: %v", d.Title, v.Name, err)
			}
			m := regexp.MustCompile(`^label_values\((.*),\s*(\w+)\)$`).FindStringSubmatch(q.Query)
			if m == nil {
				t.Errorf("%s: variable %s: query %q is not label_values(SELECTOR, LABEL)", d.Title, v.Name, q.Query)
				continue
			}
			sel, label, want := subst(m[1]), m[2], vars[v.Name]
			checks = append(checks, check{fmt.Sprintf("%s: variable %s has %s among its values", d.Title, v.Name, want), func() (bool, string) {
				data, err := pc.Get("/api/v1/label/"+label+"/values", url.Values{"match[]": {sel}})
				var values []string
				if err == nil {
					err = json.Unmarshal(data, &values)
				}
				return err == nil && slices.Contains(values, want), fmt.Sprintf("values %v %v", values, err)
			}})
		}
		for _, p := range d.Panels {
			for _, tg := range p.Targets {
				expr := subst(tg.Expr)
				queries++
				checks = append(checks, check{fmt.Sprintf("%s / %s: %s returns data", d.Title, p.Title, expr), func() (bool, string) {
					n, data, err := pc.Query(expr)
					return err == nil && n > 0, fmt.Sprintf("%d series %v %s", n, err, data)
				}})
			}
		}
	}
	last := map[string]string{}
	deadline := time.Now().Add(60 * time.Second)
	for len(checks) > 0 && time.Now().Before(deadline) {
		checks = slices.DeleteFunc(checks, func(c check) bool {
			ok, l := c.ok()
			last[c.what] = l
			return ok
		})
		time.Sleep(time.Second)
	}
	for _, c := range checks {
		t.Errorf("%s: not after 60 s; last: %s", c.what, last[c.what])
	}
	t.Logf("%d panel queries of %d dashboards: %d without data", queries, len(files), len(checks))

	// The rules loaded and evaluate without error; the recording rules have data;
	// nothing is wrong in this lab, so no alert fires.
	rs, err := pc.Rules()
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range rs {
		if r.Health == "err" {
			t.Errorf("rule %s: %s", r.Name, r.LastError)
		}
		if r.Type == "alerting" && r.State != "inactive" {
			t.Errorf("alert %s is %s in a healthy lab", r.Name, r.State)
		}
	}
	if len(rs) < 10 {
		t.Errorf("Prometheus loaded %d rules, want those of %s", len(rs), rules)
	}
	promtest.WaitFor(t, 60*time.Second, "recording rule ferry:requests:rate5m has data", func() (bool, string) {
		n, data, err := pc.Query(`ferry:requests:rate5m{response_code="200"} > 0`)
		return err == nil && n >= 1, fmt.Sprintf("%d %v %s", n, err, data)
	})
}
