// This file holds `ferry lab impair`: packet loss, delay and partitions on the fabric.

package main

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/ferrymesh/ferry/lab"
	"github.com/spf13/cobra"
)

func newLabImpairCommand(f *labFlags) *cobra.Command {
	var (
		loss      string
		partition bool
		delay     time.Duration
		queue     int
		hold      time.Duration
		clear     bool
	)
	cmd := &cobra.Command{
		Use:   "impair NODE...",
		Short: "Drop or delay packets between nodes and the fabric: random loss, delay or a partition",
		Long: `Impair each NODE's link to the fabric, with iptables rules (chain FERRY-IMPAIR) in
the node's network namespace on its uplink (eth0):

  --loss 5%     drop each packet the node sends to the fabric with that probability
                (iptables -m statistic --mode random); impair both nodes for loss both ways
  --delay 50ms  hold each packet the node receives from the fabric that long, in order
                (iptables -j NFQUEUE to a delay line this command runs); impair both
                nodes for a round trip 2×50ms longer; --delay-queue bounds the packets
                held (beyond it the kernel drops them, and the count is printed)
  --partition   drop every packet between the node and the fabric, both ways
  --clear       heal the node: remove its rules

Each call replaces the node's impairment. With --for the command holds the impairment
that long, then heals the nodes and returns (an interrupt heals them too); without it
the impairment stays until 'ferry lab impair NODE --clear' or 'ferry lab down' -- except
a delay, whose line runs in this command: with --delay and no --for the command holds
the impairment until interrupted, then heals the nodes.

Unlike netem there is no jitter, reordering, duplication or corruption, and the delay
is a FIFO line rather than a qdisc (the kernel this lab targets has no sch_netem, and
no fq for a tc BPF program to delay packets with). TCP sees the loss and delay as a
real link's: retransmissions, a longer round trip, and a partition longer than its
retries is a connection timeout.`,
		Example: `  sudo ferry lab impair node1 node2 --loss 5%
  sudo ferry lab impair node2 --partition --for 10s
  sudo ferry lab impair node1 node2 --delay 50ms --loss 5% --for 1m
  sudo ferry lab impair node1 node2 --clear`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var imp lab.Impairment
			if loss != "" {
				p, err := parsePercent(loss)
				if err != nil {
					return fmt.Errorf("--loss %q: %w", loss, err)
				}
				imp.Loss = p
			}
			imp.Partition = partition
			imp.Delay = delay
			imp.DelayQueue = queue
			switch {
			case clear && imp != (lab.Impairment{}):
				return errors.New("--clear heals: it takes no --loss, --delay or --partition")
			case !clear && imp == (lab.Impairment{}):
				return errors.New("say what to do: --loss, --delay, --partition or --clear")
			case clear && hold > 0:
				return errors.New("--for holds an impairment: it does not go with --clear")
			}
			if err := imp.Validate(); err != nil {
				return err
			}
			l, err := f.load()
			if err != nil {
				return err
			}
			defer l.Close()
			out := cmd.OutOrStdout()
			for _, node := range args {
				if err := l.Impair(node, imp); err != nil {
					return err
				}
			}
			if hold == 0 && imp.Delay == 0 {
				fmt.Fprintf(out, "%s: %s\n", strings.Join(args, ", "), impairText(imp))
				return nil
			}
			var timeout <-chan time.Time
			if hold > 0 {
				fmt.Fprintf(out, "%s: %s for %s\n", strings.Join(args, ", "), impairText(imp), hold)
				timeout = time.After(hold)
			} else {
				fmt.Fprintf(out, "%s: %s until interrupted\n", strings.Join(args, ", "), impairText(imp))
			}
			select {
			case <-timeout:
			case <-cmd.Context().Done():
			}
			var errs []error
			for _, node := range args {
				dropped, _ := l.Impaired(node)
				ds, delayed, err := l.Delayed(node)
				errs = append(errs, err, l.Impair(node, lab.Impairment{}))
				if delayed {
					fmt.Fprintf(out, "%s: healed; %d packets dropped, %d delayed, %d dropped by the full delay queue, %d not handed to the delay line\n", node, dropped, ds.Delayed, ds.QueueDropped, ds.UserDropped)
				} else {
					fmt.Fprintf(out, "%s: healed; %d packets dropped\n", node, dropped)
				}
			}
			return errors.Join(errs...)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&loss, "loss", "", "share of packets to drop from the node to the fabric: 5% or 0.05")
	fl.BoolVar(&partition, "partition", false, "drop every packet between the node and the fabric")
	fl.DurationVar(&delay, "delay", 0, "hold each packet from the fabric to the node this long (runs in the foreground)")
	fl.IntVar(&queue, "delay-queue", 0, fmt.Sprintf("packets the delay line holds at most; the kernel drops the rest (0: %d)", lab.DefaultDelayQueue))
	fl.DurationVar(&hold, "for", 0, "hold the impairment this long, then heal and return")
	fl.BoolVar(&clear, "clear", false, "heal the nodes")
	return cmd
}

// impairText says what an impairment does.
func impairText(imp lab.Impairment) string {
	var parts []string
	if imp.Partition {
		parts = append(parts, "partitioned from the fabric")
	}
	if imp.Loss > 0 {
		parts = append(parts, fmt.Sprintf("%g%% loss towards the fabric", imp.Loss*100))
	}
	if imp.Delay > 0 {
		parts = append(parts, fmt.Sprintf("%s delay towards the fabric", imp.Delay))
	}
	if len(parts) == 0 {
		return "healed"
	}
	return strings.Join(parts, ", ")
}

// parsePercent reads "5%" (a percentage) or "0.05" (a share).
func parsePercent(s string) (float64, error) {
	pct, isPct := strings.CutSuffix(s, "%")
	v, err := strconv.ParseFloat(pct, 64)
	if err != nil {
		return 0, errors.New("want a percentage (5%) or a share (0.05)")
	}
	if isPct {
		v /= 100
	}
	if v <= 0 || v >= 1 {
		return 0, errors.New("want more than 0% and less than 100%")
	}
	return v, nil
}
