// Command ferry is Ferry's command-line tool: the lab, BPF inspection and, later,
// install, enrollment and flow observation.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:])
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "ferry:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string) error {
	root := &cobra.Command{
		Use:           "ferry",
		Short:         "Ferry service mesh command-line tool",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(newLabCommand())
	root.AddCommand(newBPFCommand())
	root.AddCommand(newBenchCommand())
	root.AddCommand(newObserveCommand())
	root.AddCommand(newAgentCommand())
	root.AddCommand(newExplainCommand())
	root.AddCommand(newCheckCommand())
	root.AddCommand(newUICommand())
	root.AddCommand(newInstallCommand())
	root.AddCommand(newUninstallCommand())
	root.AddCommand(newEnrollCommand())
	root.AddCommand(newAwaitCommand())
	root.AddCommand(newUnenrollCommand())
	root.SetArgs(args)
	return root.ExecuteContext(ctx)
}
