package node

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/internal/promtest"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"
)

// Debian's Prometheus (2.42) is built without Kubernetes discovery, so the test
// stands in for it: promConfig turns each kubernetes_sd_configs of the shipped
// deploy/monitoring/prometheus.yaml into a file_sd_configs whose targets
// podTargets writes from the real API server's pods, with the __meta_kubernetes_*
// labels Prometheus's role "pod" gives them. The shipped relabelling, which picks
// the agents and the operator's metrics port, runs as written.

// promConfig is deploy/monitoring/prometheus.yaml as it runs here, in dir: pod
// discovery from files dir/JOB.json listing the pods of the namespaces it names
// (returned by job), a scrape every second instead of every 15, and its rules
// file found from wherever Prometheus runs.
func promConfig(t *testing.T, dir string) (config string, namespaces map[string][]string) {
	t.Helper()
	data, err := os.ReadFile("../../deploy/monitoring/prometheus.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var cfg map[string]any
	if err := yaml.Unmarshal(data, &cfg); err != nil {
		t.Fatalf("deploy/monitoring/prometheus.yaml: %v", err)
	}
	cfg["global"] = map[string]any{"scrape_interval": "1s", "evaluation_interval": "1s"}
	var rules []any
	for _, r := range cfg["rule_files"].([]any) {
		abs, err := filepath.Abs(filepath.Join("../../deploy/monitoring", r.(string)))
		if err != nil {
			t.Fatal(err)
		}
		rules = append(rules, abs)
	}
	cfg["rule_files"] = rules
	namespaces = map[string][]string{}
	for _, sc := range cfg["scrape_configs"].([]any) {
		job := sc.(map[string]any)
		name := job["job_name"].(string)
		for _, sd := range job["kubernetes_sd_configs"].([]any) {
			sd := sd.(map[string]any)
			if sd["role"] != "pod" {
				t.Fatalf("job %s: discovery role %v; the test stands in for role pod only", name, sd["role"])
			}
			for _, ns := range sd["namespaces"].(map[string]any)["names"].([]any) {
				namespaces[name] = append(namespaces[name], ns.(string))
			}
		}
		delete(job, "kubernetes_sd_configs")
		job["file_sd_configs"] = []any{map[string]any{"files": []any{filepath.Join(dir, name+".json")}, "refresh_interval": "1s"}}
	}
	out, err := yaml.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return string(out), namespaces
}

// targetGroup is one entry of a file_sd file.
type targetGroup struct {
	Targets []string          `json:"targets"`
	Labels  map[string]string `json:"labels"`
}

var invalidLabelChars = regexp.MustCompile(`[^a-zA-Z0-9_]`)

// podTargets are the targets Prometheus's Kubernetes discovery (role pod) makes
// of pods: one per container port, or one per container without ports, at the
// pod's IP, with the pod's metadata as __meta_kubernetes_pod_* labels.
func podTargets(pods []corev1.Pod) []targetGroup {
	var groups []targetGroup
	for _, p := range pods {
		if p.Status.PodIP == "" {
			continue
		}
		common := map[string]string{
			"__meta_kubernetes_namespace":           p.Namespace,
			"__meta_kubernetes_pod_name":            p.Name,
			"__meta_kubernetes_pod_ip":              p.Status.PodIP,
			"__meta_kubernetes_pod_node_name":       p.Spec.NodeName,
			"__meta_kubernetes_pod_host_ip":         p.Status.HostIP,
			"__meta_kubernetes_pod_phase":           string(p.Status.Phase),
			"__meta_kubernetes_pod_ready":           "false",
			"__meta_kubernetes_pod_uid":             string(p.UID),
			"__meta_kubernetes_pod_service_account": p.Spec.ServiceAccountName,
		}
		for _, c := range p.Status.Conditions {
			if c.Type == corev1.PodReady {
				common["__meta_kubernetes_pod_ready"] = strings.ToLower(string(c.Status))
			}
		}
		for k, v := range p.Labels {
			name := invalidLabelChars.ReplaceAllString(k, "_")
			common["__meta_kubernetes_pod_label_"+name] = v
			common["__meta_kubernetes_pod_labelpresent_"+name] = "true"
		}
		for _, c := range p.Spec.Containers {
			labels := func(extra map[string]string) map[string]string {
				l := map[string]string{"__meta_kubernetes_pod_container_name": c.Name, "__meta_kubernetes_pod_container_image": c.Image}
				for k, v := range common {
					l[k] = v
				}
				for k, v := range extra {
					l[k] = v
				}
				return l
			}
			if len(c.Ports) == 0 {
				groups = append(groups, targetGroup{Targets: []string{p.Status.PodIP}, Labels: labels(nil)})
				continue
			}
			for _, port := range c.Ports {
				num := strconv.Itoa(int(port.ContainerPort))
				groups = append(groups, targetGroup{Targets: []string{net.JoinHostPort(p.Status.PodIP, num)}, Labels: labels(map[string]string{
					"__meta_kubernetes_pod_container_port_name":     port.Name,
					"__meta_kubernetes_pod_container_port_number":   num,
					"__meta_kubernetes_pod_container_port_protocol": string(port.Protocol),
				})})
			}
		}
	}
	return groups
}

// checkPrometheus runs the real Prometheus with the configuration users are given
// on the first node, after ns's traffic: from the pods the API server lists it
// keeps and scrapes every agent and both operator replicas, the agents' TCP
// metrics hold ns's mTLS connection, and the shipped rules load and evaluate.
func (k *cluster) checkPrometheus(t *testing.T, ns string) {
	t.Helper()
	start := time.Now()
	dir := t.TempDir()
	config, namespaces := promConfig(t, dir)
	for job, names := range namespaces {
		var pods []corev1.Pod
		for _, n := range names {
			list, err := k.client.CoreV1().Pods(n).List(t.Context(), metav1.ListOptions{})
			if err != nil {
				t.Fatal(err)
			}
			pods = append(pods, list.Items...)
		}
		data, err := json.Marshal(podTargets(pods))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, job+".json"), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	prom := promtest.Start(t, k.nodes[0].NetnsPath, dir, config)
	var names []string
	for _, n := range k.nodes {
		names = append(names, n.Name)
	}
	promtest.WaitFor(t, time.Minute, fmt.Sprintf("Prometheus scrapes the agents on %v", names), func() (bool, string) {
		n, data, err := prom.Query(`up{job="ferry-agent"} == 1`)
		ok := err == nil && n == len(names)
		for _, name := range names {
			ok = ok && strings.Contains(data, `"node":"`+name+`"`)
		}
		return ok, fmt.Sprintf("%d series %v %s", n, err, data)
	})
	promtest.WaitFor(t, time.Minute, "Prometheus scrapes both operator replicas on their metrics port", func() (bool, string) {
		n, data, err := prom.Query(`up{job="ferry-operator"} == 1`)
		return err == nil && n == 2, fmt.Sprintf("%d series %v %s", n, err, data)
	})
	// Workloads by their controllers' names, as Istio's: the Job and the Deployment.
	conns := fmt.Sprintf(`istio_tcp_connections_opened_total{reporter="source", source_workload="to-service", destination_workload_namespace=%q, destination_workload="web", connection_security_policy="mutual_tls"} > 0`, ns)
	promtest.WaitFor(t, time.Minute, "the agents' metrics count the mTLS connection from Job to-service to Deployment web", func() (bool, string) {
		n, data, err := prom.Query(conns)
		return err == nil && n > 0, fmt.Sprintf("%s: %d series %v %s", conns, n, err, data)
	})
	promtest.WaitFor(t, time.Minute, "the shipped rules load and evaluate", func() (bool, string) {
		rules, err := prom.Rules()
		bad := slices.DeleteFunc(slices.Clone(rules), func(r promtest.Rule) bool { return r.Health == "ok" })
		return err == nil && len(rules) >= 10 && len(bad) == 0, fmt.Sprintf("%d rules, not ok: %+v %v", len(rules), bad, err)
	})
	t.Logf("Prometheus with deploy/monitoring/prometheus.yaml: agents, operator and the mTLS connection's metrics in %v", time.Since(start).Round(100*time.Millisecond))
}
