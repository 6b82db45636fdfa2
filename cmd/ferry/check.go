// This file holds `ferry check`'s flags; the checks are in internal/preflight.

package main

import (
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/ferrymesh/ferry/agent/datapath"
	"github.com/ferrymesh/ferry/api/admin"
	"github.com/ferrymesh/ferry/internal/preflight"
	"github.com/ferrymesh/ferry/lab"
	"github.com/spf13/cobra"
)

func newCheckCommand() *cobra.Command {
	var (
		labPrefix string
		pinDir    string
		socket    string
		obsSocket string
		certWarn  string
		output    string
	)
	cmd := &cobra.Command{
		Use:   "check",
		Short: "Check that this node can run Ferry and that its agents are healthy",
		Long: `Check, and print as a pass/fail table:

  kernel        version ` + preflight.MinKernel + ` or newer
  bpf features  every program type, map type and helper Ferry uses, by probing the
                kernel, and that the verifier accepts Ferry's programs
  capabilities  CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_SYS_PTRACE (run it as the agent runs)
  cgroup v2     a cgroup2 hierarchy is mounted
  bpffs         the agent's pin folder is on a mounted bpffs
  programs      Ferry's programs are pinned and attached there
  agent         the agent answers on its admin socket, and its state is applied
  observer      the agent serves flows on its Observer socket
  certificates  every local workload has a certificate that is valid and not about to
                expire: --cert-warn is a share of its lifetime ("20%": fail with
                under a fifth left, when renewal at half life is overdue) or a
                duration ("1h": fail with less than that left)

With --lab PREFIX the agent checks run for every node of the lab. The command exits
with status 1 when any check fails, naming the failure.`,
		Example: `  sudo ferry check
  sudo ferry check --lab fy
  sudo ferry check --bpf-pin-dir /sys/fs/bpf/ferry --socket /run/ferry/agent.sock -o json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if output != "table" && output != "json" {
				return fmt.Errorf("unknown output %q: use table or json", output)
			}
			warn, err := parseCertWarn(certWarn)
			if err != nil {
				return err
			}
			var targets []preflight.Target
			if labPrefix != "" {
				l, err := lab.Load(labPrefix)
				if err != nil {
					return err
				}
				for _, n := range l.Status().Nodes {
					t := preflight.Target{Node: n.Name, AdminSocket: n.AgentSocket, ObserverSocket: filepath.Join(filepath.Dir(n.AgentSocket), "observer.sock"),
						PinDir: filepath.Join(lab.BPFRoot, labPrefix+"-"+n.Name)}
					if cmd.Flags().Changed("bpf-pin-dir") {
						t.PinDir = pinDir
					}
					targets = append(targets, t)
				}
			} else {
				if obsSocket == "" {
					obsSocket = filepath.Join(filepath.Dir(socket), "observer.sock")
				}
				targets = []preflight.Target{{AdminSocket: socket, ObserverSocket: obsSocket, PinDir: pinDir}}
			}
			ctx := cmd.Context()
			results := preflight.Host()
			for _, t := range targets {
				results = append(results, preflight.Agent(ctx, t, warn)...)
			}
			failed := preflight.Failed(results)
			out := cmd.OutOrStdout()
			if output == "json" {
				if err := printJSON(out, results); err != nil {
					return err
				}
			} else {
				preflight.WriteTable(out, results)
			}
			if len(failed) > 0 {
				return fmt.Errorf("%d of %d checks failed: %s", len(failed), len(results), strings.Join(failed, ", "))
			}
			if output == "table" {
				fmt.Fprintf(out, "\nall %d checks passed\n", len(results))
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&labPrefix, "lab", "", "check every agent of the lab with this prefix")
	f.StringVar(&pinDir, "bpf-pin-dir", datapath.DefaultPinDir, "the agent's BPF pin folder")
	f.StringVar(&socket, "socket", defaultAdminSocket, "the agent's admin socket")
	f.StringVar(&obsSocket, "observer-socket", "", "the agent's Observer socket (default: observer.sock beside --socket)")
	// The default is the rule connection records use (Conn.CertExpiring).
	f.StringVar(&certWarn, "cert-warn", strconv.FormatFloat(100*admin.CertExpiringShare, 'g', -1, 64)+"%", "fail certificates with less than this share of their lifetime (20%) or this long (1h) left")
	f.StringVarP(&output, "output", "o", "table", "table or json")
	return cmd
}

// parseCertWarn reads --cert-warn: a percentage of the lifetime or a duration.
func parseCertWarn(s string) (preflight.CertWarn, error) {
	if pct, ok := strings.CutSuffix(s, "%"); ok {
		f, err := strconv.ParseFloat(pct, 64)
		if err != nil || f <= 0 || f >= 100 {
			return preflight.CertWarn{}, fmt.Errorf("--cert-warn %q: want a percentage between 0 and 100, or a duration", s)
		}
		return preflight.CertWarn{Fraction: f / 100}, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil || d <= 0 {
		return preflight.CertWarn{}, fmt.Errorf("--cert-warn %q: want a percentage (20%%) or a positive duration (1h)", s)
	}
	return preflight.CertWarn{Left: d}, nil
}
