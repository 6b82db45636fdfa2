// This file holds the tunnel server's limits and timeouts (what one peer's
// connection may cost this node before it is cut off) and the typed reasons a TLS
// handshake on the tunnel port is refused.

package tunnel

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"time"
)

// ServerLimits bounds what one tunnel connection may hold or take. Each field's
// zero value means its default (DefaultServerLimits). Within these bounds the
// tunnel's HTTP/2 (h2.go) contains the HTTP/2 flood attacks: rapid reset (handlers
// of streams already reset count against twice MaxConcurrentStreams, and a peer
// that keeps opening refused streams is told GOAWAY ENHANCE_YOUR_CALM), CONTINUATION
// floods (a header block past four times MaxHeaderBytes ends the connection), PING
// and SETTINGS floods (answers are queued for a writer, and a peer that does not
// read them fills a bounded queue and is cut off), HPACK bombs (fields past
// MaxHeaderBytes are dropped while decoding; the stream is answered 431).
type ServerLimits struct {
	// HandshakeTimeout bounds the TLS handshake: a peer that starts one and never
	// finishes it is cut off.
	HandshakeTimeout time.Duration
	// MaxConcurrentStreams is the streams one connection may have open; more are
	// refused (REFUSED_STREAM) until some end.
	MaxConcurrentStreams uint32
	// MaxHeaderBytes bounds a CONNECT's decoded header list (HTTP/2
	// SETTINGS_MAX_HEADER_LIST_SIZE). A CONNECT carries a few short headers; the
	// HTTP requests of an L7 stream travel inside the stream, under the proxy's
	// own limits.
	MaxHeaderBytes int
	// MaxDecoderHeaderTableSize bounds the HPACK dynamic table the peer may make
	// this side keep.
	MaxDecoderHeaderTableSize uint32
	// ReadIdleTimeout: a connection that sends nothing for this long is pinged;
	// with no answer within PingTimeout it is closed. A peer stuck inside a header
	// block (HEADERS without END_HEADERS, then silence) cannot answer, so this also
	// bounds a CONNECT whose headers never finish.
	ReadIdleTimeout time.Duration
	PingTimeout     time.Duration
	// IdleTimeout closes a connection with no open stream for this long (one that
	// never opens any, too). Longer than the pool's idle timeout (90 s), so pooled
	// tunnels are closed by their client.
	IdleTimeout time.Duration
}

// DefaultServerLimits are the limits of a server whose ServerConfig sets none.
func DefaultServerLimits() ServerLimits {
	return ServerLimits{
		HandshakeTimeout:          10 * time.Second,
		MaxConcurrentStreams:      maxStreamsPerConn,
		MaxHeaderBytes:            16 << 10,
		MaxDecoderHeaderTableSize: 4 << 10,
		ReadIdleTimeout:           keepaliveInterval,
		PingTimeout:               keepaliveTimeout,
		IdleTimeout:               serverIdleTimeout,
	}
}

// withDefaults fills the zero fields of l from DefaultServerLimits.
func (l ServerLimits) withDefaults() ServerLimits {
	d := DefaultServerLimits()
	if l.HandshakeTimeout <= 0 {
		l.HandshakeTimeout = d.HandshakeTimeout
	}
	if l.MaxConcurrentStreams == 0 {
		l.MaxConcurrentStreams = d.MaxConcurrentStreams
	}
	if l.MaxHeaderBytes <= 0 {
		l.MaxHeaderBytes = d.MaxHeaderBytes
	}
	if l.MaxDecoderHeaderTableSize == 0 {
		l.MaxDecoderHeaderTableSize = d.MaxDecoderHeaderTableSize
	}
	if l.ReadIdleTimeout <= 0 {
		l.ReadIdleTimeout = d.ReadIdleTimeout
	}
	if l.PingTimeout <= 0 {
		l.PingTimeout = d.PingTimeout
	}
	if l.IdleTimeout <= 0 {
		l.IdleTimeout = d.IdleTimeout
	}
	return l
}

// HandshakeReason says why a tunnel handshake was refused.
type HandshakeReason string

// The reasons a tunnel handshake is refused.
const (
	// HandshakeNoCertificate: the client presented no certificate.
	HandshakeNoCertificate HandshakeReason = "no_certificate"
	// HandshakeCertificateExpired: the client's certificate is expired (or not yet
	// valid), even if the mesh's CA signed it.
	HandshakeCertificateExpired HandshakeReason = "certificate_expired"
	// HandshakeUnknownAuthority: the certificate does not chain to the trust bundle.
	HandshakeUnknownAuthority HandshakeReason = "unknown_authority"
	// HandshakeBadCertificate: the chain is valid but the certificate is not a
	// workload's (usage, or a SPIFFE ID that does not parse).
	HandshakeBadCertificate HandshakeReason = "bad_certificate"
	// HandshakeIdentityRefused: a valid identity that is not the one the mesh gives
	// the workload at the client's address (another trust domain included).
	HandshakeIdentityRefused HandshakeReason = "identity_refused"
	// HandshakeTimeout: the handshake did not finish within HandshakeTimeout.
	HandshakeTimeout HandshakeReason = "handshake_timeout"
	// HandshakeFailed: anything else (not TLS, TLS below 1.3, no common ALPN, the
	// peer went away).
	HandshakeFailed HandshakeReason = "handshake_failed"
)

// HandshakeError is a refused tunnel handshake: a typed reason, and a detail for
// people ("certificate expired at …").
type HandshakeError struct {
	Reason HandshakeReason
	Err    error
}

func (e *HandshakeError) Error() string {
	return fmt.Sprintf("tunnel handshake %s: %v", e.Reason, e.Err)
}

func (e *HandshakeError) Unwrap() error { return e.Err }

// identityError is a refusal by ServerConfig.Authorize, told apart from the chain
// checks of the TLS configuration.
type identityError struct{ err error }

func (e *identityError) Error() string { return e.err.Error() }
func (e *identityError) Unwrap() error { return e.err }

// errNoCertificate is a client that presented no certificate.
var errNoCertificate = errors.New("client presented no certificate")

// handshakeError classifies err, a failed handshake within ctx (the handshake's
// own deadline).
func handshakeError(ctx context.Context, err error) *HandshakeError {
	var (
		invalid x509.CertificateInvalidError
		unknown x509.UnknownAuthorityError
		ident   *identityError
		ne      net.Error
	)
	reason := HandshakeFailed
	switch {
	case errors.Is(err, errNoCertificate):
		reason = HandshakeNoCertificate
	case errors.As(err, &ident):
		reason = HandshakeIdentityRefused
	case errors.As(err, &invalid) && invalid.Reason == x509.Expired:
		reason = HandshakeCertificateExpired
	case errors.As(err, &unknown):
		reason = HandshakeUnknownAuthority
	case errors.As(err, &invalid):
		reason = HandshakeBadCertificate
	case errors.Is(ctx.Err(), context.DeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		reason = HandshakeTimeout
	}
	return &HandshakeError{Reason: reason, Err: err}
}

// verifyClient wraps a listener configuration's checks so a refusal says which
// check refused: no certificate at all, the chain (inner), or authorize.
func verifyClient(c *tls.Config, authorize func(tls.ConnectionState) error) {
	// Go's own "client didn't provide a certificate" is an untyped error: the
	// check is made here instead, and answered with the same alert class.
	if c.ClientAuth == tls.RequireAnyClientCert {
		c.ClientAuth = tls.RequestClientCert
	}
	inner := c.VerifyConnection
	c.VerifyConnection = func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 {
			return errNoCertificate
		}
		if inner != nil {
			if err := inner(cs); err != nil {
				return err
			}
		}
		if authorize != nil {
			if err := authorize(cs); err != nil {
				return &identityError{err}
			}
		}
		return nil
	}
}
