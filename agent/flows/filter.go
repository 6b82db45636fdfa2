package flows

import (
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/ferrymesh/ferry/api/ferryv1"
)

// Match reports whether f passes flt: within a field any value matches, across
// fields all set fields must match. A nil filter matches everything.
func Match(f *ferryv1.Flow, flt *ferryv1.FlowFilter) bool {
	if flt == nil {
		return true
	}
	src, dst, h := f.GetSource(), f.GetDestination(), f.GetHttp()
	switch {
	case !anyOf(flt.GetFromPod(), func(p string) bool { return podIs(src, p) }),
		!anyOf(flt.GetToPod(), func(p string) bool { return podIs(dst, p) }),
		!anyOf(flt.GetNamespace(), func(n string) bool { return src.GetNamespace() == n || dst.GetNamespace() == n }),
		!anyOf(flt.GetFromIdentity(), func(id string) bool { return identityIs(src.GetIdentity(), id) }),
		!anyOf(flt.GetToIdentity(), func(id string) bool { return identityIs(dst.GetIdentity(), id) }),
		!anyOf(flt.GetVerdict(), func(v string) bool { return strings.EqualFold(VerdictName(f.GetVerdict()), v) }),
		!anyOf(flt.GetProtocol(), func(p string) bool { return strings.EqualFold(f.GetProtocol(), p) }),
		!anyOf(flt.GetPort(), func(p uint32) bool { return dst.GetPort() == p }),
		!anyOf(flt.GetHttpStatus(), func(s uint32) bool { return h != nil && h.GetStatus() == s }),
		!anyOf(flt.GetHttpStatusRange(), func(r *ferryv1.StatusRange) bool {
			return h != nil && h.GetStatus() >= r.GetMin() && h.GetStatus() <= r.GetMax()
		}),
		!anyOf(flt.GetHttpMethod(), func(m string) bool { return h != nil && strings.EqualFold(h.GetMethod(), m) }),
		!anyOf(flt.GetHttpPathPrefix(), func(p string) bool { return h != nil && strings.HasPrefix(h.GetPath(), p) }),
		!anyOf(flt.GetGrpcStatus(), func(c string) bool { return h.GetGrpcStatus() != "" && h.GetGrpcStatus() == c }),
		!anyOf(flt.GetRoute(), func(r string) bool { return routeIs(h.GetRoute(), r) }),
		!anyOf(flt.GetNode(), func(n string) bool { return f.GetNode() == n }):
		return false
	}
	return true
}

// anyOf is true for an unset field (no values) or when one value matches.
func anyOf[T any](vals []T, match func(T) bool) bool {
	return len(vals) == 0 || slices.ContainsFunc(vals, match)
}

// podIs matches "name" against the pod name alone and "namespace/name" against both.
func podIs(e *ferryv1.Endpoint, want string) bool {
	if e.GetPod() == "" {
		return false
	}
	if ns, name, ok := strings.Cut(want, "/"); ok {
		return e.GetNamespace() == ns && e.GetPod() == name
	}
	return e.GetPod() == want
}

// routeIs matches a route as flows name it ("HTTPRoute default/canary") against the
// same text, any case for the kind, or against "namespace/name" alone.
func routeIs(route, want string) bool {
	if route == "" {
		return false
	}
	kind, name, _ := strings.Cut(route, " ")
	if wk, wn, ok := strings.Cut(want, " "); ok {
		return strings.EqualFold(kind, wk) && name == wn
	}
	return name == want
}

// identityIs matches a whole SPIFFE ID, or its path ("ns/x/sa/y") or a service
// account in the form "namespace/serviceaccount".
func identityIs(id, want string) bool {
	if id == "" {
		return false
	}
	if id == want {
		return true
	}
	if strings.HasSuffix(id, "/"+want) && strings.HasPrefix(want, "ns/") {
		return true
	}
	if ns, sa, ok := strings.Cut(want, "/"); ok && !strings.Contains(sa, "/") {
		return strings.HasSuffix(id, "/ns/"+ns+"/sa/"+sa)
	}
	return false
}

// VerdictName is the lower-case name users type and see: forwarded, dropped, error.
func VerdictName(v ferryv1.Verdict) string {
	switch v {
	case ferryv1.Verdict_VERDICT_FORWARDED:
		return "forwarded"
	case ferryv1.Verdict_VERDICT_DROPPED:
		return "dropped"
	case ferryv1.Verdict_VERDICT_ERROR:
		return "error"
	}
	return "unknown"
}

// CheckFilter rejects values no flow can have, so a typo is an error rather than an
// empty result.
func CheckFilter(flt *ferryv1.FlowFilter) error {
	for _, v := range flt.GetVerdict() {
		switch strings.ToLower(v) {
		case "forwarded", "dropped", "error":
		default:
			return fmt.Errorf("verdict %q: want forwarded, dropped or error", v)
		}
	}
	for _, p := range flt.GetProtocol() {
		switch strings.ToLower(p) {
		case "tcp", "http", "grpc":
		default:
			return fmt.Errorf("protocol %q: want tcp, http or grpc", p)
		}
	}
	for _, r := range flt.GetHttpStatusRange() {
		if r.GetMin() > r.GetMax() || r.GetMax() > 999 {
			return fmt.Errorf("http status range %d-%d: want MIN-MAX with MIN <= MAX <= 999", r.GetMin(), r.GetMax())
		}
	}
	for _, c := range flt.GetGrpcStatus() {
		if n, err := strconv.ParseUint(c, 10, 8); err != nil || n > 16 {
			return fmt.Errorf("grpc status %q: want a code from 0 (OK) to 16", c)
		}
	}
	return nil
}

// ParseStatusRange reads an HTTP status filter: a code ("404"), a range ("500-599")
// or a class ("5xx").
func ParseStatusRange(s string) (*ferryv1.StatusRange, error) {
	bad := fmt.Errorf("http status %q: want a code (404), a range (500-599) or a class (5xx)", s)
	if len(s) == 3 && strings.HasSuffix(strings.ToLower(s), "xx") && s[0] >= '1' && s[0] <= '9' {
		lo := uint32(s[0]-'0') * 100
		return &ferryv1.StatusRange{Min: lo, Max: lo + 99}, nil
	}
	lo, hi, isRange := strings.Cut(s, "-")
	if !isRange {
		hi = lo
	}
	a, err1 := strconv.ParseUint(strings.TrimSpace(lo), 10, 16)
	b, err2 := strconv.ParseUint(strings.TrimSpace(hi), 10, 16)
	if err1 != nil || err2 != nil || a > b || b > 999 {
		return nil, bad
	}
	return &ferryv1.StatusRange{Min: uint32(a), Max: uint32(b)}, nil
}
