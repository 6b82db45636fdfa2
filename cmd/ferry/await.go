// ferry await: wait in a pod until the mesh has it, then run the pod's command.

package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
)

// outboundListenerPort is the agent's in-pod outbound listener: it opens once the
// pod's capture is in place (agent.enroll), so its presence means "enrolled".
const outboundListenerPort = 15001

func newAwaitCommand() *cobra.Command {
	var (
		timeout time.Duration
		port    int
	)
	cmd := &cobra.Command{
		Use:   "await [flags] [-- COMMAND [ARGS...]]",
		Short: "Wait in a pod until Ferry has enrolled it, then run COMMAND",
		Long: `Await waits until the node agent has enrolled the pod it runs in (the agent's
outbound listener, port 15001, listens in the pod's network namespace; capture is in
place before it opens), then runs COMMAND in its place, like linkerd-await.

A pod's first connections can leave before the agent has seen the pod: the agent
enrolls pods as the API server reports their IPs, a fraction of a second after they
start. Long-running servers do not notice; a Job or a client that connects at once
would send its first connections outside the mesh. Start them through ferry await.

It reads /proc/net/tcp and /proc/net/tcp6, so it sends nothing. With no COMMAND it
exits 0 once enrolled. After --timeout it exits 1, saying so, without running COMMAND.`,
		Example: `  # a Job's container, in an image with the ferry binary
  args: [await, --timeout, 2m, --, /app/client, --to, web.shop:8080]

  # by hand in a lab pod
  sudo ferry lab exec a -- ferry await --timeout 10s`,
		RunE: func(cmd *cobra.Command, args []string) error {
			if port <= 0 || port > 65535 {
				return fmt.Errorf("--port %d: want 1-65535", port)
			}
			var path string
			if len(args) > 0 {
				var err error
				if path, err = exec.LookPath(args[0]); err != nil {
					return fmt.Errorf("command: %w", err)
				}
			}
			start := time.Now()
			deadline := start.Add(timeout)
			announced := false
			for {
				ok, err := listening(port)
				if err != nil {
					return err
				}
				if ok {
					break
				}
				if time.Now().After(deadline) {
					return fmt.Errorf("not enrolled after %v: nothing listens on port %d in this network namespace (is the namespace labelled ferry.io/mesh=enabled, and an agent running on this node?)", timeout, port)
				}
				if !announced {
					fmt.Fprintf(cmd.ErrOrStderr(), "ferry await: waiting up to %v for the mesh to enroll this pod\n", timeout)
					announced = true
				}
				time.Sleep(100 * time.Millisecond)
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "ferry await: enrolled after %v\n", time.Since(start).Round(time.Millisecond))
			if path == "" {
				return nil
			}
			return syscall.Exec(path, args, os.Environ())
		},
	}
	cmd.Flags().DurationVar(&timeout, "timeout", 2*time.Minute, "give up after this long")
	cmd.Flags().IntVar(&port, "port", outboundListenerPort, "the in-pod listener port that means enrolled")
	return cmd
}

// listening reports whether a TCP socket listens on port in this network
// namespace, from /proc/net/tcp and tcp6.
func listening(port int) (bool, error) {
	for _, name := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		f, err := os.Open(name)
		if errors.Is(err, os.ErrNotExist) {
			continue // no IPv6
		}
		if err != nil {
			return false, fmt.Errorf("await: %w", err)
		}
		ok, err := listensIn(f, port)
		f.Close()
		if err != nil {
			return false, fmt.Errorf("await: %s: %w", name, err)
		}
		if ok {
			return true, nil
		}
	}
	return false, nil
}

// listensIn reads a /proc/net/tcp table: "sl local_address rem_address st ...",
// addresses as HEXIP:HEXPORT, state 0A is LISTEN.
func listensIn(r io.Reader, port int) (bool, error) {
	sc := bufio.NewScanner(r)
	sc.Scan() // header
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 4 || f[3] != "0A" {
			continue
		}
		_, hexPort, ok := strings.Cut(f[1], ":")
		if !ok {
			continue
		}
		if p, err := strconv.ParseUint(hexPort, 16, 16); err == nil && int(p) == port {
			return true, nil
		}
	}
	return false, sc.Err()
}
