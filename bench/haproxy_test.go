package bench

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

// TestHAProxyConfigs checks the pair's configurations with HAProxy itself
// (haproxy -c), and that HTTP/2 and gRPC go through it at L7: h2c from the app's
// client, h2 over mTLS between the two, h2c to the app.
func TestHAProxyConfigs(t *testing.T) {
	if _, err := exec.LookPath("haproxy"); err != nil {
		t.Fatalf("haproxy is not installed (make deps installs it): %v", err)
	}
	cfgs, err := writeHAProxyConfigs(t.TempDir(), map[string]string{"nms1": "10.104.1.13", "nms2": "10.104.2.12"})
	if err != nil {
		t.Fatal(err)
	}
	for pod, cfg := range cfgs {
		if out, err := exec.Command("haproxy", "-c", "-f", cfg).CombinedOutput(); err != nil {
			t.Errorf("%s: haproxy -c: %v\n%s", pod, err, out)
		}
	}
	client, err := os.ReadFile(cfgs["nmc"])
	if err != nil {
		t.Fatal(err)
	}
	server, err := os.ReadFile(cfgs["nms2"])
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"listen out15011\n    mode http\n    bind 127.0.0.1:15011 proto h2\n    server up 10.104.2.12:15445 ssl crt",
		"listen out15014\n    mode http\n    bind 127.0.0.1:15014 proto h2\n    server up 10.104.1.13:15446 ssl crt",
		"listen out15001\n    bind 127.0.0.1:15001\n    server up 10.104.2.12:15443 ssl",
		// rr-small: mode tcp like HTTP/1.1, toward the server side's rr port.
		"listen out15021\n    bind 127.0.0.1:15021\n    server up 10.104.2.12:15447 ssl",
	} {
		if !strings.Contains(string(client), want) {
			t.Errorf("client config lacks %q:\n%s", want, client)
		}
	}
	if want := "verify required alpn h2\n    server app 127.0.0.1:8079 proto h2\n"; !strings.Contains(string(server), want) {
		t.Errorf("nms2 config lacks %q:\n%s", want, server)
	}
}
