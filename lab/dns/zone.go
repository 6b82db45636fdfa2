// Package dns answers DNS queries for the lab's cluster zone (cluster.local): a
// Service's name resolves to its cluster IPs, as CoreDNS's kubernetes plugin answers in
// a cluster. It knows only its zone and never forwards: a name outside it is REFUSED.
package dns

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"golang.org/x/net/dns/dnsmessage"
)

// DefaultDomain is the cluster domain, as kubelet's --cluster-domain defaults it.
const DefaultDomain = "cluster.local"

// TTL is the time to live of every answer, in seconds: CoreDNS's kubernetes plugin
// default, short so that a changed lab is seen soon.
const TTL = 5

// Service is one Service of the zone: <Name>.<Namespace>.svc.<domain>.
type Service struct {
	Name      string
	Namespace string
	// IPs are the cluster IPs: IPv4 ones answer A queries, IPv6 ones AAAA.
	IPs []netip.Addr
}

// Zone is the set of names a responder answers for. It is immutable, so one Zone
// serves any number of goroutines.
type Zone struct {
	domain string // lower case, with the final dot
	names  map[string][]netip.Addr
	// parents are the names above a Service that exist with no record of their own
	// (svc.<domain>, <ns>.svc.<domain>): NOERROR with no answer, not NXDOMAIN.
	parents map[string]bool
	soa     dnsmessage.SOAResource
}

// NewZone builds the zone of domain (DefaultDomain when empty) holding services.
func NewZone(domain string, services []Service) (*Zone, error) {
	if domain == "" {
		domain = DefaultDomain
	}
	domain = canonical(domain)
	z := &Zone{domain: domain, names: map[string][]netip.Addr{}, parents: map[string]bool{domain: true, "svc." + domain: true}}
	for _, s := range services {
		if s.Name == "" || s.Namespace == "" {
			return nil, fmt.Errorf("zone: service %q in namespace %q: name and namespace are required", s.Name, s.Namespace)
		}
		ns := canonical(s.Namespace + ".svc." + domain)
		name := strings.ToLower(s.Name) + "." + ns
		if _, dup := z.names[name]; dup {
			return nil, fmt.Errorf("zone: service %s/%s defined twice", s.Namespace, s.Name)
		}
		z.names[name] = append([]netip.Addr(nil), s.IPs...)
		z.parents[ns] = true
	}
	var err error
	if z.soa, err = soa(domain); err != nil {
		return nil, err
	}
	return z, nil
}

// Domain is the zone's domain, with the final dot.
func (z *Zone) Domain() string { return z.domain }

// canonical is name in lower case with one final dot.
func canonical(name string) string { return strings.ToLower(strings.TrimSuffix(name, ".")) + "." }

func soa(domain string) (dnsmessage.SOAResource, error) {
	ns, err := dnsmessage.NewName("ns.dns." + domain)
	if err != nil {
		return dnsmessage.SOAResource{}, fmt.Errorf("zone: %w", err)
	}
	mbox, err := dnsmessage.NewName("hostmaster." + domain)
	if err != nil {
		return dnsmessage.SOAResource{}, fmt.Errorf("zone: %w", err)
	}
	return dnsmessage.SOAResource{NS: ns, MBox: mbox, Serial: 1, Refresh: 7200, Retry: 1800, Expire: 86400, MinTTL: TTL}, nil
}

// maxUDP is the largest reply over UDP to a query without EDNS (RFC 1035).
const maxUDP = 512

// ednsSize is the UDP payload size this responder offers and accepts at most, the
// size DNS flag day 2020 recommends.
const ednsSize = 1232

// Answer builds the reply to one query message. overUDP limits the reply to what the
// client accepts over UDP (512 bytes, or its EDNS size), setting TC when the answer
// does not fit so that the client asks again over TCP. A message that cannot be parsed
// at all gets no reply (nil, error).
func (z *Zone) Answer(query []byte, overUDP bool) ([]byte, error) {
	var p dnsmessage.Parser
	h, err := p.Start(query)
	if err != nil {
		return nil, fmt.Errorf("parse query: %w", err)
	}
	if h.Response {
		return nil, errors.New("parse query: a response, not a query")
	}
	qs, err := p.AllQuestions()
	if err != nil {
		return z.reply(h, nil, dnsmessage.RCodeFormatError, false, nil, nil, maxUDP)
	}
	limit := maxUDP
	edns := false
	if err := p.SkipAllAnswers(); err == nil {
		if err := p.SkipAllAuthorities(); err == nil {
			for {
				ah, err := p.AdditionalHeader()
				if err != nil {
					break
				}
				if ah.Type == dnsmessage.TypeOPT {
					edns = true
					if size := int(ah.Class); size > limit {
						limit = min(size, ednsSize)
					}
				}
				if err := p.SkipAdditional(); err != nil {
					break
				}
			}
		}
	}
	if !overUDP {
		limit = 65535
	}
	switch {
	case h.OpCode != 0:
		return z.reply(h, qs, dnsmessage.RCodeNotImplemented, edns, nil, nil, limit)
	case len(qs) != 1:
		return z.reply(h, qs, dnsmessage.RCodeFormatError, edns, nil, nil, limit)
	}
	q := qs[0]
	name := strings.ToLower(q.Name.String())
	if q.Class != dnsmessage.ClassINET && q.Class != dnsmessage.ClassANY {
		return z.reply(h, qs, dnsmessage.RCodeRefused, edns, nil, nil, limit)
	}
	if name != z.domain && !strings.HasSuffix(name, "."+z.domain) {
		// Not ours, and there is nowhere to forward it to: say so at once.
		return z.reply(h, qs, dnsmessage.RCodeRefused, edns, nil, nil, limit)
	}
	var answers []dnsmessage.Resource
	ips, isService := z.names[name]
	switch {
	case isService:
		for _, ip := range ips {
			rh := dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET, TTL: TTL}
			switch {
			case ip.Is4() && (q.Type == dnsmessage.TypeA || q.Type == dnsmessage.TypeALL):
				rh.Type = dnsmessage.TypeA
				answers = append(answers, dnsmessage.Resource{Header: rh, Body: &dnsmessage.AResource{A: ip.As4()}})
			case ip.Is6() && (q.Type == dnsmessage.TypeAAAA || q.Type == dnsmessage.TypeALL):
				rh.Type = dnsmessage.TypeAAAA
				answers = append(answers, dnsmessage.Resource{Header: rh, Body: &dnsmessage.AAAAResource{AAAA: ip.As16()}})
			}
		}
	case name == z.domain && (q.Type == dnsmessage.TypeSOA || q.Type == dnsmessage.TypeALL):
		rh := dnsmessage.ResourceHeader{Name: q.Name, Type: dnsmessage.TypeSOA, Class: dnsmessage.ClassINET, TTL: TTL}
		answers = append(answers, dnsmessage.Resource{Header: rh, Body: &z.soa})
	case z.parents[name]:
	default:
		return z.reply(h, qs, dnsmessage.RCodeNameError, edns, nil, z.negative(), limit)
	}
	var auth []dnsmessage.Resource
	if len(answers) == 0 {
		auth = z.negative() // NODATA: the name exists, not with this type
	}
	return z.reply(h, qs, dnsmessage.RCodeSuccess, edns, answers, auth, limit)
}

// negative is the authority section of a negative answer: the zone's SOA, whose
// minimum TTL bounds how long a resolver caches the absence (RFC 2308).
func (z *Zone) negative() []dnsmessage.Resource {
	name := dnsmessage.MustNewName(z.domain)
	return []dnsmessage.Resource{{
		Header: dnsmessage.ResourceHeader{Name: name, Type: dnsmessage.TypeSOA, Class: dnsmessage.ClassINET, TTL: TTL},
		Body:   &z.soa,
	}}
}

// reply packs a response to the query with header h; when it is longer than limit it
// is sent truncated: question only (or not even that, when the question section
// alone is too long), TC set.
func (z *Zone) reply(h dnsmessage.Header, qs []dnsmessage.Question, rc dnsmessage.RCode, edns bool, answers, auth []dnsmessage.Resource, limit int) ([]byte, error) {
	authoritative := rc == dnsmessage.RCodeSuccess || rc == dnsmessage.RCodeNameError
	m := dnsmessage.Message{
		Header: dnsmessage.Header{
			ID: h.ID, Response: true, OpCode: h.OpCode, Authoritative: authoritative,
			RecursionDesired: h.RecursionDesired, RCode: rc,
		},
		Questions:   qs,
		Answers:     answers,
		Authorities: auth,
	}
	if edns {
		var opt dnsmessage.ResourceHeader
		if err := opt.SetEDNS0(ednsSize, dnsmessage.RCodeSuccess, false); err != nil {
			return nil, fmt.Errorf("pack reply: %w", err)
		}
		m.Additionals = []dnsmessage.Resource{{Header: opt, Body: &dnsmessage.OPTResource{}}}
	}
	out, err := m.Pack()
	if err != nil {
		return nil, fmt.Errorf("pack reply: %w", err)
	}
	if len(out) > limit {
		m.Header.Truncated = true
		m.Answers, m.Authorities = nil, nil
		if out, err = m.Pack(); err != nil {
			return nil, fmt.Errorf("pack reply: %w", err)
		}
	}
	if len(out) > limit {
		// A query of many questions: not even their echo fits, so the header
		// alone says what went wrong.
		m.Questions = nil
		if out, err = m.Pack(); err != nil {
			return nil, fmt.Errorf("pack reply: %w", err)
		}
	}
	return out, nil
}
