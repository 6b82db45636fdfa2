// Process accounting (CPU time and peak RSS from /proc) and CPU placement.

package bench

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// clockTicks is USER_HZ, the unit of utime and stime in /proc/PID/stat; 100 on
// every Linux architecture Go supports.
const clockTicks = 100

// cpuSeconds is the user plus system CPU time pid has used, including reaped
// children (haproxy runs as a single process here, the agent too).
func cpuSeconds(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, fmt.Errorf("cpu time of %d: %w", pid, err)
	}
	// The command name may hold spaces and parentheses: fields start after the last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("cpu time of %d: malformed stat", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	// After ')': state(3) ... utime is field 14, stime 15 (1-based over the whole line).
	if len(f) < 13 {
		return 0, fmt.Errorf("cpu time of %d: short stat", pid)
	}
	ut, err1 := strconv.ParseUint(f[11], 10, 64)
	st, err2 := strconv.ParseUint(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("cpu time of %d: malformed stat", pid)
	}
	return float64(ut+st) / clockTicks, nil
}

// peakRSS is pid's peak resident set size in bytes (VmHWM).
func peakRSS(pid int) (int64, error) { return statusKB(pid, "VmHWM:") }

// rss is pid's resident set size now, in bytes (VmRSS).
func rss(pid int) (int64, error) { return statusKB(pid, "VmRSS:") }

// rssFile is the file-backed part of pid's resident set now (RssFile: the
// binary's and libraries' pages, which every process running them shares), in bytes.
func rssFile(pid int) (int64, error) { return statusKB(pid, "RssFile:") }

// statusKB reads a kB field of /proc/PID/status, in bytes.
func statusKB(pid int, field string) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, fmt.Errorf("%s of %d: %w", field, pid, err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, field); ok {
			f := strings.Fields(v)
			if len(f) == 0 {
				break
			}
			kb, err := strconv.ParseInt(f[0], 10, 64)
			if err != nil {
				break
			}
			return kb << 10, nil
		}
	}
	return 0, fmt.Errorf("%s of %d: not in status", field, pid)
}

// rssSampler records the largest VmRSS of each process, and its file-backed part
// at that moment, every 100 ms, until stopped.
type rssSampler struct {
	done chan struct{}
	out  chan []rssPeak
}

type rssPeak struct{ rss, file int64 }

func startRSSSampler(ps []proxyProc) *rssSampler {
	s := &rssSampler{done: make(chan struct{}), out: make(chan []rssPeak, 1)}
	go func() {
		peak := make([]rssPeak, len(ps))
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			for i, p := range ps {
				if v, err := rss(p.pid); err == nil && v > peak[i].rss {
					f, _ := rssFile(p.pid)
					peak[i] = rssPeak{v, f}
				}
			}
			select {
			case <-s.done:
				s.out <- peak
				return
			case <-t.C:
			}
		}
	}()
	return s
}

// stop ends the sampling and returns the largest VmRSS of each process.
func (s *rssSampler) stop() []rssPeak {
	close(s.done)
	return <-s.out
}

// pinProcess moves every thread of pid to cpu; threads it starts later inherit it.
func pinProcess(pid, cpu int) error {
	var set unix.CPUSet
	set.Set(cpu)
	tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*", pid))
	if err != nil || len(tasks) == 0 {
		return fmt.Errorf("pin %d to cpu %d: no threads", pid, cpu)
	}
	for _, t := range tasks {
		tid, err := strconv.Atoi(filepath.Base(t))
		if err != nil {
			continue
		}
		if err := unix.SchedSetaffinity(tid, &set); err != nil && err != unix.ESRCH {
			return fmt.Errorf("pin %d to cpu %d: %w", pid, cpu, err)
		}
	}
	return nil
}
