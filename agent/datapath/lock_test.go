package datapath

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
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

// lockChildEnv makes the test binary a child that takes the lock on the file it names,
// says "locked" and waits to be killed.
const lockChildEnv = "FERRY_DATAPATH_TEST_LOCK"

func lockChild(path string) {
	if _, err := LockFile(path); err != nil {
		fmt.Println("error", err)
		os.Exit(1)
	}
	fmt.Println("locked")
	time.Sleep(time.Hour) // until the test kills it
	os.Exit(0)
}

// The kernel drops the lock of a process that dies: a crashed agent never keeps the
// next one out.
func TestLockDiesWithProcess(t *testing.T) {
	path := filepath.Join(t.TempDir(), "agent.lock")
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	holder := exec.Command(self, "-test.run=^$")
	holder.Env = append(os.Environ(), lockChildEnv+"="+path)
	out, err := holder.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	defer holder.Process.Kill()
	if line, err := bufio.NewReader(out).ReadString('\n'); err != nil || line != "locked\n" {
		t.Fatalf("child said %q: %v", line, err)
	}
	_, err = LockFile(path)
	if !errors.Is(err, ErrLocked) {
		t.Fatalf("lock held by the child: %v, want ErrLocked", err)
	}
	if !strings.Contains(err.Error(), "pid "+strconv.Itoa(holder.Process.Pid)) {
		t.Errorf("error %q does not name the child, pid %d", err, holder.Process.Pid)
	}
	// The child is killed (a crash): the kernel drops its lock.
	holder.Process.Kill()
	holder.Wait()
	l, err := LockFile(path)
	if err != nil {
		t.Fatalf("lock after the holder died: %v", err)
	}
	l.Unlock()
}
