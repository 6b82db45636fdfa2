package proxy

import (
	"strings"
	"testing"

	"github.com/ferrymesh/ferry/api/mesh"
)

// FuzzNormalizePath: under each escaped-slashes choice, what authorization
// matches and the app receives is one canonical path: normalising it again
// changes nothing, and it holds no empty, "." or ".." segment, query, fragment,
// lower-case escape or (Decode, Reject) encoded slash that a rule could miss.
func FuzzNormalizePath(f *testing.F) {
	for _, s := range []string{"/", "/admin", "//admin", "/./admin", "/x/../admin", "/%61dmin", "/%2e%2e/admin",
		"/admin/", "/admin?x=1", "/admin#frag", "/a%2fb", "/a%2Fb%5c", "/..", "/a/b/..", "/a/.", "/%", "/%g1", "/%7E"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		for _, es := range []mesh.EscapedSlashes{mesh.EscapedKeep, mesh.EscapedDecode, mesh.EscapedReject} {
			checkNormalized(t, in, es)
		}
	})
}

func checkNormalized(t *testing.T, in string, es mesh.EscapedSlashes) {
	out, err := normalizePath(in, es)
	if err != nil {
		return
	}
	again, err := normalizePath(out, es)
	if err != nil || again != out {
		t.Fatalf("%s: %q → %q → %q, %v: not idempotent", es, in, out, again, err)
	}
	if es != mesh.EscapedKeep && (strings.Contains(out, "%2F") || strings.Contains(out, "%5C")) {
		t.Fatalf("%s: %q → %q: an encoded slash is left", es, in, out)
	}
	if es == mesh.EscapedDecode && strings.Contains(out, "\\") {
		t.Fatalf("%s: %q → %q: a backslash is left", es, in, out)
	}
	if !strings.HasPrefix(out, "/") || strings.ContainsAny(out, "?#") {
		t.Fatalf("%q → %q: not a bare absolute path", in, out)
	}
	for i, seg := range strings.Split(strings.TrimSuffix(out[1:], "/"), "/") {
		if (seg == "" && out != "/") || seg == "." || seg == ".." {
			t.Fatalf("%q → %q: segment %d is %q", in, out, i, seg)
		}
	}
	for i := 0; i+2 < len(out); i++ {
		if out[i] == '%' && (strings.ToUpper(out[i+1:i+3]) != out[i+1:i+3] || unreserved(unhex(out[i+1])<<4|unhex(out[i+2]))) {
			t.Fatalf("%q → %q: escape %q is not canonical", in, out, out[i:i+3])
		}
	}
}
