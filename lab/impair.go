// This file impairs the fabric between nodes: random packet loss, delay and
// partitions, with iptables rules in each node's namespace on its uplink to the fabric.
//
// The kernel this lab targets may lack sch_netem (and fq, which a tc BPF program
// setting departure times would need to delay packets): loss is iptables' statistic
// match, a partition is a DROP of everything the node sends to or receives from the
// fabric, and delay is an NFQUEUE rule feeding this process's delay line (delay.go).

package lab

import (
	"errors"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"time"
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
	// Delay holds every packet the node receives from the fabric this long before
	// it goes on, in order. Impair both nodes for a round trip 2×Delay longer. The delay line runs in the process that called
	// Impair, so the delay lasts until that process heals the node or closes the Lab
	// (or exits: then packets pass undelayed, see docs/lab.md).
	Delay time.Duration `json:"delay,omitempty"`
	// DelayQueue is how many packets the delay line holds at most (0:
	// DefaultDelayQueue); the kernel drops packets beyond it, counted in DelayStats.
	DelayQueue int `json:"delayQueue,omitempty"`
}

// Validate says whether i can be applied.
func (i Impairment) Validate() error {
	if i.Loss < 0 || i.Loss >= 1 {
		return fmt.Errorf("impairment: loss %g: want 0 <= loss < 1", i.Loss)
	}
	if i.Delay < 0 || i.Delay > 10*time.Second {
		return fmt.Errorf("impairment: delay %s: want 0 to 10s", i.Delay)
	}
	if i.DelayQueue < 0 || i.DelayQueue > 1<<20 || (i.DelayQueue > 0 && i.Delay == 0) {
		return fmt.Errorf("impairment: delay queue %d: want 0 to %d packets, with a delay", i.DelayQueue, 1<<20)
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
		// Heal: unhook and remove the chain (a node never impaired has none), then
		// release what the delay line holds, so that no packet is queued to it any more.
		for _, hook := range []string{"INPUT", "FORWARD", "OUTPUT"} {
			for ipt("-C", hook, "-j", impairChain) == nil {
				if err := ipt("-D", hook, "-j", impairChain); err != nil {
					return err
				}
			}
		}
		var err error
		if ipt("-L", impairChain, "-n") == nil {
			err = errors.Join(ipt("-F", impairChain), ipt("-X", impairChain))
		}
		return errors.Join(err, l.stopDelay(node))
	}
	if ipt("-L", impairChain, "-n") != nil {
		if err := ipt("-N", impairChain); err != nil {
			return err
		}
	}
	if err := ipt("-F", impairChain); err != nil {
		return err
	}
	if err := l.stopDelay(node); err != nil {
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
	if imp.Delay > 0 {
		if err := l.startDelay(node, ns, imp); err != nil {
			return err
		}
		// On the way in, not out: a packet the node's own sockets send (the agent's
		// tunnels) still counts against its socket's TCP small queues until it
		// leaves, so holding it 50 ms on egress holds the sender to a few packets per
		// 50 ms; one that came over the fabric belongs to no socket.
		// --queue-bypass: should the line be gone (its process killed), packets pass
		// undelayed rather than the node being cut off. A full queue still drops.
		if err := ipt("-A", impairChain, "-i", uplink, "-j", "NFQUEUE", "--queue-num", strconv.Itoa(delayQueueNum), "--queue-bypass"); err != nil {
			return errors.Join(err, l.stopDelay(node))
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

// startDelay starts node's delay line for imp, owned by l.
func (l *Lab) startDelay(node, ns string, imp Impairment) error {
	maxlen := imp.DelayQueue
	if maxlen == 0 {
		maxlen = DefaultDelayQueue
	}
	d, err := newDelayLine(ns, imp.Delay, maxlen)
	if err != nil {
		return fmt.Errorf("impair %s: delay line: %w", node, err)
	}
	d.start()
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.delays == nil {
		l.delays = map[string]*delayLine{}
	}
	l.delays[node] = d
	return nil
}

// stopDelay stops node's delay line, if l runs one, accepting every packet it holds.
func (l *Lab) stopDelay(node string) error {
	l.mu.Lock()
	d := l.delays[node]
	delete(l.delays, node)
	l.mu.Unlock()
	if d == nil {
		return nil
	}
	if err := d.close(); err != nil {
		return fmt.Errorf("impair %s: delay line: %w", node, err)
	}
	return nil
}

// healDelayed heals every node l runs a delay line for: without the line, their
// delay rule would pass packets undelayed and still look like an impairment.
func (l *Lab) healDelayed() error {
	l.mu.Lock()
	var nodes []string
	for n := range l.delays {
		nodes = append(nodes, n)
	}
	l.mu.Unlock()
	var errs []error
	for _, n := range nodes {
		errs = append(errs, l.Impair(n, Impairment{}))
	}
	return errors.Join(errs...)
}

// Delayed is what node's delay line (run by l) did so far; ok is false when l runs
// none for node.
func (l *Lab) Delayed(node string) (s DelayStats, ok bool, err error) {
	l.mu.Lock()
	d := l.delays[node]
	l.mu.Unlock()
	if d == nil {
		return DelayStats{}, false, nil
	}
	s, err = d.stats()
	return s, true, err
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
