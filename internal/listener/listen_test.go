package listener

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"testing"
)

func TestConfigTurnsMPTCPOff(t *testing.T) {
	lc := Config()
	if lc.MultipathTCP() {
		t.Fatal("ListenConfig has Multipath TCP on")
	}
}

// Even a client that asks for MPTCP gets a plain TCP connection.
func TestTCPIsPlainTCP(t *testing.T) {
	l, err := TCP(context.Background(), "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	var d net.Dialer
	d.SetMultipathTCP(true)
	c, err := d.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	mptcp, err := s.(*net.TCPConn).MultipathTCP()
	if err != nil {
		t.Fatal(err)
	}
	if mptcp {
		t.Fatal("accepted connection is Multipath TCP")
	}
}

func TestAddrUnixReplacesStaleSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "run", "x.sock")
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, nil, 0o600); err != nil { // what a killed process leaves
		t.Fatal(err)
	}
	l, err := Addr(context.Background(), "unix://"+path)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
}

func TestAddrTCPAndErrors(t *testing.T) {
	l, err := Addr(context.Background(), "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if _, ok := l.(*net.TCPListener); !ok {
		t.Fatalf("listener %T, want TCP", l)
	}
	if _, err := Addr(context.Background(), l.Addr().String()); err == nil {
		t.Fatal("second listener on the same address succeeded")
	}
}
