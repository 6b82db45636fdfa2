package agent

import (
	"errors"
	"fmt"
	"os/exec"

	"github.com/ferrymesh/ferry/agent/datapath"
	"github.com/ferrymesh/ferry/agent/netns"
)

// CleanupIPTables removes Ferry's iptables capture chains from this node's pods in
// the state file: what an agent run with --capture=iptables leaves behind when it is
// killed (a clean stop removes them itself). Pods whose namespace is gone are skipped;
// without an iptables command nothing can have been installed.
func CleanupIPTables(statePath, node string) error {
	if _, err := exec.LookPath("iptables"); err != nil {
		return nil
	}
	st, err := ReadStateFile(statePath)
	if err != nil {
		return err
	}
	ws, err := workloads(st)
	if err != nil {
		return fmt.Errorf("state: %w", err)
	}
	var ipt datapath.IPTablesCapture
	var errs []error
	for _, w := range ws {
		if w.Node != node {
			continue
		}
		ns, err := netns.FindByIP(w.IPs[0])
		if err != nil {
			continue
		}
		if ipt.Installed(ns) {
			if err := ipt.Remove(ns); err != nil {
				errs = append(errs, fmt.Errorf("pod %s: %w", w.Name, err))
			}
		}
		ns.Close()
	}
	return errors.Join(errs...)
}
