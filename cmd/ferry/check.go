// This file holds `ferry check`: can this node run Ferry, and is Ferry running well
// on it? Kernel, BPF features, bpffs, cgroup v2, capabilities, agents, certificates.

package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
	"github.com/ferrymesh/ferry/agent/datapath"
	"github.com/ferrymesh/ferry/api/admin"
	"github.com/ferrymesh/ferry/api/ferryv1"
	"github.com/ferrymesh/ferry/bpf"
	"github.com/ferrymesh/ferry/lab"
	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// minKernel is the oldest kernel with every hook and helper Ferry's programs use
// (sk_lookup with sk_assign, netns cookies in sockops).
const minKernel = "5.15"

// checkResult is one row of ferry check's table.
type checkResult struct {
	Name   string `json:"check"`
	OK     bool   `json:"ok"`
	Detail string `json:"detail"`
}

// nodeTarget is one agent to check: its node, admin and observer sockets, pin folder.
type nodeTarget struct {
	node, admin, observer, pinDir string
}

func newCheckCommand() *cobra.Command {
	var (
		labPrefix string
		pinDir    string
		socket    string
		obsSocket string
		certWarn  time.Duration
		output    string
	)
	cmd := &cobra.Command{
		Use:   "check",
		Short: "Check that this node can run Ferry and that its agents are healthy",
		Long: `Check, and print as a pass/fail table:

  kernel        version ` + minKernel + ` or newer
  bpf features  every program type, map type and helper Ferry uses, by probing the
                kernel, and that the verifier accepts Ferry's programs
  capabilities  CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_SYS_PTRACE (run it as the agent runs)
  cgroup v2     a cgroup2 hierarchy is mounted
  bpffs         the agent's pin folder is on a mounted bpffs
  programs      Ferry's programs are pinned and attached there
  agent         the agent answers on its admin socket, and its state is applied
  observer      the agent serves flows on its Observer socket
  certificates  every local workload has a certificate valid for at least --cert-warn

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
			var targets []nodeTarget
			if labPrefix != "" {
				l, err := lab.Load(labPrefix)
				if err != nil {
					return err
				}
				for _, n := range l.Status().Nodes {
					t := nodeTarget{node: n.Name, admin: n.AgentSocket, observer: filepath.Join(filepath.Dir(n.AgentSocket), "observer.sock"),
						pinDir: filepath.Join(lab.BPFRoot, labPrefix+"-"+n.Name)}
					if cmd.Flags().Changed("bpf-pin-dir") {
						t.pinDir = pinDir
					}
					targets = append(targets, t)
				}
			} else {
				if obsSocket == "" {
					obsSocket = filepath.Join(filepath.Dir(socket), "observer.sock")
				}
				targets = []nodeTarget{{admin: socket, observer: obsSocket, pinDir: pinDir}}
			}
			ctx := cmd.Context()
			results := hostChecks()
			for _, t := range targets {
				results = append(results, agentChecks(ctx, t, certWarn)...)
			}
			var failed []string
			for _, r := range results {
				if !r.OK {
					failed = append(failed, r.Name)
				}
			}
			out := cmd.OutOrStdout()
			if output == "json" {
				if err := printJSON(out, results); err != nil {
					return err
				}
			} else {
				writeChecks(out, results)
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
	f.DurationVar(&certWarn, "cert-warn", time.Hour, "fail certificates that expire sooner than this")
	f.StringVarP(&output, "output", "o", "table", "table or json")
	return cmd
}

func writeChecks(w io.Writer, rs []checkResult) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "CHECK\tRESULT\tDETAIL")
	for _, r := range rs {
		res := "pass"
		if !r.OK {
			res = "FAIL"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\n", r.Name, res, r.Detail)
	}
	tw.Flush()
}

func pass(name, detail string) checkResult { return checkResult{Name: name, OK: true, Detail: detail} }
func fail(name, detail string) checkResult { return checkResult{Name: name, Detail: detail} }

// hostChecks are the node's own: kernel, BPF, capabilities, cgroup v2.
func hostChecks() []checkResult {
	var rs []checkResult
	var uts unix.Utsname
	if err := unix.Uname(&uts); err != nil {
		rs = append(rs, fail("kernel", err.Error()))
	} else {
		rel := unix.ByteSliceToString(uts.Release[:])
		if kernelAtLeast(rel, minKernel) {
			rs = append(rs, pass("kernel", rel))
		} else {
			rs = append(rs, fail("kernel", fmt.Sprintf("%s is older than %s", rel, minKernel)))
		}
	}

	var missing []string
	for _, p := range []struct {
		name  string
		probe func() error
	}{
		{"cgroup/connect4", func() error { return features.HaveProgramType(ebpf.CGroupSockAddr) }},
		{"sockops", func() error { return features.HaveProgramType(ebpf.SockOps) }},
		{"sk_msg", func() error { return features.HaveProgramType(ebpf.SkMsg) }},
		{"sk_lookup", func() error { return features.HaveProgramType(ebpf.SkLookup) }},
		{"sockhash", func() error { return features.HaveMapType(ebpf.SockHash) }},
		{"lru_hash", func() error { return features.HaveMapType(ebpf.LRUHash) }},
		{"percpu_array", func() error { return features.HaveMapType(ebpf.PerCPUArray) }},
		{"sk_assign", func() error { return features.HaveProgramHelper(ebpf.SkLookup, asm.FnSkAssign) }},
		{"netns cookie in sockops", func() error { return features.HaveProgramHelper(ebpf.SockOps, asm.FnGetNetnsCookie) }},
		{"msg_redirect_hash", func() error { return features.HaveProgramHelper(ebpf.SkMsg, asm.FnMsgRedirectHash) }},
	} {
		if err := p.probe(); err != nil {
			missing = append(missing, fmt.Sprintf("%s (%v)", p.name, err))
		}
	}
	switch {
	case len(missing) > 0:
		rs = append(rs, fail("bpf features", "missing: "+strings.Join(missing, "; ")))
	default:
		if objs, err := bpf.Load(bpf.Config{AgentMark: datapath.DefaultMark, MaxPods: 8}, ""); err != nil {
			rs = append(rs, fail("bpf features", "the verifier refuses Ferry's programs: "+firstLine(err.Error())))
		} else {
			objs.Close()
			rs = append(rs, pass("bpf features", "program, map and helper types present; the verifier accepts Ferry's programs"))
		}
	}

	rs = append(rs, capabilityCheck())

	if m, err := datapath.Cgroup2Mount(); err != nil {
		rs = append(rs, fail("cgroup v2", err.Error()))
	} else {
		rs = append(rs, pass("cgroup v2", "mounted at "+m))
	}
	return rs
}

// kernelAtLeast compares the major and minor numbers of "6.18.0-foo" with "5.15".
func kernelAtLeast(release, min string) bool {
	num := func(s string) (int, int) {
		var v [2]int
		for i, p := range strings.SplitN(s, ".", 3) {
			if i == 2 {
				break
			}
			digits := strings.TrimRightFunc(p, func(r rune) bool { return r < '0' || r > '9' })
			v[i], _ = strconv.Atoi(digits)
		}
		return v[0], v[1]
	}
	a0, a1 := num(release)
	b0, b1 := num(min)
	return a0 > b0 || a0 == b0 && a1 >= b1
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return line
}

// capabilityCheck reads this process's effective capabilities.
func capabilityCheck() checkResult {
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return fail("capabilities", err.Error())
	}
	var eff uint64
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
			eff, err = strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			if err != nil {
				return fail("capabilities", "CapEff: "+err.Error())
			}
		}
	}
	var missing []string
	for _, c := range []struct {
		name string
		bit  uint
	}{{"CAP_BPF", unix.CAP_BPF}, {"CAP_NET_ADMIN", unix.CAP_NET_ADMIN}, {"CAP_SYS_ADMIN", unix.CAP_SYS_ADMIN}, {"CAP_SYS_PTRACE", unix.CAP_SYS_PTRACE}} {
		if eff&(1<<c.bit) == 0 {
			missing = append(missing, c.name)
		}
	}
	if len(missing) > 0 {
		return fail("capabilities", "missing "+strings.Join(missing, ", ")+" (run as root, or as the agent runs)")
	}
	return pass("capabilities", "CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_SYS_PTRACE")
}

// agentChecks check one agent: its pins, admin API, Observer API and certificates.
func agentChecks(ctx context.Context, t nodeTarget, certWarn time.Duration) []checkResult {
	suffix := ""
	if t.node != "" {
		suffix = " " + t.node
	}
	var rs []checkResult
	if err := pinDirOnBPFFS(t.pinDir); err != nil {
		rs = append(rs, fail("bpffs"+suffix, err.Error()))
	} else {
		rs = append(rs, pass("bpffs"+suffix, t.pinDir+" is on bpffs"))
		progs, err := datapath.Programs(t.pinDir)
		switch {
		case err != nil:
			rs = append(rs, fail("programs"+suffix, firstLine(err.Error())))
		case len(progs) == 0:
			rs = append(rs, fail("programs"+suffix, "nothing attached from "+t.pinDir))
		default:
			var names []string
			for _, p := range progs {
				names = append(names, p.Name)
			}
			rs = append(rs, pass("programs"+suffix, fmt.Sprintf("%d links: %s", len(progs), strings.Join(uniq(names), ", "))))
		}
	}

	c := admin.NewClient(t.admin)
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	st, err := c.Status(cctx)
	if err != nil {
		rs = append(rs, fail("agent"+suffix, "not reachable: "+hint(err, t.admin).Error()))
		return rs
	}
	if st.StateVersion == 0 {
		rs = append(rs, fail("agent"+suffix, "answers, but has applied no state"))
	} else {
		rs = append(rs, pass("agent"+suffix, fmt.Sprintf("node %s, state version %d applied %s ago, %d pods enrolled", st.Node, st.StateVersion, st.StateAge, len(st.Pods))))
	}

	if err := observerReachable(cctx, t.observer); err != nil {
		rs = append(rs, fail("observer"+suffix, err.Error()))
	} else {
		rs = append(rs, pass("observer"+suffix, "flows served on "+t.observer))
	}

	certs, err := c.Certs(cctx)
	if err != nil {
		rs = append(rs, fail("certificates"+suffix, err.Error()))
		return rs
	}
	now := time.Now()
	var bad []string
	soonest := time.Time{}
	for _, ci := range append(append([]admin.CertInfo(nil), certs.Workloads...), certs.TrustBundle...) {
		switch {
		case ci.Error != "":
			bad = append(bad, ci.Identity+": "+ci.Error)
		case now.Before(ci.NotBefore):
			bad = append(bad, ci.Identity+": not valid before "+timeText(ci.NotBefore))
		case ci.NotAfter.Sub(now) < certWarn:
			bad = append(bad, ci.Identity+": expires "+timeText(ci.NotAfter))
		default:
			if soonest.IsZero() || ci.NotAfter.Before(soonest) {
				soonest = ci.NotAfter
			}
		}
	}
	switch {
	case len(bad) > 0:
		rs = append(rs, fail("certificates"+suffix, strings.Join(bad, "; ")))
	case len(certs.TrustBundle) == 0:
		rs = append(rs, fail("certificates"+suffix, "no trust bundle"))
	default:
		rs = append(rs, pass("certificates"+suffix, fmt.Sprintf("%d workload certificates and %d CAs valid; first expiry in %s",
			len(certs.Workloads), len(certs.TrustBundle), durationText(soonest.Sub(now)))))
	}
	return rs
}

func uniq(s []string) []string {
	seen := map[string]bool{}
	var out []string
	for _, x := range s {
		if !seen[x] {
			seen[x] = true
			out = append(out, x)
		}
	}
	return out
}

// pinDirOnBPFFS says why dir is not on a mounted bpffs, or nil.
func pinDirOnBPFFS(dir string) error {
	var fs unix.Statfs_t
	if err := unix.Statfs(dir, &fs); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("%s does not exist: no agent has pinned there (bpffs mounted at its parent?)", dir)
		}
		return fmt.Errorf("statfs %s: %w", dir, err)
	}
	if fs.Type != unix.BPF_FS_MAGIC {
		return fmt.Errorf("bpffs is not mounted at %s (filesystem type %#x): mount -t bpf bpf %s", dir, fs.Type, dir)
	}
	return nil
}

// observerReachable asks the Observer API on socket for its status.
func observerReachable(ctx context.Context, socket string) error {
	if _, err := os.Stat(socket); err != nil {
		return fmt.Errorf("no Observer socket: %w", err)
	}
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	if _, err := ferryv1.NewObserverClient(conn).ServerStatus(ctx, &ferryv1.ServerStatusRequest{}); err != nil {
		return fmt.Errorf("observer API on %s: %w", socket, err)
	}
	return nil
}
