package controlplane

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"github.com/ferrymesh/ferry/api/spiffe"
	"log/slog"
	mrand "math/rand/v2"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/ferrymesh/ferry/agent/identity"
	"github.com/ferrymesh/ferry/api/admin"
	"github.com/ferrymesh/ferry/api/ferryv1"
	"google.golang.org/grpc"
)

// maxParallelSigns bounds the certificate requests in flight, so a node with many
// new pods does not flood the operator.
const maxParallelSigns = 8

// Retries of a failed certificate request back off from minRetryBackoff to
// maxRetryBackoff; a held certificate's retries wait at most a tenth of what it has
// left (never less than floorRetryLimit), so a short certificate gets many tries
// between the operator's return and its expiry.
const (
	minRetryBackoff = 250 * time.Millisecond
	maxRetryBackoff = 30 * time.Second
	floorRetryLimit = time.Second
)

// retryLimit is the longest wait between retries for a certificate with left to live.
func retryLimit(left time.Duration) time.Duration {
	return min(max(left/10, floorRetryLimit), maxRetryBackoff)
}

// Certs keeps a certificate for every identity the agent needs, in an
// identity.Store. Keys are ECDSA P-256, generated on the node; only CSRs leave it.
// A certificate is renewed at half its life; the Store swap means new handshakes
// use the new certificate while existing connections carry on.
type Certs struct {
	client   ferryv1.CertificatesClient
	store    *identity.Store
	onChange func()
	log      *slog.Logger

	wake chan struct{}

	mu     sync.Mutex
	bundle []byte
	want   map[string]bool
	certs  map[string]*held
	retry  map[string]retryState
}

type held struct {
	pem      identity.CertPEM
	serial   string
	issued   time.Time
	notAfter time.Time
	renewAt  time.Time
}

type retryState struct {
	at      time.Time
	backoff time.Duration
}

// CertInfo describes one held certificate, as the admin API reports it.
type CertInfo = admin.HeldCert

// NewCerts returns a manager that signs over conn and fills store; onChange runs
// (outside any lock) after each new certificate.
func NewCerts(conn grpc.ClientConnInterface, store *identity.Store, onChange func(), log *slog.Logger) *Certs {
	return &Certs{
		client:   ferryv1.NewCertificatesClient(conn),
		store:    store,
		onChange: onChange,
		log:      log,
		wake:     make(chan struct{}, 1),
		want:     map[string]bool{},
		certs:    map[string]*held{},
		retry:    map[string]retryState{},
	}
}

// Want sets the trust bundle and the identities needed now. Certificates of
// identities no longer wanted are dropped; missing ones are requested.
func (c *Certs) Want(bundle []byte, ids []string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	want := map[string]bool{}
	for _, id := range ids {
		want[id] = true
	}
	changed := !slices.Equal(bundle, c.bundle)
	var roots *x509.CertPool
	if changed {
		roots = x509.NewCertPool()
		roots.AppendCertsFromPEM(bundle)
	}
	for id, h := range c.certs {
		if !want[id] {
			delete(c.certs, id)
			changed = true
			continue
		}
		// A new bundle (another CA, or the operator replaced): certificates that no
		// longer chain to it would fail every handshake; get new ones.
		if roots != nil && !chainsTo(h.pem.Chain, roots) {
			c.log.Info("certificate does not chain to the new trust bundle; requesting another", "identity", id)
			delete(c.certs, id)
		}
	}
	for id := range c.retry {
		if !want[id] {
			delete(c.retry, id)
		}
	}
	prevBundle := c.bundle
	c.bundle, c.want = slices.Clone(bundle), want
	if changed {
		if err := c.publishLocked(); err != nil {
			c.bundle = prevBundle
			return err
		}
	}
	select {
	case c.wake <- struct{}{}:
	default:
	}
	return nil
}

func (c *Certs) publishLocked() error {
	certs := make(map[string]identity.CertPEM, len(c.certs))
	for id, h := range c.certs {
		pem := h.pem
		pem.Issued = h.issued
		certs[id] = pem
	}
	return c.store.Update(c.bundle, certs)
}

// Held lists the certificates held now.
func (c *Certs) Held() []CertInfo {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]CertInfo, 0, len(c.certs))
	for id, h := range c.certs {
		out = append(out, CertInfo{Identity: id, Serial: h.serial, Issued: h.issued, NotAfter: h.notAfter, RenewAt: h.renewAt})
	}
	slices.SortFunc(out, func(a, b CertInfo) int {
		if a.Identity < b.Identity {
			return -1
		}
		if a.Identity > b.Identity {
			return 1
		}
		return 0
	})
	return out
}

// Run requests and renews certificates until ctx ends.
func (c *Certs) Run(ctx context.Context) {
	sem := make(chan struct{}, maxParallelSigns)
	var wg sync.WaitGroup
	defer wg.Wait()
	inflight := map[string]bool{}
	done := make(chan string, maxParallelSigns)
	for {
		due, next := c.due(time.Now())
		for _, id := range due {
			if inflight[id] {
				continue
			}
			select {
			case sem <- struct{}{}:
			default:
				continue // the rest when a slot frees
			}
			inflight[id] = true
			wg.Add(1)
			go func() {
				defer wg.Done()
				c.issue(ctx, id)
				<-sem
				done <- id
			}()
		}
		wait := time.Until(next)
		if next.IsZero() || wait > time.Minute {
			wait = time.Minute
		}
		t := time.NewTimer(max(wait, 10*time.Millisecond))
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case id := <-done:
			delete(inflight, id)
		case <-c.wake:
		case <-t.C:
		}
		t.Stop()
	}
}

// due lists wanted identities without a certificate or past renewal (and not
// waiting on a retry), and the next time one becomes due.
func (c *Certs) due(now time.Time) ([]string, time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []string
	var next time.Time
	soonest := func(t time.Time) {
		if next.IsZero() || t.Before(next) {
			next = t
		}
	}
	if len(c.bundle) == 0 {
		return nil, time.Time{}
	}
	for id := range c.want {
		at := now
		if h, ok := c.certs[id]; ok {
			at = h.renewAt
		}
		if r, ok := c.retry[id]; ok && r.at.After(at) {
			at = r.at
		}
		if !at.After(now) {
			out = append(out, id)
		} else {
			soonest(at)
		}
	}
	slices.Sort(out)
	return out, next
}

func (c *Certs) issue(ctx context.Context, id string) {
	start := time.Now()
	h, err := c.request(ctx, id)
	c.mu.Lock()
	if !c.want[id] {
		c.mu.Unlock()
		return
	}
	if err != nil {
		r := c.retry[id]
		limit := maxRetryBackoff
		if h, ok := c.certs[id]; ok {
			limit = retryLimit(time.Until(h.notAfter))
		}
		r.backoff = min(max(r.backoff*2, minRetryBackoff), limit)
		r.at = time.Now().Add(r.backoff/2 + time.Duration(mrand.Int64N(int64(r.backoff))))
		c.retry[id] = r
		c.mu.Unlock()
		if ctx.Err() == nil {
			c.log.Warn("certificate request failed; will retry", "identity", id, "retry_in", time.Until(r.at).Round(time.Millisecond), "error", err)
		}
		return
	}
	_, renewal := c.certs[id]
	c.certs[id] = h
	delete(c.retry, id)
	err = c.publishLocked()
	c.mu.Unlock()
	if err != nil {
		c.log.Error("certificate not usable", "identity", id, "error", err)
		return
	}
	c.log.Info("certificate issued", "identity", id, "renewal", renewal, "not_after", h.notAfter.Format(time.RFC3339), "took", time.Since(start).Round(time.Millisecond))
	if c.onChange != nil {
		c.onChange()
	}
}

// request makes a key and a CSR for id and has the operator sign it.
func (c *Certs) request(ctx context.Context, id string) (*held, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate key: %w", err)
	}
	csrDER, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return nil, fmt.Errorf("csr: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	asked := time.Now()
	resp, err := c.client.Sign(ctx, &ferryv1.SignRequest{
		Identity: id,
		CsrPem:   pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csrDER}),
	})
	if err != nil {
		return nil, fmt.Errorf("sign: %w", err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("marshal key: %w", err)
	}
	block, _ := pem.Decode(resp.GetCertChainPem())
	if block == nil {
		return nil, fmt.Errorf("sign: no certificate in the answer")
	}
	leaf, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("sign: %w", err)
	}
	if got, err := spiffe.FromCert(leaf); err != nil || got != id {
		return nil, fmt.Errorf("sign: certificate for %s carries %q (%v)", id, got, err)
	}
	// Half life measured from when we asked, not from NotBefore: the CA backdates
	// NotBefore for clock skew, which would make short certificates look half-spent.
	issued := asked
	if leaf.NotBefore.After(issued) {
		issued = leaf.NotBefore
	}
	return &held{
		pem:      identity.CertPEM{Chain: resp.GetCertChainPem(), Key: pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})},
		serial:   leaf.SerialNumber.Text(16),
		issued:   issued,
		notAfter: leaf.NotAfter,
		renewAt:  issued.Add(leaf.NotAfter.Sub(issued) / 2),
	}, nil
}

// chainsTo says whether the leaf of chainPEM verifies against roots, with the rest
// of the chain as intermediates.
func chainsTo(chainPEM []byte, roots *x509.CertPool) bool {
	var certs []*x509.Certificate
	for rest := chainPEM; ; {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return false
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return false
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	_, err := certs[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	return err == nil
}

// Export returns the held certificates with their keys, for the agent's state
// cache (a root-only file on the node, so a restarted agent can serve before the
// operator answers).
func (c *Certs) Export() []*ferryv1.Certificate {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]*ferryv1.Certificate, 0, len(c.certs))
	for id, h := range c.certs {
		out = append(out, &ferryv1.Certificate{Identity: id, CertChainPem: h.pem.Chain, PrivateKeyPem: h.pem.Key})
	}
	slices.SortFunc(out, func(a, b *ferryv1.Certificate) int { return strings.Compare(a.Identity, b.Identity) })
	return out
}

// Preload adopts certificates a previous run kept, skipping expired or unreadable
// ones, and returns how many it took. They are renewed when due like any other; the
// store gets them with the next Want, which brings the trust bundle.
func (c *Certs) Preload(certs []*ferryv1.Certificate) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := time.Now()
	n := 0
	for _, pc := range certs {
		kp, err := tls.X509KeyPair(pc.GetCertChainPem(), pc.GetPrivateKeyPem())
		if err != nil || kp.Leaf == nil || !now.Before(kp.Leaf.NotAfter) {
			continue
		}
		if id, err := spiffe.FromCert(kp.Leaf); err != nil || id != pc.GetIdentity() {
			continue
		}
		// When it was asked for is not known: NotBefore (backdated by the CA) makes
		// the renewal come early rather than late.
		c.certs[pc.GetIdentity()] = &held{
			pem:      identity.CertPEM{Chain: pc.GetCertChainPem(), Key: pc.GetPrivateKeyPem()},
			serial:   kp.Leaf.SerialNumber.Text(16),
			issued:   kp.Leaf.NotBefore,
			notAfter: kp.Leaf.NotAfter,
			renewAt:  kp.Leaf.NotBefore.Add(kp.Leaf.NotAfter.Sub(kp.Leaf.NotBefore) / 2),
		}
		n++
	}
	return n
}
