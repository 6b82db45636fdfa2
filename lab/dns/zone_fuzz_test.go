package dns

import (
	"net/netip"
	"strings"
	"testing"

	"golang.org/x/net/dns/dnsmessage"
)

// FuzzAnswer feeds the responder arbitrary query packets: it never panics, and a
// reply is a response to that query (same ID and opcode), fits a UDP datagram of
// the size the client allows, and answers only with records of the asked name
// that the zone holds.
func FuzzAnswer(f *testing.F) {
	z, err := NewZone("", []Service{
		{Name: "web", Namespace: "shop", IPs: []netip.Addr{netip.MustParseAddr("10.96.0.10"), netip.MustParseAddr("fd00::10")}},
		{Name: "api", Namespace: "shop", IPs: []netip.Addr{netip.MustParseAddr("10.96.0.11")}},
	})
	if err != nil {
		f.Fatal(err)
	}
	query := func(name string, typ dnsmessage.Type, edns bool, questions int) []byte {
		b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: 7, RecursionDesired: true})
		b.EnableCompression()
		_ = b.StartQuestions()
		for range questions {
			_ = b.Question(dnsmessage.Question{Name: dnsmessage.MustNewName(name), Type: typ, Class: dnsmessage.ClassINET})
		}
		if edns {
			_ = b.StartAdditionals()
			var opt dnsmessage.ResourceHeader
			_ = opt.SetEDNS0(4096, dnsmessage.RCodeSuccess, false)
			_ = b.OPTResource(opt, dnsmessage.OPTResource{})
		}
		out, err := b.Finish()
		if err != nil {
			f.Fatal(err)
		}
		return out
	}
	for _, q := range [][]byte{
		query("web.shop.svc.cluster.local.", dnsmessage.TypeA, false, 1),
		query("WEB.shop.svc.cluster.local.", dnsmessage.TypeAAAA, true, 1),
		query("shop.svc.cluster.local.", dnsmessage.TypeA, false, 1),
		query("cluster.local.", dnsmessage.TypeSOA, true, 1),
		query("nope.shop.svc.cluster.local.", dnsmessage.TypeALL, false, 1),
		query("example.com.", dnsmessage.TypeA, false, 1),
		query("web.shop.svc.cluster.local.", dnsmessage.TypeA, false, 2),
		{0, 7, 0x80, 0, 0, 1, 0, 0, 0, 0, 0, 0},
		{0, 7},
	} {
		f.Add(q, true)
	}
	f.Fuzz(func(t *testing.T, q []byte, overUDP bool) {
		out, err := z.Answer(q, overUDP)
		if err != nil {
			return
		}
		var qp dnsmessage.Parser
		qh, qerr := qp.Start(q)
		if qerr != nil {
			t.Fatalf("answered a query whose header does not parse: %v", qerr)
		}
		var m dnsmessage.Message
		if err := m.Unpack(out); err != nil {
			t.Fatalf("reply does not parse: %v", err)
		}
		if !m.Response || m.ID != qh.ID || m.OpCode != qh.OpCode {
			t.Fatalf("reply header %+v to query header %+v", m.Header, qh)
		}
		if overUDP {
			limit := maxUDP
			for _, a := range m.Additionals {
				if a.Header.Type == dnsmessage.TypeOPT {
					limit = ednsSize
				}
			}
			if len(out) > limit {
				t.Fatalf("%d-byte UDP reply, limit %d", len(out), limit)
			}
		}
		for _, a := range m.Answers {
			if len(m.Questions) != 1 || !strings.EqualFold(a.Header.Name.String(), m.Questions[0].Name.String()) {
				t.Fatalf("answer for %s to questions %v", a.Header.Name, m.Questions)
			}
			name := strings.ToLower(a.Header.Name.String())
			if _, ok := z.names[name]; !ok && name != z.domain {
				t.Fatalf("answer for %s, which the zone does not hold", name)
			}
		}
	})
}
