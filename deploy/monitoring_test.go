package deploy_test

// Tests of deploy/monitoring/: the Prometheus rules with promtool (Debian
// prometheus), the example scrape configuration, and the dashboards' shape. The
// dashboards' queries are run against a real Prometheus scraping a lab in
// test/e2e (TestPrometheusDashboards).

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

func promtool(t *testing.T, dir string, args ...string) string {
	t.Helper()
	cmd := exec.CommandContext(t.Context(), "promtool", args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

func TestPrometheusRules(t *testing.T) {
	rules, _ := filepath.Glob("monitoring/rules/*.yaml")
	var files, tests []string
	for _, f := range rules {
		if strings.HasSuffix(f, "_test.yaml") {
			tests = append(tests, filepath.Base(f))
		} else {
			files = append(files, filepath.Base(f))
		}
	}
	if len(files) == 0 || len(tests) == 0 {
		t.Fatalf("rules %v, tests %v: want both", files, tests)
	}
	out := promtool(t, "monitoring/rules", append([]string{"check", "rules"}, files...)...)
	t.Logf("promtool check rules:\n%s", out)
	out = promtool(t, "monitoring/rules", append([]string{"test", "rules"}, tests...)...)
	t.Logf("promtool test rules:\n%s", out)
	if !strings.Contains(out, "SUCCESS") {
		t.Errorf("promtool test rules:\n%s", out)
	}
	// Every alert has a test that makes it fire.
	var doc struct {
		Groups []struct {
			Rules []struct{ Alert string }
		}
	}
	for _, f := range files {
		data, err := os.ReadFile(filepath.Join("monitoring/rules", f))
		if err != nil {
			t.Fatal(err)
		}
		if err := yaml.Unmarshal(data, &doc); err != nil {
			t.Fatal(err)
		}
	}
	var testText string
	for _, f := range tests {
		data, _ := os.ReadFile(filepath.Join("monitoring/rules", f))
		testText += string(data)
	}
	for _, g := range doc.Groups {
		for _, r := range g.Rules {
			if r.Alert == "" {
				continue
			}
			if !regexp.MustCompile(`alertname: ` + r.Alert + `\s+exp_alerts:\s+- exp_labels`).MatchString(testText) {
				t.Errorf("alert %s has no test where it fires", r.Alert)
			}
		}
	}
}

// The example configuration is valid. Debian's Prometheus is built without
// Kubernetes service discovery, so promtool checks a copy whose
// kubernetes_sd_configs are static targets; everything else (relabelling, rule
// files) is checked as written.
func TestPrometheusExampleConfig(t *testing.T) {
	data, err := os.ReadFile("monitoring/prometheus.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var cfg map[string]any
	if err := yaml.Unmarshal(data, &cfg); err != nil {
		t.Fatal(err)
	}
	jobs := map[string]bool{}
	for _, sc := range cfg["scrape_configs"].([]any) {
		job := sc.(map[string]any)
		jobs[job["job_name"].(string)] = true
		if _, ok := job["kubernetes_sd_configs"]; !ok {
			t.Errorf("job %v does not discover pods", job["job_name"])
		}
		delete(job, "kubernetes_sd_configs")
		job["static_configs"] = []any{map[string]any{"targets": []any{"127.0.0.1:1"}}}
	}
	if !jobs["ferry-agent"] || !jobs["ferry-operator"] {
		t.Errorf("jobs %v, want ferry-agent and ferry-operator (the alerts' job labels)", jobs)
	}
	// rule_files are relative to the configuration file: check it from beside them.
	dir := t.TempDir()
	if err := os.Symlink(filepath.Join(mustAbs(t, "monitoring"), "rules"), filepath.Join(dir, "rules")); err != nil {
		t.Fatal(err)
	}
	out, err := yaml.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "prometheus.yaml"), out, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("%s", promtool(t, dir, "check", "config", "prometheus.yaml"))
}

func mustAbs(t *testing.T, p string) string {
	t.Helper()
	a, err := filepath.Abs(p)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// Dashboard is the part of a Grafana dashboard's JSON the tests read.
type Dashboard struct {
	UID        string `json:"uid"`
	Title      string `json:"title"`
	Templating struct {
		List []struct {
			Name string `json:"name"`
			Type string `json:"type"`
		} `json:"list"`
	} `json:"templating"`
	Panels []struct {
		ID      int    `json:"id"`
		Title   string `json:"title"`
		Targets []struct {
			Expr string `json:"expr"`
		} `json:"targets"`
	} `json:"panels"`
}

// The dashboards are Grafana JSON with unique uids, a query in every panel, and
// only variables they declare.
func TestDashboards(t *testing.T) {
	files, _ := filepath.Glob("monitoring/dashboards/*.json")
	if len(files) < 3 {
		t.Fatalf("dashboards %v: want mesh overview, workload and node agent", files)
	}
	uids := map[string]bool{}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var d Dashboard
		if err := json.Unmarshal(data, &d); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		if d.UID == "" || uids[d.UID] {
			t.Errorf("%s: uid %q empty or not unique", f, d.UID)
		}
		uids[d.UID] = true
		vars := map[string]bool{"__rate_interval": true, "datasource": true}
		for _, v := range d.Templating.List {
			vars[v.Name] = true
		}
		ids := map[int]bool{}
		for _, p := range d.Panels {
			if ids[p.ID] {
				t.Errorf("%s: panel id %d twice", f, p.ID)
			}
			ids[p.ID] = true
			if len(p.Targets) == 0 {
				t.Errorf("%s: panel %q has no query", f, p.Title)
			}
			for _, tg := range p.Targets {
				for _, m := range regexp.MustCompile(`\$\{?(\w+)`).FindAllStringSubmatch(tg.Expr, -1) {
					if !vars[m[1]] {
						t.Errorf("%s: panel %q uses $%s, which the dashboard does not declare", f, p.Title, m[1])
					}
				}
			}
		}
	}
}
