package mesh

import "fmt"

// EscapedSlashes is what request path normalisation does with an encoded slash or
// backslash (%2F, %5C): MeshConfig.escaped_slashes, which the operator sets and the
// node proxy applies.
type EscapedSlashes string

// The choices of MeshConfig.escaped_slashes ("" is Keep).
const (
	// EscapedKeep leaves %2F and %5C encoded: a character of a segment, distinct
	// from "/", for apps that tell them apart.
	EscapedKeep EscapedSlashes = "Keep"
	// EscapedDecode decodes them, and makes a backslash a separator as "/" is,
	// before slashes are merged and "." and ".." resolved: for apps that decode
	// the path before they route it.
	EscapedDecode EscapedSlashes = "Decode"
	// EscapedReject answers a request whose path holds one 400.
	EscapedReject EscapedSlashes = "Reject"
)

// ParseEscapedSlashes reads MeshConfig.escaped_slashes; "" is Keep.
func ParseEscapedSlashes(s string) (EscapedSlashes, error) {
	switch e := EscapedSlashes(s); e {
	case "":
		return EscapedKeep, nil
	case EscapedKeep, EscapedDecode, EscapedReject:
		return e, nil
	}
	return "", fmt.Errorf("%q is not %s, %s or %s", s, EscapedKeep, EscapedDecode, EscapedReject)
}
