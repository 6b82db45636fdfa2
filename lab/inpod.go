// This file starts servers inside pods and waits until they listen, for the demo,
// the end-to-end tests and the deployment tests.

package lab

import (
	"context"
	"fmt"
	"net"
	"os/exec"
	"strconv"
	"time"
)

// PodProcess is a process StartInPod started in a pod.
type PodProcess struct {
	cmd  *exec.Cmd
	done chan struct{}
	err  error // set before done closes
}

// StartInPod starts cmd, prepared by Command for pod, and waits until something in
// the pod accepts TCP connections on port. It fails when ctx ends first or the process
// exits; the process is then killed. The process keeps running after ctx ends: Stop
// ends it.
func (l *Lab) StartInPod(ctx context.Context, pod string, port int, cmd *exec.Cmd) (*PodProcess, error) {
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s in %s: %w", cmd.Path, pod, err)
	}
	p := &PodProcess{cmd: cmd, done: make(chan struct{})}
	// Reaps the process whenever it exits; it lives as long as the process does.
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	if err := l.waitListening(ctx, pod, port, p.done); err != nil {
		p.Stop()
		if p.err != nil {
			err = fmt.Errorf("%w (the process exited: %v)", err, p.err)
		}
		return nil, fmt.Errorf("%v in %s: %w", cmd.Args, pod, err)
	}
	return p, nil
}

// Stop kills the process and waits until it has exited.
func (p *PodProcess) Stop() {
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.cmd.Process.Kill()
	<-p.done
}

// Done closes when the process has exited.
func (p *PodProcess) Done() <-chan struct{} { return p.done }

// waitListening probes port over the pod's loopback until a connection succeeds,
// ctx ends or exited closes. Loopback, because a probe to the pod IP would be captured
// as inbound traffic.
func (l *Lab) waitListening(ctx context.Context, pod string, port int, exited <-chan struct{}) error {
	ns, err := l.Netns(pod)
	if err != nil {
		return err
	}
	defer ns.Close()
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	var last error
	for {
		last = ns.Do(func() error {
			c, err := net.DialTimeout("tcp", addr, time.Second)
			if err == nil {
				c.Close()
			}
			return err
		})
		if last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("never listened on %d: %w (last: %v)", port, ctx.Err(), last)
		case <-exited:
			return fmt.Errorf("exited before it listened on %d", port)
		case <-time.After(20 * time.Millisecond):
		}
	}
}
