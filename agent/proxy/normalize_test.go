package proxy

import (
	"net/http"
	"net/http/httptest"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/ferrymesh/ferry/api/mesh"
)

func TestNormalizePathEscapedSlashes(t *testing.T) {
	for _, tc := range []struct {
		in                   string
		keep, decode, reject string // "" for an error
	}{
		{in: "/a%2fb", keep: "/a%2Fb", decode: "/a/b"},
		{in: "/a%5cb", keep: "/a%5Cb", decode: "/a/b"},
		{in: "/x%2F..%2Fadmin", keep: "/x%2F..%2Fadmin", decode: "/admin"},
		{in: "/%2Fadmin", keep: "/%2Fadmin", decode: "/admin"},
		{in: "/a\\..\\admin", keep: "/a\\..\\admin", decode: "/admin", reject: "/a\\..\\admin"},
		{in: "/a%252Fb", keep: "/a%252Fb", decode: "/a%252Fb", reject: "/a%252Fb"}, // decoded once, never twice
		{in: "/plain//path", keep: "/plain/path", decode: "/plain/path", reject: "/plain/path"},
	} {
		for es, want := range map[mesh.EscapedSlashes]string{mesh.EscapedKeep: tc.keep, mesh.EscapedDecode: tc.decode, mesh.EscapedReject: tc.reject} {
			got, err := normalizePath(tc.in, es)
			if want == "" {
				if pe, ok := err.(*PathError); !ok || !pe.EscapedSlash {
					t.Errorf("%s %q = %q, %v; want an escaped-slash error", es, tc.in, got, err)
				}
				continue
			}
			if err != nil || got != want {
				t.Errorf("%s %q = %q, %v; want %q", es, tc.in, got, err, want)
			}
		}
	}
	for _, s := range []string{"", "Keep", "Decode", "Reject"} {
		if _, err := mesh.ParseEscapedSlashes(s); err != nil {
			t.Errorf("%q: %v", s, err)
		}
	}
	if _, err := mesh.ParseEscapedSlashes("decode"); err == nil {
		t.Error("decode in lower case: no error")
	}
}

// A Deny of /admin holds against every spelling of it under each choice of
// escaped slashes, with case-insensitive paths on; b's app receives the
// normalised path, in the case it was sent.
func TestL7DenyUnderPathChoices(t *testing.T) {
	always := []string{"/admin", "/admin/", "//admin", "/./admin", "/x/../admin", "/%61dmin", "/ADMIN", "/Admin/x", "/admin#frag", "/admin?x=1"}
	for _, tc := range []struct {
		es mesh.EscapedSlashes
		// denied: 403 by the policy; refused: 400 by the mesh; allowed: reach the app, seen as
		allowed map[string]string
		denied  []string
		refused []string
	}{
		{es: mesh.EscapedKeep, denied: always, allowed: map[string]string{"/%2Fadmin": "/%2Fadmin", "/x%2F..%2Fadmin": "/x%2F..%2Fadmin", "/Public//A": "/Public/A"}},
		{es: mesh.EscapedDecode, denied: append([]string{"/%2Fadmin", "/x%2F..%2Fadmin", "/x%5C..%5Cadmin", "/x\\..\\ADMIN"}, always...), allowed: map[string]string{"/a%2Fb": "/a/b", "/Public//A": "/Public/A"}},
		{es: mesh.EscapedReject, denied: always, refused: []string{"/%2Fadmin", "/x%2F..%2Fadmin", "/a%5cb"}, allowed: map[string]string{"/Public//A": "/Public/A"}},
	} {
		t.Run(string(tc.es), func(t *testing.T) {
			tp := newTestProxy(t)
			obs := &decisions{}
			tp.cfg.Observer, tp.conns.obs = obs, obs
			var mu sync.Mutex
			var seen []string
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				mu.Lock()
				seen = append(seen, r.RequestURI)
				mu.Unlock()
			}))
			t.Cleanup(srv.Close)
			tp.netB.app = netip.MustParseAddrPort(srv.Listener.Addr().String())
			tp.SetPathOptions(PathOptions{EscapedSlashes: tc.es, CaseInsensitive: true})
			tp.SetAuthorization([]AuthzPolicy{{Name: "default/no-admin", Action: AuthzDeny, Workloads: []string{"ub"},
				Rules: []AuthzRule{{To: []AuthzOperation{{Paths: []string{"/admin", "/admin/*"}}}}}}})
			send := inboundHTTP(t, tp)
			for _, p := range tc.denied {
				if s := send(p); s != http.StatusForbidden {
					t.Errorf("%s: %d, want 403", p, s)
				}
			}
			for _, p := range tc.refused {
				if s := send(p); s != http.StatusBadRequest {
					t.Errorf("%s: %d, want 400", p, s)
				}
			}
			var want []string
			for p, as := range tc.allowed {
				if s := send(p); s != http.StatusOK {
					t.Errorf("%s: %d, want 200", p, s)
				}
				want = append(want, as)
			}
			mu.Lock()
			defer mu.Unlock()
			slices.Sort(want)
			slices.Sort(seen)
			if strings.Join(seen, " ") != strings.Join(want, " ") {
				t.Fatalf("the app saw %q; want only the allowed requests, normalised: %q", seen, want)
			}
		})
	}
}
