// iptables capture: the classic sidecar-mesh way of capturing a pod's traffic
// (nat REDIRECT in the pod's network namespace, original destination from
// SO_ORIGINAL_DST), kept as an alternative to the eBPF capture so the benchmark
// harness can show what eBPF buys. Selected with ferry-agent --capture=iptables.

package datapath

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"strconv"
	"strings"
	"syscall"

	"github.com/ferrymesh/ferry/agent/netns"
	"github.com/ferrymesh/ferry/api/mesh"
	"golang.org/x/sys/unix"
)

// Chains Ferry owns in each captured pod's nat table; everything Ferry adds lives in
// them, behind one jump from OUTPUT and PREROUTING, so removal cannot touch rules
// that others wrote.
const (
	iptOutChain = "FERRY_OUTPUT"
	iptInChain  = "FERRY_PREROUTING"
)

// IPTablesCapture installs and removes REDIRECT rules inside pod network namespaces.
type IPTablesCapture struct {
	// Bin is the iptables command; "" means "iptables" from $PATH.
	Bin string
	// Mark is the agent's socket mark, whose connections are never redirected.
	Mark uint32
	// Ports are the proxy's: outbound and inbound capture redirect to their
	// listeners, and no mesh port is ever redirected.
	Ports mesh.Ports
}

// rules is the nat table content of Ferry's two chains, in order.
func (c IPTablesCapture) rules() (out, in [][]string) {
	var skip []string
	for _, p := range c.Ports.List() {
		skip = append(skip, strconv.Itoa(int(p)))
	}
	mark := fmt.Sprintf("0x%x", c.Mark)
	out = [][]string{
		{"-m", "mark", "--mark", mark, "-j", "RETURN"}, // the agent's own hops
		{"-d", "127.0.0.0/8", "-j", "RETURN"},          // loopback stays in the pod
		{"-p", "tcp", "-m", "multiport", "--dports", strings.Join(skip, ","), "-j", "RETURN"},
		{"-p", "tcp", "-j", "REDIRECT", "--to-ports", strconv.Itoa(int(c.Ports.Outbound))},
	}
	in = [][]string{
		{"-p", "tcp", "-m", "multiport", "--dports", strings.Join(skip, ","), "-j", "RETURN"},
		{"-p", "tcp", "-j", "REDIRECT", "--to-ports", strconv.Itoa(int(c.Ports.Inbound))},
	}
	return out, in
}

// Install (re)writes Ferry's rules in the namespace h: outbound TCP goes to the
// outbound port, inbound TCP to the inbound port. Installing again replaces the
// rules, so it is safe after an agent restart.
func (c IPTablesCapture) Install(h *netns.Handle) error {
	out, in := c.rules()
	for _, ch := range []struct {
		name, hook string
		rules      [][]string
	}{{iptOutChain, "OUTPUT", out}, {iptInChain, "PREROUTING", in}} {
		if _, err := c.run(h, "-t", "nat", "-N", ch.name); err != nil && !strings.Contains(err.Error(), "exists") {
			return err
		}
		if _, err := c.run(h, "-t", "nat", "-F", ch.name); err != nil {
			return err
		}
		for _, r := range ch.rules {
			if _, err := c.run(h, append([]string{"-t", "nat", "-A", ch.name}, r...)...); err != nil {
				return err
			}
		}
		jump := []string{"-p", "tcp", "-j", ch.name}
		if _, err := c.run(h, append([]string{"-t", "nat", "-C", ch.hook}, jump...)...); err != nil {
			if _, err := c.run(h, append([]string{"-t", "nat", "-I", ch.hook, "1"}, jump...)...); err != nil {
				return err
			}
		}
	}
	return nil
}

// Remove deletes Ferry's rules and chains from the namespace h; rules that are not
// there are not an error.
func (c IPTablesCapture) Remove(h *netns.Handle) error {
	var errs []error
	for _, ch := range []struct{ name, hook string }{{iptOutChain, "OUTPUT"}, {iptInChain, "PREROUTING"}} {
		jump := []string{"-p", "tcp", "-j", ch.name}
		for {
			if _, err := c.run(h, append([]string{"-t", "nat", "-D", ch.hook}, jump...)...); err != nil {
				break // no (more) jump
			}
		}
		if _, err := c.run(h, "-t", "nat", "-F", ch.name); err != nil {
			if isNoChain(err) {
				continue
			}
			errs = append(errs, err)
			continue
		}
		if _, err := c.run(h, "-t", "nat", "-X", ch.name); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Installed reports whether Ferry's outbound chain exists in h.
func (c IPTablesCapture) Installed(h *netns.Handle) bool {
	_, err := c.run(h, "-t", "nat", "-S", iptOutChain)
	return err == nil
}

func isNoChain(err error) bool {
	s := err.Error()
	return strings.Contains(s, "No chain") || strings.Contains(s, "does not exist")
}

// run runs iptables inside h. nsenter, not setns on a Go thread: iptables is a
// separate program, and nsenter makes the namespace it runs in explicit.
func (c IPTablesCapture) run(h *netns.Handle, args ...string) (string, error) {
	bin := c.Bin
	if bin == "" {
		bin = "iptables"
	}
	cmd := exec.Command("nsenter", append([]string{"--net=" + h.Path(), "--", bin, "-w"}, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("iptables %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return string(out), nil
}

// SocketOrigDst returns the destination a connection had before a nat REDIRECT
// (getsockopt SO_ORIGINAL_DST on the accepted socket; IPv4 only).
func SocketOrigDst(c syscall.Conn) (netip.AddrPort, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("original destination: %w", err)
	}
	var (
		mreq *unix.IPv6Mreq
		serr error
	)
	// The kernel writes a struct sockaddr_in; IPv6Mreq is the x/sys getter whose
	// buffer (20 bytes) holds one, the usual way to read SO_ORIGINAL_DST from Go.
	cerr := raw.Control(func(fd uintptr) {
		mreq, serr = unix.GetsockoptIPv6Mreq(int(fd), unix.SOL_IP, unix.SO_ORIGINAL_DST)
	})
	if err := errors.Join(cerr, serr); err != nil {
		return netip.AddrPort{}, fmt.Errorf("original destination: %w", err)
	}
	b := mreq.Multiaddr
	if fam := binary.NativeEndian.Uint16(b[0:2]); fam != unix.AF_INET {
		return netip.AddrPort{}, fmt.Errorf("original destination: address family %d", fam)
	}
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[4:8])), binary.BigEndian.Uint16(b[2:4])), nil
}
