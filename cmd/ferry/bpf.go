package main

import (
	"fmt"

	"github.com/ferrymesh/ferry/agent/datapath"
	"github.com/spf13/cobra"
)

// newBPFCommand returns `ferry bpf`, which reads Ferry's pinned eBPF state.
func newBPFCommand() *cobra.Command {
	var pinDir string
	cmd := &cobra.Command{
		Use:   "bpf",
		Short: "Inspect Ferry's eBPF programs and maps on this node",
		Long: `Inspect the eBPF state the Ferry agent pinned on this node.

Everything is read from the pins under the pin folder (default /sys/fs/bpf/ferry), so
it works while the agent runs, while it restarts, or after it crashed; reading needs
root (or CAP_BPF and access to bpffs). Like bpftool, but it knows Ferry's types: netns
cookies are shown with their pod, addresses and ports as text.`,
	}
	cmd.PersistentFlags().StringVar(&pinDir, "pin-dir", datapath.DefaultPinDir, "bpffs folder holding Ferry's pins")

	progs := &cobra.Command{
		Use:   "progs",
		Short: "List Ferry's programs and where they are attached",
		Long: `List Ferry's attached programs, one per pinned link: name, program type, program
and link ids, and the attach point: a cgroup path (connect4, connect6, sockops), a pod
network namespace with its netns cookie and pod name (sk_lookup), or the local_socks
sockhash (sk_msg, only with the fast path on).`,
		Example: `  ferry bpf progs
  ferry bpf progs --pin-dir /sys/fs/bpf/ferry-node1`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			list, err := datapath.Programs(pinDir)
			if err != nil {
				return err
			}
			return datapath.WriteProgramsTable(cmd.OutOrStdout(), list)
		},
	}

	var output string
	maps := &cobra.Command{
		Use:   "maps",
		Short: "Show Ferry's maps and their contents",
		Long: `Show each of Ferry's pinned maps (name, type, id, entries/max) and its contents in
readable form:

  enrolled_netns     netns cookie -> pod ("namespace/name")
  orig_dst           (netns cookie, client port) -> original destination, with the pod
  sock_orig_dst      socket cookie -> original destination, before established
  local_socks        fast-path sockets: netns cookie, local and remote address
  inbound_listeners  pod IP -> the pod's 15006 listener (socket cookie)
  excluded_ports     destination ports never captured`,
		Example: `  ferry bpf maps
  ferry bpf maps -o json | jq '.orig_dst'`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if output != "table" && output != "json" {
				return fmt.Errorf("unknown output format %q: use table or json", output)
			}
			dump, err := datapath.DumpMaps(pinDir)
			if err != nil {
				return err
			}
			if output == "json" {
				return dump.WriteJSON(cmd.OutOrStdout())
			}
			return dump.WriteTable(cmd.OutOrStdout())
		},
	}
	maps.Flags().StringVarP(&output, "output", "o", "table", "output format: table or json")

	cmd.AddCommand(progs, maps)
	return cmd
}
