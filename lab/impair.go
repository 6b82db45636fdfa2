// This file impairs the fabric between nodes: random packet loss and partitions,
// with iptables rules in each node's namespace on its uplink to the fabric.
//
// The kernel this lab targets may lack sch_netem (and fq, which a tc BPF program
// setting departure times would need to delay packets), so there is no delay here:
// loss is iptables' statistic match, a partition is a DROP of everything the node
// sends to or receives from the fabric.

package lab

import (
	"errors"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
)

// impairChain is the iptables chain (filter table of a node's namespace) holding the
// node's impairment; INPUT, FORWARD and OUTPUT jump to it.
const impairChain = "FERRY-IMPAIR"

// uplink is a node's interface to the fabric (buildNode).
const uplink = "eth0"

// Impairment is what a node's uplink does to packets. The zero value is a healthy link.
type Impairment struct {
	// Loss is the share of packets the node sends to the fabric that are dropped,
	// each independently (0 to 1). Impair both nodes for loss both ways.
	Loss float64 `json:"loss,omitempty"`
	// Partition drops every packet between the node and the fabric, both ways.
	Partition bool `json:"partition,omitempty"`
}

// Validate says whether i can be applied.
func (i Impairment) Validate() error {
	if i.Loss < 0 || i.Loss >= 1 {
		return fmt.Errorf("impairment: loss %g: want 0 <= loss < 1", i.Loss)
	}
	return nil
}

// Impair replaces node's impairment with imp; the zero Impairment heals the node. The
// rules live in the node's namespace, so Down removes them with it.
func (l *Lab) Impair(node string, imp Impairment) error {
	if err := imp.Validate(); err != nil {
		return err
	}
	ns, err := l.nodeNetns(node)
	if err != nil {
		return err
	}
	ipt := func(args ...string) error {
		out, err := exec.Command("nsenter", append([]string{"--net=" + ns, "--", "iptables", "-w", "-t", "filter"}, args...)...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("impair %s: iptables %s: %w: %s", node, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
		}
		return nil
	}
	if imp == (Impairment{}) {
		// Heal: unhook and remove the chain; a node never impaired has none.
		for _, hook := range []string{"INPUT", "FORWARD", "OUTPUT"} {
			for ipt("-C", hook, "-j", impairChain) == nil {
				if err := ipt("-D", hook, "-j", impairChain); err != nil {
					return err
				}
			}
		}
		if ipt("-L", impairChain, "-n") != nil {
			return nil
		}
		return errors.Join(ipt("-F", impairChain), ipt("-X", impairChain))
	}
	if ipt("-L", impairChain, "-n") != nil {
		if err := ipt("-N", impairChain); err != nil {
			return err
		}
	}
	if err := ipt("-F", impairChain); err != nil {
		return err
	}
	if imp.Partition {
		if err := ipt("-A", impairChain, "-o", uplink, "-j", "DROP"); err != nil {
			return err
		}
		if err := ipt("-A", impairChain, "-i", uplink, "-j", "DROP"); err != nil {
			return err
		}
	}
	if imp.Loss > 0 {
		p := strconv.FormatFloat(imp.Loss, 'f', -1, 64)
		if err := ipt("-A", impairChain, "-o", uplink, "-m", "statistic", "--mode", "random", "--probability", p, "-j", "DROP"); err != nil {
			return err
		}
	}
	for _, hook := range []string{"INPUT", "FORWARD", "OUTPUT"} {
		if ipt("-C", hook, "-j", impairChain) != nil {
			if err := ipt("-I", hook, "1", "-j", impairChain); err != nil {
				return err
			}
		}
	}
	return nil
}

// Impaired counts the packets node's impairment dropped so far, from the chain's
// counters (0 when the node is not impaired).
func (l *Lab) Impaired(node string) (dropped uint64, err error) {
	ns, err := l.nodeNetns(node)
	if err != nil {
		return 0, err
	}
	out, err := exec.Command("nsenter", "--net="+ns, "--", "iptables", "-w", "-t", "filter", "-L", impairChain, "-n", "-v", "-x").Output()
	if err != nil {
		return 0, nil // no chain: nothing impaired
	}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) > 2 && f[2] == "DROP" {
			v, err := strconv.ParseUint(f[0], 10, 64)
			if err != nil {
				return 0, fmt.Errorf("impaired %s: counters %q: %w", node, line, err)
			}
			dropped += v
		}
	}
	return dropped, nil
}

// nodeNetns is the path of node's network namespace.
func (l *Lab) nodeNetns(node string) (string, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	n, err := l.node(node)
	if err != nil {
		return "", err
	}
	return n.Netns, nil
}
