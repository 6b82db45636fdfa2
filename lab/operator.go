// This file runs the lab's control plane: ferry-operator in local mode, fed with
// manifests the lab writes from its pods, or an operator the caller runs.

package lab

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/ferrymesh/ferry/internal/atomicfile"
	"golang.org/x/sys/unix"
)

// OperatorConfig says where the lab's agents get their state and certificates.
// Leave it zero for state files written by the lab.
type OperatorConfig struct {
	// Binary is a ferry-operator the lab runs in local mode on manifests it
	// writes from its pods (<StateDir>/manifests).
	Binary string `json:"binary,omitempty"`
	// Args are extra flags for that operator.
	Args []string `json:"args,omitempty"`
	// Addr, CAFile and TokenDir connect the agents to an operator the caller
	// runs (Binary empty): address, PEM bundle of its CA, and a folder holding one
	// token file per node, named after the node.
	Addr     string `json:"addr,omitempty"`
	CAFile   string `json:"caFile,omitempty"`
	TokenDir string `json:"tokenDir,omitempty"`
}

// operatorInfo is the running local-mode operator.
type operatorInfo struct {
	Dir          string `json:"dir"`
	ManifestDir  string `json:"manifestDir"`
	Socket       string `json:"socket"`
	HealthSocket string `json:"healthSocket"`
	LogFile      string `json:"logFile"`
	PID          int    `json:"pid,omitempty"`
	Start        uint64 `json:"start,omitempty"`
	// Unenrolled namespaces lose their ferry.io/mesh=enabled label.
	Unenrolled []string `json:"unenrolled,omitempty"`
}

// relaySocket is where the local-mode operator serves the flow relay.
func relaySocket(op *operatorInfo) string { return filepath.Join(op.Dir, "relay.sock") }

// observerSocket is where an agent serves its Observer API: beside its admin socket
// (the agent's default).
func observerSocket(adminSocket string) string {
	return filepath.Join(filepath.Dir(adminSocket), "observer.sock")
}

// RelaySocket is the unix socket of the operator's cluster-wide flow relay, or ""
// when the lab runs no operator.
func (l *Lab) RelaySocket() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.desc.Op == nil {
		return ""
	}
	return relaySocket(l.desc.Op)
}

// ObserverSocket is the unix socket of node's agent's Observer API.
func (l *Lab) ObserverSocket(node string) string { return observerSocket(l.AgentSocket(node)) }

// usesOperator says whether agents get their state from an operator.
func (c Config) usesOperator() bool { return c.Operator.Binary != "" || c.Operator.Addr != "" }

func (l *Lab) planOperator() {
	d := &l.desc
	cfg := &d.Config
	if cfg.Operator.Binary == "" {
		return
	}
	dir := filepath.Join(cfg.StateDir, "operator")
	d.Op = &operatorInfo{
		Dir:          dir,
		ManifestDir:  filepath.Join(cfg.StateDir, "manifests"),
		Socket:       filepath.Join(dir, "grpc.sock"),
		HealthSocket: filepath.Join(dir, "health.sock"),
		LogFile:      filepath.Join(dir, "operator.log"),
	}
	cfg.Operator.Addr = "unix://" + d.Op.Socket
	cfg.Operator.CAFile = filepath.Join(dir, "ca.crt")
	cfg.Operator.TokenDir = filepath.Join(dir, "tokens")
}

// operatorArgs are the agent flags that point it at the operator.
func (l *Lab) operatorArgs(n *nodeInfo) []string {
	op := l.desc.Config.Operator
	return []string{"--operator", op.Addr, "--operator-ca", op.CAFile, "--token-file", filepath.Join(op.TokenDir, n.Name),
		"--state-cache", filepath.Join(n.Dir, "state.cache")}
}

// ManifestDir is the folder the local-mode operator reads; "" when the lab runs none.
func (l *Lab) ManifestDir() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.desc.Op == nil {
		return ""
	}
	return l.desc.Op.ManifestDir
}

// OperatorLog is the local-mode operator's log file.
func (l *Lab) OperatorLog() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.desc.Op == nil {
		return ""
	}
	return l.desc.Op.LogFile
}

// writeManifests writes the lab's Nodes, Namespaces, ServiceAccounts and Pods as
// Kubernetes manifests: a namespace with an enrolled pod is labelled
// ferry.io/mesh=enabled, and a pod that is not enrolled opts out with
// ferry.io/mesh=disabled. One file per namespace, so an edit touches one file.
func (l *Lab) writeManifests() error {
	op := l.desc.Op
	if err := os.MkdirAll(op.ManifestDir, 0o755); err != nil {
		return fmt.Errorf("manifests: %w", err)
	}
	var nodes strings.Builder
	for _, n := range l.desc.Nodes {
		fmt.Fprintf(&nodes, "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: %s\n", n.Name)
	}
	files := map[string]string{"nodes.yaml": nodes.String()}
	byNS := map[string][]PodInfo{}
	for _, p := range l.desc.Pods {
		byNS[p.Namespace] = append(byNS[p.Namespace], p)
	}
	for ns, pods := range byNS {
		enrolled := slices.ContainsFunc(pods, func(p PodInfo) bool { return p.Enrolled }) && !slices.Contains(op.Unenrolled, ns)
		var b strings.Builder
		label := "{}"
		if enrolled {
			label = "{ferry.io/mesh: enabled}"
		}
		fmt.Fprintf(&b, "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: %s\n  labels: %s\n", ns, label)
		sas := map[string]bool{}
		for _, p := range pods {
			if !sas[p.ServiceAccount] {
				sas[p.ServiceAccount] = true
				fmt.Fprintf(&b, "---\napiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: %s\n  namespace: %s\n", p.ServiceAccount, ns)
			}
		}
		sort.Slice(pods, func(i, j int) bool { return pods[i].Name < pods[j].Name })
		for _, p := range pods {
			labels := "{app: " + p.Name
			for _, sv := range l.desc.Config.Services {
				if sv.Namespace == ns && slices.Contains(sv.Pods, p.Name) {
					labels += ", lab.ferry.io/" + sv.Name + ": backend"
				}
			}
			if !p.Enrolled {
				labels += ", ferry.io/mesh: disabled"
			}
			labels += "}"
			fmt.Fprintf(&b, `---
apiVersion: v1
kind: Pod
metadata:
  name: %s
  namespace: %s
  uid: %s
  labels: %s
spec:
  nodeName: %s
  serviceAccountName: %s
  containers: [{name: app, image: ferry-lab}]
status:
  phase: Running
  podIP: %s
`, p.Name, ns, p.UID, labels, p.Node, p.ServiceAccount, p.IP)
		}
		for _, sv := range l.desc.Config.Services {
			if sv.Namespace != ns {
				continue
			}
			appProtocol := ""
			if sv.AppProtocol != "" {
				appProtocol = ", appProtocol: " + sv.AppProtocol
			}
			// A selector no pod matches when the Service has none behind it.
			fmt.Fprintf(&b, `---
apiVersion: v1
kind: Service
metadata:
  name: %s
  namespace: %s
spec:
  clusterIP: %s
  selector: {lab.ferry.io/%s: backend}
  ports: [{port: %d, targetPort: %d%s}]
`, sv.Name, ns, sv.ClusterIP, sv.Name, sv.Port, sv.TargetPort, appProtocol)
		}
		files["ns-"+ns+".yaml"] = b.String()
	}
	for name, content := range files {
		p := filepath.Join(op.ManifestDir, name)
		if err := atomicfile.Write(p, []byte(content), 0o644); err != nil {
			return fmt.Errorf("manifests: %w", err)
		}
	}
	return nil
}

// SetNamespaceEnrolled adds or removes the ferry.io/mesh=enabled label of a
// namespace in the local-mode operator's manifests; the operator picks the change
// up and the agents follow.
func (l *Lab) SetNamespaceEnrolled(ns string, enrolled bool) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	op := l.desc.Op
	if op == nil {
		return errors.New("the lab runs no local-mode operator")
	}
	op.Unenrolled = slices.DeleteFunc(op.Unenrolled, func(s string) bool { return s == ns })
	if !enrolled {
		op.Unenrolled = append(op.Unenrolled, ns)
	}
	if err := l.writeManifests(); err != nil {
		return err
	}
	return l.save()
}

// StartOperator starts the local-mode operator in its own session and waits until
// it is ready. Its output goes to <StateDir>/operator/operator.log.
func (l *Lab) StartOperator(ctx context.Context) error {
	l.mu.Lock()
	op := l.desc.Op
	if op == nil {
		l.mu.Unlock()
		return errors.New("the lab runs no local-mode operator")
	}
	if op.PID != 0 && pidAlive(op.PID, op.Start) {
		l.mu.Unlock()
		return fmt.Errorf("start operator: already running as pid %d", op.PID)
	}
	cfg := l.desc.Config
	if err := os.MkdirAll(op.Dir, 0o700); err != nil {
		l.mu.Unlock()
		return fmt.Errorf("start operator: %w", err)
	}
	logf, err := os.OpenFile(op.LogFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		l.mu.Unlock()
		return fmt.Errorf("start operator: %w", err)
	}
	fmt.Fprintf(logf, "--- ferry lab: starting operator at %s\n", time.Now().Format(time.RFC3339))
	args := []string{
		"--local", op.ManifestDir,
		"--state-dir", op.Dir,
		"--grpc-addr", "unix://" + op.Socket,
		"--health-addr", "unix://" + op.HealthSocket,
		"--metrics-addr", "",
		"--trust-domain", cfg.TrustDomain,
		// The cluster-wide flow relay, reading every node's agent.
		"--relay-addr", "unix://" + relaySocket(op),
	}
	for _, n := range l.desc.Nodes {
		args = append(args, "--relay-agent", "unix://"+observerSocket(n.Socket))
	}
	cmd := exec.Command(cfg.Operator.Binary, append(args, cfg.Operator.Args...)...)
	cmd.Dir = "/"
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	err = cmd.Start()
	logf.Close()
	if err != nil {
		l.mu.Unlock()
		return fmt.Errorf("start operator: %w", err)
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(done)
	}()
	op.PID = cmd.Process.Pid
	op.Start, _ = procStartTime(op.PID)
	l.opDone = done
	err = l.save()
	health, logFile := op.HealthSocket, op.LogFile
	l.log.Info("operator started", "pid", op.PID, "log", op.LogFile)
	l.mu.Unlock()
	if err != nil {
		return err
	}
	return waitOperatorReady(ctx, health, logFile, done)
}

// StopOperator sends sig to the local-mode operator and waits up to 10 seconds
// for it to exit.
func (l *Lab) StopOperator(sig syscall.Signal) error {
	l.mu.Lock()
	op := l.desc.Op
	if op == nil || op.PID == 0 || !pidAlive(op.PID, op.Start) {
		l.mu.Unlock()
		return errors.New("stop operator: not running")
	}
	pid, done := op.PID, l.opDone
	l.mu.Unlock()
	if err := unix.Kill(pid, sig); err != nil {
		return fmt.Errorf("stop operator: %w", err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if done != nil {
			select {
			case <-done:
				return nil
			case <-time.After(20 * time.Millisecond):
			}
		} else {
			if !pidAlive(pid, 0) {
				return nil
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return fmt.Errorf("stop operator: pid %d still runs 10s after %v", pid, sig)
}

// waitOperatorReady polls the operator's /readyz until it answers 200.
func waitOperatorReady(ctx context.Context, sock, logFile string, done <-chan struct{}) error {
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
	}}
	defer client.CloseIdleConnections()
	for {
		select {
		case <-done:
			return fmt.Errorf("operator exited; end of %s:\n%s", logFile, tail(logFile, 20))
		default:
		}
		resp, err := client.Get("http://operator/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for operator: %w; end of %s:\n%s", ctx.Err(), logFile, tail(logFile, 20))
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// stopOperator ends a local-mode operator left by this or another process.
func stopOperator(d *description, log interface{ Info(string, ...any) }) {
	if d.Op == nil || d.Op.PID == 0 || !pidAlive(d.Op.PID, d.Op.Start) {
		return
	}
	log.Info("stop operator", "pid", d.Op.PID)
	_ = unix.Kill(d.Op.PID, unix.SIGTERM)
	deadline := time.Now().Add(5 * time.Second)
	for pidAlive(d.Op.PID, d.Op.Start) && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if pidAlive(d.Op.PID, d.Op.Start) {
		_ = unix.Kill(d.Op.PID, unix.SIGKILL)
	}
}
