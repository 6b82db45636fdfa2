package datapath

import (
	"bufio"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// A second lock on a held file fails at once, names the holder's pid and leaves the
// file as it was; once released it can be taken again.
func TestLockFileExclusive(t *testing.T) {
	path := filepath.Join(t.TempDir(), "run", "agent.lock")
	l1, err := LockFile(path)
	if err != nil {
		t.Fatal(err)
	}
	before, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if strings.TrimSpace(string(before)) != strconv.Itoa(os.Getpid()) {
		t.Fatalf("lock file holds %q, want this pid", before)
	}
	st1, _ := os.Stat(path)

	_, err = LockFile(path)
	if !errors.Is(err, ErrLocked) {
		t.Fatalf("second lock: %v, want ErrLocked", err)
	}
	if !strings.Contains(err.Error(), "pid "+strconv.Itoa(os.Getpid())) || !strings.Contains(err.Error(), path) {
		t.Errorf("error %q does not name the lock and its holder", err)
	}
	after, _ := os.ReadFile(path)
	st2, _ := os.Stat(path)
	if string(after) != string(before) || !st2.ModTime().Equal(st1.ModTime()) {
		t.Errorf("a failed lock changed the file: %q → %q", before, after)
	}

	if err := l1.Unlock(); err != nil {
		t.Fatal(err)
	}
	l2, err := LockFile(path)
	if err != nil {
		t.Fatalf("lock after unlock: %v", err)
	}
	l2.Unlock()
}

// The pin folder is locked as a folder (bpffs holds no files): a second lock fails,
// names the holder from /proc/locks, and puts nothing in the folder.
func TestLockDirExclusive(t *testing.T) {
	dir := t.TempDir()
	l1, err := LockDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer l1.Unlock()
	_, err = LockDir(dir)
	if !errors.Is(err, ErrLocked) {
		t.Fatalf("second lock: %v, want ErrLocked", err)
	}
	// The pid comes from /proc/locks: a folder holds no pid.
	if !strings.Contains(err.Error(), "pid "+strconv.Itoa(os.Getpid())) {
		t.Errorf("error %q does not name the holder", err)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("locking the folder left %v in it", entries)
	}
}

// The kernel drops the lock of a process that dies: a crashed agent never keeps the
// next one out.
func TestLockDiesWithProcess(t *testing.T) {
	path := filepath.Join(t.TempDir(), "agent.lock")
	if err := os.WriteFile(path, []byte("1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	// -o: the command does not inherit the lock, so flock(1) alone holds it.
	holder := exec.Command("flock", "-o", "--exclusive", path, "sh", "-c", "echo $$; exec sleep 60")
	out, err := holder.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := holder.Start(); err != nil {
		t.Fatalf("flock(1): %v", err)
	}
	defer holder.Process.Kill()
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatalf("flock(1) said %q: %v", line, err)
	}
	sleeper, err := strconv.Atoi(strings.TrimSpace(line))
	if err != nil {
		t.Fatal(err)
	}
	_, err = LockFile(path)
	if !errors.Is(err, ErrLocked) {
		t.Fatalf("lock held by flock(1): %v, want ErrLocked", err)
	}
	if !strings.Contains(err.Error(), "pid "+strconv.Itoa(holder.Process.Pid)) {
		t.Errorf("error %q does not name flock(1), pid %d", err, holder.Process.Pid)
	}
	// flock(1) is killed (a crash): the kernel drops its lock.
	holder.Process.Kill()
	holder.Wait()
	syscall.Kill(sleeper, syscall.SIGKILL)
	deadline := time.Now().Add(5 * time.Second)
	for {
		l, err := LockFile(path)
		if err == nil {
			l.Unlock()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("lock after the holder died: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
