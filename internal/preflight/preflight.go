// Package preflight holds the checks of `ferry check`: can this node run Ferry
// (kernel, BPF features, capabilities, cgroup v2), and is Ferry running well on it
// (bpffs, pinned programs, the agent's admin and Observer APIs, certificates).
package preflight

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
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
	"github.com/ferrymesh/ferry/api/mesh"
	"github.com/ferrymesh/ferry/bpf"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// MinKernel is the oldest kernel with every hook and helper Ferry's programs use
// (sk_lookup with sk_assign, netns cookies in sockops).
const MinKernel = "5.15"

// Result is one check's outcome: one row of ferry check's table.
type Result struct {
	Name   string `json:"check"`
	OK     bool   `json:"ok"`
	Detail string `json:"detail"`
}

// Target is one agent to check: its node ("" on a single node), admin and
// Observer sockets, and BPF pin folder.
type Target struct {
	Node, AdminSocket, ObserverSocket, PinDir string
}

func pass(name, detail string) Result { return Result{Name: name, OK: true, Detail: detail} }
func fail(name, detail string) Result { return Result{Name: name, Detail: detail} }

// Failed names the checks of rs that failed.
func Failed(rs []Result) []string {
	var failed []string
	for _, r := range rs {
		if !r.OK {
			failed = append(failed, r.Name)
		}
	}
	return failed
}

// WriteTable prints rs as ferry check's pass/fail table.
func WriteTable(w io.Writer, rs []Result) {
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

// Host runs the node's own checks: kernel, BPF, capabilities, cgroup v2.
func Host() []Result {
	var rs []Result
	var uts unix.Utsname
	if err := unix.Uname(&uts); err != nil {
		rs = append(rs, fail("kernel", err.Error()))
	} else {
		rs = append(rs, kernelCheck(unix.ByteSliceToString(uts.Release[:])))
	}
	rs = append(rs, bpfCheck())
	if data, err := os.ReadFile("/proc/self/status"); err != nil {
		rs = append(rs, fail("capabilities", err.Error()))
	} else {
		rs = append(rs, capabilityCheck(string(data)))
	}
	if m, err := datapath.Cgroup2Mount(); err != nil {
		rs = append(rs, fail("cgroup v2", err.Error()))
	} else {
		rs = append(rs, pass("cgroup v2", "mounted at "+m))
	}
	return rs
}

func kernelCheck(release string) Result {
	if kernelAtLeast(release, MinKernel) {
		return pass("kernel", release)
	}
	return fail("kernel", fmt.Sprintf("%s is older than %s", release, MinKernel))
}

// bpfCheck probes every program type, map type and helper Ferry uses, then has the
// verifier load Ferry's programs.
func bpfCheck() Result {
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
	if len(missing) > 0 {
		return fail("bpf features", "missing: "+strings.Join(missing, "; "))
	}
	objs, err := bpf.Load(bpf.Config{AgentMark: mesh.DefaultMark, Ports: mesh.DefaultPorts(), MaxPods: 8}, "")
	if err != nil {
		return fail("bpf features", "the verifier refuses Ferry's programs: "+firstLine(err.Error()))
	}
	objs.Close()
	return pass("bpf features", "program, map and helper types present; the verifier accepts Ferry's programs")
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

// capabilityCheck reads the effective capabilities from status, the text of
// /proc/self/status.
func capabilityCheck(status string) Result {
	var eff uint64
	for _, line := range strings.Split(status, "\n") {
		if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
			var err error
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

// Agent checks one agent: its pins, admin API, Observer API and certificates, which
// must not be about to expire (warn).
func Agent(ctx context.Context, t Target, warn CertWarn) []Result {
	suffix := ""
	if t.Node != "" {
		suffix = " " + t.Node
	}
	var rs []Result
	if err := pinDirOnBPFFS(t.PinDir); err != nil {
		rs = append(rs, fail("bpffs"+suffix, err.Error()))
	} else {
		rs = append(rs, pass("bpffs"+suffix, t.PinDir+" is on bpffs"))
		progs, err := datapath.Programs(t.PinDir)
		switch {
		case err != nil:
			rs = append(rs, fail("programs"+suffix, firstLine(err.Error())))
		case len(progs) == 0:
			rs = append(rs, fail("programs"+suffix, "nothing attached from "+t.PinDir))
		default:
			var names []string
			for _, p := range progs {
				names = append(names, p.Name)
			}
			rs = append(rs, pass("programs"+suffix, fmt.Sprintf("%d links: %s", len(progs), strings.Join(uniq(names), ", "))))
		}
	}

	c := admin.NewClient(t.AdminSocket)
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	st, err := c.Status(cctx)
	if err != nil {
		rs = append(rs, fail("agent"+suffix, "not reachable: "+err.Error()))
		return rs
	}
	if st.StateVersion == 0 {
		rs = append(rs, fail("agent"+suffix, "answers, but has applied no state"))
	} else {
		rs = append(rs, pass("agent"+suffix, fmt.Sprintf("node %s, state version %d applied %s ago, %d pods enrolled", st.Node, st.StateVersion, st.StateAge, len(st.Pods))))
	}
	if len(st.Dropped) > 0 {
		rs = append(rs, fail("state entries"+suffix, fmt.Sprintf("%d left out, the rest applied: %s", len(st.Dropped), strings.Join(st.Dropped, "; "))))
	}

	if err := observerReachable(cctx, t.ObserverSocket); err != nil {
		rs = append(rs, fail("observer"+suffix, err.Error()))
	} else {
		rs = append(rs, pass("observer"+suffix, "flows served on "+t.ObserverSocket))
	}

	certs, err := c.Certs(cctx)
	if err != nil {
		return append(rs, fail("certificates"+suffix, err.Error()))
	}
	issued := map[string]time.Time{}
	for _, h := range st.Certificates {
		issued[h.Identity] = h.Issued
	}
	return append(rs, certCheck("certificates"+suffix, certs, issued, time.Now(), warn))
}

// CertWarn says when a certificate is about to expire: less than Left to live, or
// less than Fraction of its lifetime (from when the agent asked for it) left, by
// admin.CertExpiring, the rule the agent's connection records use with
// admin.CertExpiringShare (ferry check's default). A zero field checks nothing.
type CertWarn struct {
	Left     time.Duration
	Fraction float64
}

// expiring says why a certificate valid from issued to notAfter is about to expire
// at now, or "" when it is not.
func (w CertWarn) expiring(issued, notAfter, now time.Time) string {
	left := notAfter.Sub(now)
	if w.Left > 0 && left < w.Left {
		return fmt.Sprintf("expires in %s (%s), under %s", preciseText(left), timeText(notAfter), preciseText(w.Left))
	}
	if admin.CertExpiring(issued, notAfter, now, w.Fraction) {
		life := notAfter.Sub(issued)
		return fmt.Sprintf("expires in %s (%s): %.0f%% of its %s lifetime left, under %.0f%%; renewal is overdue",
			preciseText(left), timeText(notAfter), 100*float64(left)/float64(life), preciseText(life), 100*w.Fraction)
	}
	return ""
}

// preciseText prints a duration to the second, for short certificates.
func preciseText(d time.Duration) string {
	if d >= time.Hour {
		return durationText(d)
	}
	return d.Round(time.Second).String()
}

// certCheck passes when every certificate in certs is valid at now and not about
// to expire (warn; issued says when the agent asked for each workload certificate,
// as the CA backdates NotBefore), and there is a trust bundle.
func certCheck(name string, certs admin.Certs, issued map[string]time.Time, now time.Time, warn CertWarn) Result {
	var bad []string
	soonest := time.Time{}
	check := func(ci admin.CertInfo, from time.Time) {
		switch {
		case ci.Error != "":
			bad = append(bad, ci.Identity+": "+ci.Error)
		case now.Before(ci.NotBefore):
			bad = append(bad, ci.Identity+": not valid before "+timeText(ci.NotBefore))
		case !now.Before(ci.NotAfter):
			bad = append(bad, ci.Identity+": expired at "+timeText(ci.NotAfter)+" (certificate_expired: its connections are refused)")
		case warn.expiring(from, ci.NotAfter, now) != "":
			bad = append(bad, ci.Identity+": "+warn.expiring(from, ci.NotAfter, now))
		default:
			if soonest.IsZero() || ci.NotAfter.Before(soonest) {
				soonest = ci.NotAfter
			}
		}
	}
	for _, ci := range certs.Workloads {
		from, ok := issued[ci.Identity]
		if !ok {
			from = ci.NotBefore
		}
		check(ci, from)
	}
	for _, ci := range certs.TrustBundle {
		check(ci, ci.NotBefore)
	}
	switch {
	case len(bad) > 0:
		return fail(name, strings.Join(bad, "; "))
	case len(certs.TrustBundle) == 0:
		return fail(name, "no trust bundle")
	default:
		return pass(name, fmt.Sprintf("%d workload certificates and %d CAs valid; first expiry in %s",
			len(certs.Workloads), len(certs.TrustBundle), preciseText(soonest.Sub(now))))
	}
}

// timeText and durationText print times as ferry agent's tables do.
func timeText(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.UTC().Format(time.RFC3339)
}

func durationText(d time.Duration) string {
	if d >= 48*time.Hour {
		return fmt.Sprintf("%dd", int(d.Hours()/24))
	}
	return strings.TrimSuffix(d.Round(time.Minute).String(), "0s")
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
		return fmt.Errorf("observer API on %s: %w", socket, err)
	}
	defer conn.Close()
	if _, err := ferryv1.NewObserverClient(conn).ServerStatus(ctx, &ferryv1.ServerStatusRequest{}); err != nil {
		return fmt.Errorf("observer API on %s: %w", socket, err)
	}
	return nil
}
