// Interoperability with Istio's HBONE: Istio's own echo client and server (the
// workload of Istio's integration tests, built by hack/build-istio-echo.sh) against
// Ferry's tunnel, in both directions, on loopback. docs/interop.md says what is and
// is not interoperable.
package tunnel_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/agent/identity"
	"github.com/ferrymesh/ferry/agent/identity/identitytest"
	"github.com/ferrymesh/ferry/agent/tunnel"
	"github.com/ferrymesh/ferry/api/spiffe"
	"github.com/ferrymesh/ferry/internal/hackbuild"
	"github.com/ferrymesh/ferry/internal/loopback"
)

var (
	istioClientID = spiffe.ID("cluster.local", "istio", "echo-client")
	istioServerID = spiffe.ID("cluster.local", "istio", "echo-server")
	ferryServerID = spiffe.ID("cluster.local", "default", "ferry-server")
	ferryClientID = spiffe.ID("cluster.local", "default", "ferry-client")
)

// TestIstioClientToFerryServer: Istio's echo client speaks HBONE (--hbone) to Ferry's
// tunnel Server, which carries each CONNECT to an app (Istio's echo server, plain TCP
// and HTTP ports). The app answers with what it received; the client prints it.
func TestIstioClientToFerryServer(t *testing.T) {
	bins := istioEcho(t)
	dir := t.TempDir()
	ca := identitytest.NewCA(t)
	clientCert, clientKey := writeCert(t, dir, "istio-client", ca.Valid(t, istioClientID))
	app := startIstioServer(t, bins.server, dir, nil)

	store := identity.NewStore()
	if err := store.Update(ca.RootPEM, map[string]identity.CertPEM{ferryServerID: ca.Valid(t, ferryServerID)}); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var streams []tunnel.StreamInfo
	var refused []*tunnel.HandshakeError
	srv, err := tunnel.NewServer(tunnel.ServerConfig{
		TLS: func(net.Addr) (*tls.Config, error) { return store.ServerConfig(ferryServerID, nil), nil },
		Authorize: func(peerID string, _ netip.AddrPort) error {
			if peerID != istioClientID {
				return &identity.MismatchError{Got: peerID, Want: istioClientID}
			}
			return nil
		},
		// As the agent does inside a pod: the hop to the app comes from 127.0.0.6.
		Dial: func(ctx context.Context, target netip.AddrPort) (net.Conn, error) {
			d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 6)}}
			return d.DialContext(ctx, "tcp", target.String())
		},
		OnStream: func(si tunnel.StreamInfo) {
			mu.Lock()
			streams = append(streams, si)
			mu.Unlock()
		},
		OnHandshakeFailed: func(_ netip.AddrPort, he *tunnel.HandshakeError) {
			mu.Lock()
			refused = append(refused, he)
			mu.Unlock()
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	ln := loopback.Listen(t)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	t.Cleanup(func() {
		srv.Close()
		if err := <-served; !errors.Is(err, tunnel.ErrServerClosed) {
			t.Errorf("Serve: %v", err)
		}
	})
	hbone := ln.Addr().String()
	// Istio's client checks the server's certificate against a host name (Go's
	// default verification); a SPIFFE certificate has none, so it is told not to.
	// Ferry's side still verifies the client's chain and SPIFFE ID.
	hboneFlags := []string{"--hbone", hbone, "--hbone-client-cert", clientCert, "--hbone-client-key", clientKey, "--hbone-insecure-skip-verify"}

	streamsTo := func(target string) []tunnel.StreamInfo {
		mu.Lock()
		defer mu.Unlock()
		var out []tunnel.StreamInfo
		for _, si := range streams {
			if si.Target.String() == target {
				out = append(out, si)
			}
		}
		return out
	}
	waitStreams := func(target string, n int) []tunnel.StreamInfo {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			got := streamsTo(target)
			if len(got) >= n || time.Now().After(deadline) {
				return got
			}
			time.Sleep(20 * time.Millisecond)
		}
	}

	t.Run("tcp", func(t *testing.T) {
		// 48 KiB of random hex: the app echoes it, so it crossed the tunnel both ways.
		msg := randomHex(t, 24<<10)
		target := app.tcp.String()
		out, stderr := runClient(t, bins.client, append([]string{"tcp://" + target, "--msg", msg}, hboneFlags...)...)
		echoed := bodyText(out)
		if !strings.Contains(echoed, msg) {
			t.Fatalf("the app's answer through Ferry's tunnel does not hold the %d-byte message; client printed:\n%s", len(msg), clip(out))
		}
		if !strings.Contains(out, "StatusCode=200") {
			t.Errorf("client printed no StatusCode=200:\n%s", clip(out))
		}
		// What the app saw: the connection from Ferry's hop address.
		if !strings.Contains(out, "body] IP=127.0.0.6") {
			t.Errorf("the app did not see the connection from 127.0.0.6 (Ferry's hop to the app):\n%s", clip(out))
		}
		// What Istio's client saw: Ferry's SPIFFE ID on the tunnel.
		// Istio's log goes to stdout by default; look in both.
		if !strings.Contains(out+stderr, "remote="+ferryServerID) {
			t.Errorf("Istio's client did not log Ferry's identity %s as the HBONE peer:\n%s", ferryServerID, clip(logLines(out+stderr)))
		}
		for _, line := range strings.Split(out+stderr, "\n") {
			if strings.Contains(line, "CONNECT established") {
				t.Logf("Istio client: %s", strings.TrimSpace(line))
			}
		}
		got := waitStreams(target, 1)
		if len(got) != 1 {
			t.Fatalf("Ferry's server reported %d streams to %s, want 1", len(got), target)
		}
		si := got[0]
		if si.PeerID != istioClientID {
			t.Errorf("Ferry's server saw peer %q, want Istio's client %q", si.PeerID, istioClientID)
		}
		// Err may be set: Istio's TCP client hangs up (resets the stream) as soon as
		// it has read its message back, sometimes before the app's side has ended.
		if si.Status != 200 {
			t.Errorf("stream status %d (err %v), want 200", si.Status, si.Err)
		}
		if si.BytesIn < int64(len(msg)) || si.BytesOut < int64(len(msg)) {
			t.Errorf("stream carried %d bytes in and %d out, want at least %d each way", si.BytesIn, si.BytesOut, len(msg))
		}
		t.Logf("Istio client → Ferry server → app: %d bytes in, %d out, peer %s, end: %v", si.BytesIn, si.BytesOut, si.PeerID, si.Err)
	})

	t.Run("http", func(t *testing.T) {
		target := app.http.String()
		out, _ := runClient(t, bins.client, append([]string{"http://" + target + "/through-ferry", "-H", "X-Interop: hbone", "--count", "3"}, hboneFlags...)...)
		for _, want := range []string{"StatusCode=200", "URL=/through-ferry", "RequestHeader=X-Interop:hbone", "body] IP=127.0.0.6"} {
			if n := strings.Count(out, want); n != 3 {
				t.Errorf("client printed %q %d times, want 3 (one per request):\n%s", want, n, clip(out))
			}
		}
		got := waitStreams(target, 1)
		if len(got) == 0 {
			t.Fatalf("Ferry's server reported no stream to %s", target)
		}
		conns := map[netip.AddrPort]bool{}
		for _, si := range got {
			conns[si.Remote] = true
			if si.PeerID != istioClientID || si.Status != 200 {
				t.Errorf("stream to %s: peer %q status %d, want %q and 200", target, si.PeerID, si.Status, istioClientID)
			}
		}
		t.Logf("%d HBONE streams over %d tunnel connections", len(got), len(conns))
	})

	t.Run("untrusted client refused", func(t *testing.T) {
		// A certificate from a CA Ferry does not trust: the handshake is refused and
		// no stream reaches the app.
		other := identitytest.NewCA(t)
		c, k := writeCert(t, dir, "untrusted", other.Valid(t, istioClientID))
		target := app.tcp.String()
		before := len(streamsTo(target))
		mu.Lock()
		refusedBefore := len(refused)
		mu.Unlock()
		cmd := exec.Command(bins.client, "tcp://"+target, "--msg", "nope", "--hbone", hbone,
			"--hbone-client-cert", c, "--hbone-client-key", k, "--hbone-insecure-skip-verify", "--timeout", "5s")
		out, err := cmd.CombinedOutput()
		if err == nil {
			t.Fatalf("Istio's client with an untrusted certificate succeeded:\n%s", clip(string(out)))
		}
		if strings.Contains(string(out), "StatusCode=200") {
			t.Errorf("an untrusted client got an answer from the app:\n%s", clip(string(out)))
		}
		if n := len(streamsTo(target)); n != before {
			t.Errorf("Ferry served %d streams for an untrusted client", n-before)
		}
		deadline := time.Now().Add(5 * time.Second)
		for {
			mu.Lock()
			n := len(refused)
			mu.Unlock()
			if n > refusedBefore || time.Now().After(deadline) {
				if n == refusedBefore {
					t.Errorf("Ferry reported no refused handshake")
				}
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
}

// TestFerryClientToIstioServer: Ferry's tunnel Pool opens HBONE streams to Istio's
// echo server (--hbone with --tls), which dials the CONNECT authority: its own TCP
// port, and an echo app of the test's.
func TestFerryClientToIstioServer(t *testing.T) {
	bins := istioEcho(t)
	dir := t.TempDir()
	ca := identitytest.NewCA(t)
	crt, key := writeCert(t, dir, "istio-server", ca.Valid(t, istioServerID))
	app := startIstioServer(t, bins.server, dir, []string{"--crt", crt, "--key", key})

	store := identity.NewStore()
	if err := store.Update(ca.RootPEM, map[string]identity.CertPEM{ferryClientID: ca.Valid(t, ferryClientID)}); err != nil {
		t.Fatal(err)
	}
	pool, err := tunnel.NewPool(tunnel.PoolConfig{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pool.Close() })
	src := &istioSource{store: store}
	connect := func(t *testing.T, dstID string, target netip.AddrPort) (*tunnel.Stream, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		s, err := pool.Connect(ctx, src, dstID, app.hbone, target, "")
		if err == nil {
			t.Cleanup(func() { s.Close() })
		}
		return s, err
	}

	t.Run("istio tcp app", func(t *testing.T) {
		s, err := connect(t, istioServerID, app.tcp)
		if err != nil {
			t.Fatalf("Connect to Istio's HBONE server: %v", err)
		}
		msg := "ferry-to-istio-" + randomHex(t, 16)
		if _, err := io.WriteString(s, msg+"\n"); err != nil {
			t.Fatal(err)
		}
		if err := s.CloseWrite(); err != nil {
			t.Fatal(err)
		}
		got, err := readAll(s, 10*time.Second)
		if err != nil {
			t.Fatalf("read the app's answer: %v (got %q)", err, got)
		}
		text := string(got)
		if !strings.Contains(text, msg) || !strings.Contains(text, "StatusCode=200") {
			t.Fatalf("Istio's echo app answered %q, want the message %q echoed with StatusCode=200", clip(text), msg)
		}
		t.Logf("Ferry client → Istio HBONE server → Istio TCP app answered:\n%s", clip(text))
	})

	t.Run("4MiB both ways", func(t *testing.T) {
		target := loopback.Serve(t, loopback.Echo)
		s, err := connect(t, istioServerID, target)
		if err != nil {
			t.Fatalf("Connect: %v", err)
		}
		// The first subtest's connection carries this stream too: HBONE streams
		// share one TLS session with Istio's server.
		if st := pool.Stats(); st.Conns != 1 {
			t.Errorf("pool holds %d tunnel connections to Istio's server after two streams, want 1", st.Conns)
		}
		data := make([]byte, 4<<20)
		rand.Read(data)
		werr := make(chan error, 1)
		go func() {
			_, err := s.Write(data)
			if err == nil {
				err = s.CloseWrite()
			}
			werr <- err
		}()
		got, err := readAll(s, 30*time.Second)
		if err != nil {
			t.Fatalf("read: %v after %d bytes", err, len(got))
		}
		if err := <-werr; err != nil {
			t.Fatalf("write: %v", err)
		}
		if !bytes.Equal(got, data) {
			t.Fatalf("echoed %d bytes through Istio's HBONE server, want the %d sent, identical", len(got), len(data))
		}
	})

	t.Run("wrong server identity refused", func(t *testing.T) {
		// Ferry checks the SPIFFE ID the Istio server proves against the one the
		// control plane names: another ID is refused before any stream.
		_, err := connect(t, spiffe.ID("cluster.local", "istio", "someone-else"), app.tcp)
		var mm *identity.MismatchError
		if !errors.As(err, &mm) {
			t.Fatalf("Connect expecting another identity: err %v, want an identity mismatch", err)
		}
		if mm.Got != istioServerID {
			t.Errorf("mismatch names %q as the server's identity, want %q", mm.Got, istioServerID)
		}
	})
}

// istioSource is a Ferry client pod on loopback presenting ferryClientID.
type istioSource struct{ store *identity.Store }

func (s *istioSource) DialTunnel(ctx context.Context, addr netip.AddrPort) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, "tcp", addr.String())
}

func (s *istioSource) ClientTLS(dstID string) *tls.Config {
	return s.store.ClientConfig(ferryClientID, dstID)
}

func (s *istioSource) String() string { return ferryClientID }

type istioBins struct{ client, server string }

// istioEcho returns Istio's echo client and server, building them with
// hack/build-istio-echo.sh on first use (a minute or more; cached after). If they
// cannot be built the test is skipped, or fails under FERRY_PRIVILEGED_TESTS=1.
func istioEcho(t *testing.T) istioBins {
	t.Helper()
	b := hackbuild.Binaries(t, "build-istio-echo.sh", "client", "server")
	return istioBins{client: b["client"], server: b["server"]}
}

// istioApp is a running Istio echo server's ports on 127.0.0.1.
type istioApp struct {
	http, tcp, hbone netip.AddrPort
}

// startIstioServer runs Istio's echo server with HTTP, gRPC, TCP and (given
// --crt/--key in extra) an HBONE port with TLS, all bound to 127.0.0.1, and waits
// until they accept connections.
func startIstioServer(t *testing.T, bin, dir string, extra []string) istioApp {
	t.Helper()
	ports := freePorts(t, 4)
	httpP, grpcP, tcpP, hboneP := ports[0], ports[1], ports[2], ports[3]
	all := fmt.Sprintf("%d,%d,%d,%d", httpP, grpcP, tcpP, hboneP)
	args := []string{
		"--port", strconv.Itoa(httpP), "--grpc", strconv.Itoa(grpcP), "--tcp", strconv.Itoa(tcpP),
		"--bind-localhost", all, "--version", "interop",
	}
	withHBONE := len(extra) > 0
	if withHBONE {
		args = append(args, "--hbone", strconv.Itoa(hboneP), "--tls", strconv.Itoa(hboneP))
	}
	args = append(args, extra...)
	logPath := filepath.Join(dir, "istio-server.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		logf.Close()
		t.Fatalf("start Istio echo server: %v", err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); logf.Close(); close(exited) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("Istio echo server log:\n%s", clip(string(b)))
		}
	})
	lo := netip.MustParseAddr("127.0.0.1")
	app := istioApp{
		http:  netip.AddrPortFrom(lo, uint16(httpP)),
		tcp:   netip.AddrPortFrom(lo, uint16(tcpP)),
		hbone: netip.AddrPortFrom(lo, uint16(hboneP)),
	}
	wait := []netip.AddrPort{app.http, app.tcp}
	if withHBONE {
		wait = append(wait, app.hbone)
	}
	deadline := time.Now().Add(30 * time.Second)
	for _, a := range wait {
		for {
			c, err := net.DialTimeout("tcp", a.String(), time.Second)
			if err == nil {
				c.Close()
				break
			}
			select {
			case <-exited:
				b, _ := os.ReadFile(logPath)
				t.Fatalf("Istio echo server exited before listening on %s:\n%s", a, clip(string(b)))
			default:
			}
			if time.Now().After(deadline) {
				t.Fatalf("Istio echo server not listening on %s after 30 s: %v", a, err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	return app
}

// runClient runs Istio's echo client and returns what it printed (stdout: the
// answers) and logged (stderr); a failed run fails the test.
func runClient(t *testing.T, bin string, args ...string) (stdout, stderr string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var o, e bytes.Buffer
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Stdout, cmd.Stderr = &o, &e
	if err := cmd.Run(); err != nil {
		t.Fatalf("Istio echo client %s: %v\nstdout:\n%s\nstderr:\n%s", strings.Join(redactMsg(args), " "), err, clip(o.String()), clip(e.String()))
	}
	return o.String(), e.String()
}

// logLines keeps the log lines of the client's output (not the answers).
func logLines(out string) string {
	var b strings.Builder
	for _, line := range strings.Split(out, "\n") {
		if !strings.HasPrefix(line, "[") {
			b.WriteString(line + "\n")
		}
	}
	return b.String()
}

// bodyText joins the "[N body] line" lines of the client's output, the app's
// answer as it arrived.
func bodyText(out string) string {
	var b strings.Builder
	for _, line := range strings.Split(out, "\n") {
		if i := strings.Index(line, " body] "); i >= 0 {
			b.WriteString(line[i+len(" body] "):])
		}
	}
	return b.String()
}

func redactMsg(args []string) []string {
	out := append([]string(nil), args...)
	for i := range out {
		if len(out[i]) > 200 {
			out[i] = out[i][:40] + "…"
		}
	}
	return out
}

func readAll(r io.Reader, timeout time.Duration) ([]byte, error) {
	type result struct {
		b   []byte
		err error
	}
	done := make(chan result, 1)
	go func() {
		b, err := io.ReadAll(r)
		done <- result{b, err}
	}()
	select {
	case res := <-done:
		return res.b, res.err
	case <-time.After(timeout):
		return nil, fmt.Errorf("no end of stream after %v", timeout)
	}
}

func writeCert(t *testing.T, dir, name string, c identity.CertPEM) (certPath, keyPath string) {
	t.Helper()
	certPath = filepath.Join(dir, name+".crt")
	keyPath = filepath.Join(dir, name+".key")
	if err := os.WriteFile(certPath, c.Chain, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyPath, c.Key, 0o600); err != nil {
		t.Fatal(err)
	}
	return certPath, keyPath
}

// freePorts returns n ports on 127.0.0.1 that were free a moment ago, for a
// program that takes its ports as flags.
func freePorts(t *testing.T, n int) []int {
	t.Helper()
	var lns []net.Listener
	var ports []int
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		lns = append(lns, ln)
		ports = append(ports, ln.Addr().(*net.TCPAddr).Port)
	}
	for _, ln := range lns {
		ln.Close()
	}
	return ports
}

func randomHex(t *testing.T, n int) string {
	t.Helper()
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func clip(s string) string {
	const max = 6000
	if len(s) <= max {
		return s
	}
	return s[:max/2] + "\n…\n" + s[len(s)-max/2:]
}
