package proxy

import (
	"fmt"
	"net/http"
	"net/url"
	"strings"

	"github.com/ferrymesh/ferry/api/mesh"
)

// PathOptions are the mesh's choices for matching request paths (MeshConfig).
type PathOptions struct {
	EscapedSlashes mesh.EscapedSlashes
	// CaseInsensitive: policy paths match request paths whatever their case; the
	// app still receives the path in the case it was sent.
	CaseInsensitive bool
}

// SetPathOptions replaces how request paths are normalised and matched. The
// agent sets them with the rest of a state, before its policies.
func (p *Proxy) SetPathOptions(o PathOptions) {
	if o.EscapedSlashes == "" {
		o.EscapedSlashes = mesh.EscapedKeep
	}
	p.mu.Lock()
	p.paths = o
	p.mu.Unlock()
}

func (p *Proxy) pathOptions() PathOptions {
	p.mu.RLock()
	defer p.mu.RUnlock()
	return p.paths
}

// PathError is a request path the proxy refuses to carry (400): malformed, or,
// under Reject, holding an encoded slash.
type PathError struct {
	// EscapedSlash: the path holds %2F or %5C and the mesh rejects those.
	EscapedSlash bool
	Why          string
}

func (e *PathError) Error() string { return e.Why }

var (
	errNotAbsolute  = &PathError{Why: "path does not start with /"}
	errBadEscape    = &PathError{Why: "bad percent-encoding in path"}
	errEscapedSlash = &PathError{EscapedSlash: true, Why: "encoded slash or backslash (%2F, %5C) in path: the mesh rejects them (escaped_slashes Reject)"}
)

// normalizePath is the form of a request's path that authorization rules see and
// the app receives, so the two never read a path differently: the fragment and
// query cut off, percent-encoded unreserved characters decoded (and other escapes
// in upper case, so %2f and %2F are one), an encoded "/" or "\" treated as es
// says, "//" merged, and "." and ".." segments resolved ("/.." stays at the
// root). A trailing "/" is kept.
func normalizePath(escaped string, es mesh.EscapedSlashes) (string, error) {
	if i := strings.IndexAny(escaped, "?#"); i >= 0 {
		escaped = escaped[:i]
	}
	if !strings.HasPrefix(escaped, "/") {
		return "", errNotAbsolute
	}
	var b strings.Builder
	for i := 0; i < len(escaped); i++ {
		c := escaped[i]
		if c != '%' {
			if c == '\\' && es == mesh.EscapedDecode {
				c = '/' // a separator to the apps this mode is for
			}
			b.WriteByte(c)
			continue
		}
		if i+2 >= len(escaped) || !isHex(escaped[i+1]) || !isHex(escaped[i+2]) {
			return "", errBadEscape
		}
		d := unhex(escaped[i+1])<<4 | unhex(escaped[i+2])
		switch {
		case unreserved(d):
			b.WriteByte(d)
		case (d == '/' || d == '\\') && es == mesh.EscapedDecode:
			b.WriteByte('/')
		case (d == '/' || d == '\\') && es == mesh.EscapedReject:
			return "", errEscapedSlash
		default:
			b.WriteByte('%')
			b.WriteString(strings.ToUpper(escaped[i+1 : i+3]))
		}
		i += 2
	}
	decoded := b.String()
	var segs []string
	for _, s := range strings.Split(decoded, "/") {
		switch s {
		case "", ".":
		case "..":
			if len(segs) > 0 {
				segs = segs[:len(segs)-1]
			}
		default:
			segs = append(segs, s)
		}
	}
	out := "/" + strings.Join(segs, "/")
	last := decoded[strings.LastIndexByte(decoded, '/')+1:]
	if len(segs) > 0 && (last == "" || last == "." || last == "..") {
		out += "/"
	}
	return out, nil
}

// normalizeRequest rewrites r's path to normalizePath's form, from the request
// target as the client sent it (r.URL has decoded it already, %2F included). A
// CONNECT's authority and OPTIONS' "*" have no path to normalise.
func normalizeRequest(r *http.Request, es mesh.EscapedSlashes) error {
	if r.Method == http.MethodConnect || r.RequestURI == "*" {
		return nil
	}
	raw := r.RequestURI
	if !strings.HasPrefix(raw, "/") {
		raw = r.URL.EscapedPath() // absolute form, or a request made here
		if r.URL.RawQuery != "" {
			raw += "?" + r.URL.RawQuery
		}
	}
	raw, _, _ = strings.Cut(raw, "#")
	norm, err := normalizePath(raw, es)
	if err != nil {
		return err
	}
	path, err := url.PathUnescape(norm)
	if err != nil {
		return &PathError{Why: fmt.Sprintf("path: %v", err)}
	}
	query := ""
	if i := strings.IndexByte(raw, '?'); i >= 0 {
		query = raw[i+1:]
	}
	r.URL.Path, r.URL.RawPath, r.URL.RawQuery, r.URL.Fragment = path, norm, query, ""
	if r.RequestURI != "" {
		r.RequestURI = r.URL.RequestURI()
	}
	return nil
}

func unreserved(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '.' || c == '_' || c == '~'
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

func unhex(c byte) byte {
	switch {
	case '0' <= c && c <= '9':
		return c - '0'
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10
	}
	return c - 'A' + 10
}
