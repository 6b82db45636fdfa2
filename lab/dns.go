// This file runs the lab's DNS: a responder for the cluster zone on every node's pod
// gateway, and the resolv.conf every process started in a pod sees.

package lab

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/ferrymesh/ferry/agent/netns"
	"github.com/ferrymesh/ferry/lab/dns"
	"golang.org/x/sys/unix"
)

// DNSConfig says whether the lab answers DNS for its Services.
type DNSConfig struct {
	// Binary is a ferry CLI; the lab runs `ferry lab dns` from it, one process
	// answering on every node's pod gateway, port 53, for cluster.local, and gives
	// every process it starts in a pod a resolv.conf pointing there. Empty: no DNS,
	// and pods see the host's resolv.conf.
	Binary string `json:"binary,omitempty"`
}

// dnsInfo is the running DNS responder.
type dnsInfo struct {
	// Dir holds the responder's log and one resolv.conf per pod.
	Dir     string `json:"dir"`
	LogFile string `json:"logFile"`
	// Cgroup holds the responder, under the lab's cgroup root so that cleaning the
	// lab by its prefix kills it even when the description is lost.
	Cgroup string `json:"cgroup"`
	PID    int    `json:"pid,omitempty"`
	Start  uint64 `json:"start,omitempty"`
}

// DNSStatus is the lab's DNS responder in a Status.
type DNSStatus struct {
	PID   int    `json:"pid"`
	Alive bool   `json:"alive"`
	Log   string `json:"log"`
	// Domain is the zone it answers for.
	Domain string `json:"domain"`
}

// dnsReadyTimeout bounds the wait for the responder to answer on every node.
const dnsReadyTimeout = 10 * time.Second

func (l *Lab) planDNS() {
	d := &l.desc
	if d.Config.DNS.Binary == "" {
		return
	}
	dir := filepath.Join(d.Config.StateDir, "dns")
	d.DNS = &dnsInfo{Dir: dir, LogFile: filepath.Join(dir, "dns.log"), Cgroup: filepath.Join(d.CgroupRoot, "dns")}
}

// resolvConf is the path of the resolv.conf processes in pod p see.
func (i *dnsInfo) resolvConf(pod string) string { return filepath.Join(i.Dir, pod+".resolv.conf") }

// writeResolvConfs writes each pod's resolv.conf as kubelet writes a ClusterFirst
// pod's: the node's resolver, the search list of the pod's namespace, ndots:5.
func (l *Lab) writeResolvConfs() error {
	d := &l.desc
	if err := os.MkdirAll(d.DNS.Dir, 0o755); err != nil {
		return fmt.Errorf("dns folder: %w", err)
	}
	for _, p := range d.Pods {
		n, err := l.node(p.Node)
		if err != nil {
			return err
		}
		text := fmt.Sprintf("# ferry lab: pod %s/%s; the lab's DNS on %s answers for %s\nnameserver %s\nsearch %s\noptions ndots:5\n",
			p.Namespace, p.Name, n.Name, dns.DefaultDomain, n.Gateway, strings.Join(searchList(p.Namespace), " "))
		if err := os.WriteFile(d.DNS.resolvConf(p.Name), []byte(text), 0o644); err != nil {
			return fmt.Errorf("resolv.conf of %s: %w", p.Name, err)
		}
	}
	return nil
}

// searchList is the DNS search list of a pod in namespace ns.
func searchList(ns string) []string {
	return []string{ns + ".svc." + dns.DefaultDomain, "svc." + dns.DefaultDomain, dns.DefaultDomain}
}

// startDNS starts `ferry lab dns` in its own session and cgroup and waits until it
// answers on every node's gateway.
func (l *Lab) startDNS(ctx context.Context) error {
	d := &l.desc
	info := d.DNS
	if err := os.MkdirAll(info.Cgroup, 0o755); err != nil {
		return fmt.Errorf("start dns: cgroup: %w", err)
	}
	logf, err := os.OpenFile(info.LogFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("start dns: %w", err)
	}
	defer logf.Close()
	cg, err := unix.Open(info.Cgroup, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("start dns: open cgroup: %w", err)
	}
	defer unix.Close(cg)
	cmd := exec.Command(d.Config.DNS.Binary, "lab", "dns", "--state-dir", d.Config.StateDir)
	cmd.Dir = "/"
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, UseCgroupFD: true, CgroupFD: cg}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start dns: %w", err)
	}
	done := make(chan struct{})
	// Reaps the responder whenever it exits; it lives as long as the responder does.
	go func() {
		_ = cmd.Wait()
		close(done)
	}()
	info.PID = cmd.Process.Pid
	info.Start, _ = procStartTime(info.PID)
	if err := l.save(); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, dnsReadyTimeout)
	defer cancel()
	for _, n := range d.Nodes {
		if err := waitDNS(ctx, n, done, info.LogFile); err != nil {
			return fmt.Errorf("start dns: %w", err)
		}
	}
	l.log.Info("dns answering", "pid", info.PID, "zone", dns.DefaultDomain, "log", info.LogFile)
	return nil
}

// waitDNS probes the responder from inside node n until it answers.
func waitDNS(ctx context.Context, n nodeInfo, exited <-chan struct{}, logFile string) error {
	h, err := netns.Open(n.Netns)
	if err != nil {
		return err
	}
	defer h.Close()
	addr := netip.AddrPortFrom(n.Gateway, dns.Port)
	for {
		last := h.Do(func() error { return dns.Probe(addr, dns.DefaultDomain, 200*time.Millisecond) })
		if last == nil {
			return nil
		}
		select {
		case <-exited:
			return fmt.Errorf("the responder exited; end of %s:\n%s", logFile, tail(logFile, 20))
		case <-ctx.Done():
			return fmt.Errorf("no answer on %s in %s: %w (last: %v)", addr, n.Name, ctx.Err(), last)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// stopDNS ends a DNS responder left by this or another process.
func stopDNS(d *description, log interface{ Info(string, ...any) }) {
	if d.DNS == nil || d.DNS.PID == 0 || !pidAlive(d.DNS.PID, d.DNS.Start) {
		return
	}
	log.Info("stop dns", "pid", d.DNS.PID)
	endProcess(d.DNS.PID, d.DNS.Start)
}

// dnsStatusLocked is the responder's status, nil when the lab runs none; l.mu is held.
func (l *Lab) dnsStatusLocked() *DNSStatus {
	i := l.desc.DNS
	if i == nil {
		return nil
	}
	return &DNSStatus{PID: i.PID, Alive: i.PID != 0 && pidAlive(i.PID, i.Start), Log: i.LogFile, Domain: dns.DefaultDomain}
}

// Zone is the DNS zone of the lab's Services: what its responder answers.
func (l *Lab) Zone() (*dns.Zone, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	var svcs []dns.Service
	for _, sv := range l.desc.Config.Services {
		svcs = append(svcs, dns.Service{Name: sv.Name, Namespace: sv.Namespace, IPs: []netip.Addr{sv.ClusterIP}})
	}
	return dns.NewZone(dns.DefaultDomain, svcs)
}

// ServeDNS answers for the lab's zone on every node's pod gateway, port 53, until
// ctx ends: the body of `ferry lab dns`.
func (l *Lab) ServeDNS(ctx context.Context, log *slog.Logger) error {
	zone, err := l.Zone()
	if err != nil {
		return err
	}
	l.mu.Lock()
	var eps []dns.Endpoint
	for _, n := range l.desc.Nodes {
		eps = append(eps, dns.Endpoint{Netns: n.Netns, Addr: netip.AddrPortFrom(n.Gateway, dns.Port)})
	}
	l.mu.Unlock()
	srv, err := dns.New(dns.Config{Zone: zone, Endpoints: eps}, log)
	if err != nil {
		return err
	}
	if err := srv.Start(ctx); err != nil {
		return err
	}
	<-ctx.Done()
	srv.Stop()
	if errors.Is(ctx.Err(), context.Canceled) {
		return nil
	}
	return ctx.Err()
}

// bindResolv is the script that, in the private mount namespace unshare made, puts
// the pod's resolv.conf ($0) over /etc/resolv.conf and runs the command ("$@").
const bindResolv = `mount --bind "$0" /etc/resolv.conf && exec "$@"`

// podCommand is the command line that runs name in the pod's network namespace:
// nsenter, and with the lab's DNS, in a mount namespace of its own that sees the
// pod's resolv.conf (what `ip netns exec` does with /etc/netns/NAME, without its
// remount of /sys). Slave propagation: mounts the host makes later still show.
func (l *Lab) podCommand(ctx context.Context, p PodInfo, name string, args ...string) *exec.Cmd {
	l.mu.Lock()
	info := l.desc.DNS
	l.mu.Unlock()
	if info == nil {
		return exec.CommandContext(ctx, "nsenter", append([]string{"--net=" + p.Netns, "--", name}, args...)...)
	}
	return exec.CommandContext(ctx, "unshare", append([]string{"--mount", "--propagation", "slave", "--",
		"nsenter", "--net=" + p.Netns, "--", "sh", "-c", bindResolv, info.resolvConf(p.Name), name}, args...)...)
}
