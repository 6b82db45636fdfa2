package server

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/ferrymesh/ferry/internal/atomicfile"
	authnv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// Audience is the audience agents' projected service-account tokens are issued for.
const Audience = "ferry-operator"

// NodeNameExtra is the user extra a bound pod token carries: the node of the pod.
const NodeNameExtra = "authentication.kubernetes.io/node-name"

// ErrUnauthenticated is a token that does not prove an agent on some node.
var ErrUnauthenticated = errors.New("unauthenticated")

// TokenReviewer authenticates agents with the Kubernetes TokenReview API: the token
// must be valid for Audience, belong to the agent's service account, and be bound to
// a pod scheduled on a node, whose name it returns. Results are cached briefly so
// a burst of certificate requests costs one review.
type TokenReviewer struct {
	client kubernetes.Interface
	// user is the agent's service account, "system:serviceaccount:<ns>:<name>"; ""
	// accepts any service account (tests only).
	user string
	ttl  time.Duration

	mu    sync.Mutex
	cache map[[32]byte]reviewed
}

type reviewed struct {
	node    string
	expires time.Time
}

// NewTokenReviewer checks tokens as agentNamespace/agentServiceAccount.
func NewTokenReviewer(client kubernetes.Interface, agentNamespace, agentServiceAccount string) *TokenReviewer {
	user := ""
	if agentServiceAccount != "" {
		user = "system:serviceaccount:" + agentNamespace + ":" + agentServiceAccount
	}
	return &TokenReviewer{client: client, user: user, ttl: 30 * time.Second, cache: map[[32]byte]reviewed{}}
}

// Authenticate returns the node of the agent that holds token.
func (r *TokenReviewer) Authenticate(ctx context.Context, token string) (string, error) {
	h := sha256.Sum256([]byte(token))
	now := time.Now()
	r.mu.Lock()
	if c, ok := r.cache[h]; ok && now.Before(c.expires) {
		r.mu.Unlock()
		return c.node, nil
	}
	r.mu.Unlock()
	tr, err := r.client.AuthenticationV1().TokenReviews().Create(ctx, &authnv1.TokenReview{
		Spec: authnv1.TokenReviewSpec{Token: token, Audiences: []string{Audience}},
	}, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("token review: %w", err)
	}
	st := tr.Status
	if !st.Authenticated {
		return "", fmt.Errorf("%w: token review: %s", ErrUnauthenticated, orDefault(st.Error, "not authenticated"))
	}
	if !contains(st.Audiences, Audience) {
		return "", fmt.Errorf("%w: token is not for audience %s", ErrUnauthenticated, Audience)
	}
	if r.user != "" && st.User.Username != r.user {
		return "", fmt.Errorf("%w: %s is not the agent's service account %s", ErrUnauthenticated, st.User.Username, r.user)
	}
	nodes := st.User.Extra[NodeNameExtra]
	if len(nodes) != 1 || nodes[0] == "" {
		return "", fmt.Errorf("%w: token is not bound to a pod on a node (no %s)", ErrUnauthenticated, NodeNameExtra)
	}
	r.mu.Lock()
	if len(r.cache) > 10000 {
		clear(r.cache) // bounded: a flood of distinct tokens cannot grow it forever
	}
	r.cache[h] = reviewed{node: nodes[0], expires: now.Add(r.ttl)}
	r.mu.Unlock()
	return nodes[0], nil
}

// NodeTokens authenticates agents in local mode: the operator writes one random
// token per node into a folder (<dir>/<node>, mode 0600) and the lab hands each
// agent its node's file as --token-file.
type NodeTokens struct {
	dir string

	mu     sync.Mutex
	tokens map[string]string // token -> node
}

// NewNodeTokens keeps node tokens in dir, reading those already there so agents keep
// working across operator restarts.
func NewNodeTokens(dir string) (*NodeTokens, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("node tokens: %w", err)
	}
	t := &NodeTokens{dir: dir, tokens: map[string]string{}}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("node tokens: %w", err)
	}
	for _, e := range ents {
		if e.IsDir() || strings.HasSuffix(e.Name(), ".tmp") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			return nil, fmt.Errorf("node tokens: %w", err)
		}
		if tok := strings.TrimSpace(string(b)); tok != "" {
			t.tokens[tok] = e.Name()
		}
	}
	return t, nil
}

// Ensure writes a token for each node that has none yet.
func (t *NodeTokens) Ensure(nodes []string) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	have := map[string]bool{}
	for _, n := range t.tokens {
		have[n] = true
	}
	for _, n := range nodes {
		if have[n] || n == "" || strings.ContainsAny(n, "/\x00") || n == "." || n == ".." {
			continue
		}
		b := make([]byte, 32)
		if _, err := rand.Read(b); err != nil {
			return fmt.Errorf("node token: %w", err)
		}
		tok := hex.EncodeToString(b)
		p := filepath.Join(t.dir, n)
		if err := atomicfile.Write(p, []byte(tok+"\n"), 0o600); err != nil {
			return fmt.Errorf("node token: %w", err)
		}
		t.tokens[tok] = n
		have[n] = true
	}
	return nil
}

// Authenticate returns the node token belongs to.
func (t *NodeTokens) Authenticate(_ context.Context, token string) (string, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for tok, node := range t.tokens {
		if subtle.ConstantTimeCompare([]byte(tok), []byte(token)) == 1 {
			return node, nil
		}
	}
	return "", fmt.Errorf("%w: unknown node token", ErrUnauthenticated)
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func orDefault(s, def string) string {
	if s == "" {
		return def
	}
	return s
}
