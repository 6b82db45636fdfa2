package main

import (
	"strings"
	"testing"
)

// A /proc/net/tcp table: the listener on 15001 counts, an established connection
// from port 15001 does not.
func TestListensIn(t *testing.T) {
	const table = `  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 2F01F40A:1F90 3001F40A:3A98 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 20 4 30 10 -1
`
	for _, tc := range []struct {
		port int
		want bool
	}{{15001, true}, {8080, false}, {15000, false}} {
		got, err := listensIn(strings.NewReader(table), tc.port)
		if err != nil || got != tc.want {
			t.Errorf("port %d: %v, %v; want %v", tc.port, got, err, tc.want)
		}
	}
}

// Without the mesh nothing listens on 15001 here: await gives up after
// --timeout, says why, and runs nothing.
func TestAwaitTimesOut(t *testing.T) {
	if ok, _ := listening(outboundListenerPort); ok {
		t.Skip("something listens on 15001 in this namespace")
	}
	cmd := newAwaitCommand()
	var out strings.Builder
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetArgs([]string{"--timeout", "300ms", "--", "/bin/false-does-not-matter"})
	err := cmd.Execute()
	if err == nil || !strings.Contains(err.Error(), "command:") {
		// the command is looked up first: a missing one is refused at once
		t.Fatalf("missing command: %v", err)
	}
	cmd = newAwaitCommand()
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetArgs([]string{"--timeout", "300ms"})
	err = cmd.Execute()
	if err == nil || !strings.Contains(err.Error(), "not enrolled after 300ms") {
		t.Fatalf("ferry await with no mesh: %v, want it to give up naming the timeout", err)
	}
}
