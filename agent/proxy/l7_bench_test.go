package proxy

import (
	"fmt"
	"io"
	"net/netip"
	"testing"
)

// BenchmarkL7H2 is one h2c request through the proxy's L7 path on the same-node
// route: a client on pod a's captured connection (HTTP/2 with prior knowledge), the
// proxy's HTTP/2 server, the balancer, the pod's upstream HTTP/2 transport and the
// app, and the response back. Requests run in parallel on one client connection, as
// h2load's streams do; allocs/op and ns/op are the figures to compare.
func BenchmarkL7H2(b *testing.B) {
	tp, _, _ := newL7Proxy(b, RoundRobin, "kubernetes.io/h2c")
	c := tp.client(b, netip.AddrPortFrom(vip, 80), true)
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			res, err := c.Get("http://web.default/p")
			if err != nil {
				b.Error(err)
				return
			}
			body, err := io.ReadAll(res.Body)
			res.Body.Close()
			if err != nil || res.StatusCode != 200 || string(body) != "HTTP/2.0 /p 0" {
				b.Error(fmt.Sprintf("status %d body %q err %v", res.StatusCode, body, err))
				return
			}
		}
	})
}
