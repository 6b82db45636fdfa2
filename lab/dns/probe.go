package dns

import (
	"fmt"
	"net"
	"net/netip"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// Probe asks the server at addr, over UDP from the caller's network namespace, for the
// SOA of domain and checks the answer: it tells a responder that serves apart from a
// port that is not open yet.
func Probe(addr netip.AddrPort, domain string, timeout time.Duration) error {
	name, err := dnsmessage.NewName(canonical(domain))
	if err != nil {
		return fmt.Errorf("probe: %w", err)
	}
	q := dnsmessage.Message{
		Header:    dnsmessage.Header{ID: uint16(time.Now().UnixNano())},
		Questions: []dnsmessage.Question{{Name: name, Type: dnsmessage.TypeSOA, Class: dnsmessage.ClassINET}},
	}
	msg, err := q.Pack()
	if err != nil {
		return fmt.Errorf("probe: %w", err)
	}
	c, err := net.DialTimeout("udp", addr.String(), timeout)
	if err != nil {
		return fmt.Errorf("probe %s: %w", addr, err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(timeout))
	if _, err := c.Write(msg); err != nil {
		return fmt.Errorf("probe %s: %w", addr, err)
	}
	buf := make([]byte, 1500)
	n, err := c.Read(buf)
	if err != nil {
		return fmt.Errorf("probe %s: %w", addr, err)
	}
	var m dnsmessage.Message
	if err := m.Unpack(buf[:n]); err != nil {
		return fmt.Errorf("probe %s: %w", addr, err)
	}
	if m.ID != q.ID || m.RCode != dnsmessage.RCodeSuccess || len(m.Answers) != 1 {
		return fmt.Errorf("probe %s: SOA of %s: rcode %v with %d answers", addr, domain, m.RCode, len(m.Answers))
	}
	return nil
}
