package e2e

// Known proxy attacks end to end, on a lab of its own (prefix "hd", pods in
// 10.113.0.0/16): raw clients in pod a send request smuggling and slowloris at an
// HTTP Service whose endpoint (fortio) is pod c on the other node, while curl in
// a keeps being served; a TLS client without a mesh certificate, in a pod outside
// the mesh, is refused at c's tunnel port with a typed reason in c's flow record.

import (
	"context"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ferrymesh/ferry/api/admin"
	"github.com/ferrymesh/ferry/lab"
)

const (
	hdPrefix = "hd"
	hdPodNet = 113
)

var (
	hdVIP = netip.MustParseAddr("10.96.113.10")
	hdLab = onceLab{what: "hardening lab", bringUp: hdBringUp}
)

func hdBringUp() (*env, error) {
	cfg := lab.Config{
		Prefix: hdPrefix,
		PodNet: hdPodNet,
		Nodes: []lab.NodeConfig{
			{Name: "node1", Pods: []lab.PodConfig{
				{Name: "a", Namespace: "shop", ServiceAccount: "web", Enrolled: true},
				{Name: "x", Namespace: "shop", ServiceAccount: "outsider"},
			}},
			{Name: "node2", Pods: []lab.PodConfig{
				{Name: "c", Namespace: "shop", ServiceAccount: "db", Enrolled: true},
			}},
		},
		Services: []lab.ServiceConfig{
			{Name: "hd-http", Namespace: "shop", ClusterIP: hdVIP, Port: servicePort, TargetPort: fortioPort, AppProtocol: "http", Pods: []string{"c"}},
		},
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	e, err := newEnv(ctx, cfg, "ferry", "ferry-agent", "ferry-operator")
	if err != nil {
		return nil, err
	}
	if err := e.startFortio(ctx, "c", fortioPort, 0); err != nil {
		return e.fail(err)
	}
	return e, nil
}

// rawScript sends its argv[1] (with \r and \n escapes) to argv[2]:argv[3] from
// inside the pod and prints the first response line, then "closed" when the
// proxy closed the connection after it (or "open").
const rawScript = `
import socket, sys
req = sys.argv[1].encode().decode('unicode_escape').encode('latin-1')
s = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=20)
s.sendall(req)
data = b''
while b'\r\n' not in data:
    b = s.recv(4096)
    if not b:
        break
    data += b
print(data.split(b'\r\n')[0].decode() if data else 'none')
s.settimeout(3)
try:
    while True:
        b = s.recv(65536)
        if not b:
            print('closed')
            break
except socket.timeout:
    print('open')
except ConnectionResetError:
    print('closed')
`

// slowScript opens a connection, sends a request line and then one header byte a
// second, and prints how many seconds passed before the proxy closed it.
const slowScript = `
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
s.sendall(b'GET /slowloris HTTP/1.1\r\nHost: hd-http\r\n')
start = time.time()
try:
    while time.time() - start < 45:
        s.sendall(b'x')
        s.settimeout(1)
        try:
            if s.recv(1) == b'':
                break
        except socket.timeout:
            pass
except (BrokenPipeError, ConnectionResetError):
    pass
print(int(time.time() - start))
`

func TestHardeningSmugglingAcrossNodes(t *testing.T) {
	e := hdLab.get(t)
	e.waitEnrolled(t, "node1", "shop/a")
	e.waitEnrolled(t, "node2", "shop/c")
	host, port := hdVIP.String(), strconv.Itoa(servicePort)
	e.mustClient(t, "a", nil, "curl", "-sf", "-o", "/dev/null", "http://"+vip(hdVIP)+"/warm")
	smuggled := `GET /smuggled HTTP/1.1\r\nHost: hd-http\r\n\r\n`
	chunk := fmt.Sprintf("%x", len(strings.NewReplacer(`\r`, "\r", `\n`, "\n").Replace(smuggled)))
	for _, tc := range []struct{ name, req, status string }{
		{"CL.TE", `POST /clte HTTP/1.1\r\nHost: hd-http\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n` + smuggled, "HTTP/1.1 200 OK"},
		{"TE.CL", `POST /tecl HTTP/1.1\r\nHost: hd-http\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n` + chunk + `\r\n` + smuggled + `\r\n0\r\n\r\n`, "HTTP/1.1 200 OK"},
		{"TE.TE", `POST /tete HTTP/1.1\r\nHost: hd-http\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n0\r\n\r\n` + smuggled, "HTTP/1.1 501 Not Implemented"},
		{"two Content-Lengths", `POST /cl2 HTTP/1.1\r\nHost: hd-http\r\nContent-Length: 0\r\nContent-Length: 44\r\n\r\n` + smuggled, "HTTP/1.1 400 Bad Request"},
		{"bare LF in chunk line", `POST /lf HTTP/1.1\r\nHost: hd-http\r\nTransfer-Encoding: chunked\r\n\r\n2\nxx\r\n0\r\n\r\n` + smuggled, "HTTP/1.1 400 Bad Request"},
		{"oversized header", `GET /big HTTP/1.1\r\nHost: hd-http\r\nX-Big: ` + strings.Repeat("x", 70<<10) + `\r\n\r\n`, "HTTP/1.1 431 Request Header Fields Too Large"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, _ := e.mustClient(t, "a", nil, "python3", "-c", rawScript, tc.req, host, port)
			lines := strings.Fields(strings.ReplaceAll(out, " ", "_"))
			if len(lines) != 2 || strings.ReplaceAll(lines[0], "_", " ") != tc.status || lines[1] != "closed" {
				t.Errorf("got %q; want %q, then the connection closed", out, tc.status)
			}
		})
	}
	if n, _ := e.served(t, "c", fortioPort, "/smuggled", ""); n != 0 {
		t.Errorf("the app in c served %d smuggled requests", n)
	}
	if n, _ := e.served(t, "c", fortioPort, "/clte", ""); n != 1 {
		t.Errorf("the app in c served the CL.TE request %d times, want once", n)
	}
}

func TestHardeningSlowlorisAcrossNodes(t *testing.T) {
	e := hdLab.get(t)
	e.waitEnrolled(t, "node1", "shop/a")
	e.waitEnrolled(t, "node2", "shop/c")
	host, port := hdVIP.String(), strconv.Itoa(servicePort)
	var wg sync.WaitGroup
	secs := make([]string, 10)
	for i := range secs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out, _, err := e.client(t, "a", nil, "python3", "-c", slowScript, host, port)
			if err != nil {
				t.Errorf("slow client: %v", err)
			}
			secs[i] = strings.TrimSpace(out)
		}()
	}
	// Meanwhile curl is served, each request well within its own 5 s bound.
	deadline := time.Now().Add(8 * time.Second)
	served := 0
	for time.Now().Before(deadline) {
		e.mustClient(t, "a", nil, "curl", "-sf", "-m", "5", "-o", "/dev/null", "http://"+vip(hdVIP)+"/innocent")
		served++
	}
	wg.Wait()
	for _, s := range secs {
		// Cut at the 10 s header timeout; the bound leaves room for a loaded machine.
		if n, err := strconv.Atoi(s); err != nil || n < 5 || n > 40 {
			t.Errorf("a slow-header client was cut off after %q s; want about 10", s)
		}
	}
	t.Logf("slow clients cut off after %v s; %d innocent requests served meanwhile", secs, served)
	if n, _ := e.served(t, "c", fortioPort, "/slowloris", ""); n != 0 {
		t.Errorf("the app served %d slow-header requests", n)
	}
}

func TestHardeningTunnelRefusesWithoutCertificate(t *testing.T) {
	e := hdLab.get(t)
	e.waitEnrolled(t, "node2", "shop/c")
	c := e.pod("c")
	since := time.Now()
	tunnel := netip.AddrPortFrom(c.IP, 15008).String()
	// A real TLS client, no certificate; then one with a self-signed one.
	out, _, _ := e.client(t, "x", strings.NewReader(""), "openssl", "s_client", "-connect", tunnel, "-alpn", "h2", "-tls1_3")
	t.Logf("openssl without a certificate:\n%s", clip(out))
	dir := t.TempDir()
	key, crt := dir+"/k.pem", dir+"/c.pem"
	e.mustClient(t, "x", nil, "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
		"-keyout", key, "-out", crt, "-days", "1", "-subj", "/CN=x", "-addext", "subjectAltName=URI:spiffe://cluster.local/ns/shop/sa/web")
	out, _, _ = e.client(t, "x", strings.NewReader(""), "openssl", "s_client", "-connect", tunnel, "-alpn", "h2", "-tls1_3", "-cert", crt, "-key", key)
	t.Logf("openssl with a self-signed certificate:\n%s", clip(out))
	for _, want := range []string{"no_certificate", "unknown_authority"} {
		r := e.findConn(t, "node2", func(r connRecord) bool {
			return r.Direction == admin.Inbound && r.End.After(since) && r.Verdict == admin.VerdictDenied &&
				strings.Contains(r.Error, "tunnel handshake "+want)
		})
		if r.Reason != admin.ReasonTunnel || r.Src.Addr() != e.pod("x").IP {
			t.Errorf("node2's record of the refused handshake: %+v", r)
		}
	}
}
