package kubetest

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"syscall"
	"time"
)

// process is one server (etcd or kube-apiserver) run by a test.
type process struct {
	name    string
	logPath string
	cmd     *exec.Cmd
	exited  chan struct{} // closed once cmd.Wait has returned
	waitErr error         // written before exited is closed
}

// startProcess runs path with args, writing its output to logPath.
//
// The child gets SIGKILL when the test binary dies (a -timeout panic, ^C), so
// no etcd or API server outlives its test. Linux sends that "parent death"
// signal when the thread that forked the child exits, not the process, and Go
// ends threads that a goroutine leaves locked (network-namespace helpers do
// that on purpose). So the child is forked from a goroutine that holds its own
// thread locked until the child has exited: that thread never ends early.
func startProcess(name, logPath, path string, args ...string) (*process, error) {
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, fmt.Errorf("%s log: %w", name, err)
	}
	cmd := exec.Command(path, args...)
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	p := &process{name: name, logPath: logPath, cmd: cmd, exited: make(chan struct{})}
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		defer logFile.Close()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		p.waitErr = cmd.Wait()
		close(p.exited)
	}()
	if err := <-started; err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	return p, nil
}

// exitErr reports whether the process has exited, and how.
func (p *process) exitErr() (exited bool, err error) {
	select {
	case <-p.exited:
		if p.waitErr == nil {
			return true, fmt.Errorf("%s exited", p.name)
		}
		return true, fmt.Errorf("%s exited: %w", p.name, p.waitErr)
	default:
		return false, nil
	}
}

// stop asks the process to terminate and kills it if it has not within grace.
func (p *process) stop(grace time.Duration) error {
	if exited, _ := p.exitErr(); exited {
		return nil
	}
	pgid := -p.cmd.Process.Pid
	if err := syscall.Kill(pgid, syscall.SIGTERM); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("stop %s: %w", p.name, err)
	}
	select {
	case <-p.exited:
		return nil
	case <-time.After(grace):
	}
	if err := syscall.Kill(pgid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("kill %s: %w", p.name, err)
	}
	<-p.exited
	return fmt.Errorf("%s ignored SIGTERM for %v and was killed", p.name, grace)
}

// logTail returns the last n lines of the process's log.
func (p *process) logTail(n int) string {
	data, err := os.ReadFile(p.logPath)
	if err != nil {
		return fmt.Sprintf("(cannot read %s: %v)", p.logPath, err)
	}
	data = bytes.TrimRight(data, "\n")
	lines := strings.Split(string(data), "\n")
	skipped := 0
	if len(lines) > n {
		skipped = len(lines) - n
		lines = lines[skipped:]
	}
	head := fmt.Sprintf("--- %s log %s", p.name, p.logPath)
	if skipped > 0 {
		head += fmt.Sprintf(" (last %d lines of %d)", n, skipped+n)
	}
	return head + "\n" + strings.Join(lines, "\n")
}
