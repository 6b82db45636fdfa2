// This file keeps the CA's root where the operator finds it again: a Kubernetes
// Secret in a cluster, a folder in local mode.

package ca

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/ferrymesh/ferry/internal/atomicfile"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// Keys of the CA Secret (the kubernetes.io/tls layout).
const (
	SecretCertKey = corev1.TLSCertKey       // tls.crt
	SecretKeyKey  = corev1.TLSPrivateKeyKey // tls.key
)

// SecretSource names where the CA lives in a cluster.
type SecretSource struct {
	Namespace string
	// Name is the Secret the operator creates on first start.
	Name string
	// UserName, when set and present, is a user-supplied CA (tls.crt, tls.key) that
	// replaces the operator's own.
	UserName    string
	TrustDomain string
}

// FromSecret loads the CA from the user's Secret if it exists, else from the
// operator's Secret. With create set (the leader), a missing operator Secret is
// created with a fresh root; without it (followers), FromSecret waits until the
// leader has created it, polling every interval, until ctx ends.
func FromSecret(ctx context.Context, client kubernetes.Interface, src SecretSource, create func() bool, interval time.Duration) (*CA, error) {
	secrets := client.CoreV1().Secrets(src.Namespace)
	for {
		if src.UserName != "" {
			s, err := secrets.Get(ctx, src.UserName, metav1.GetOptions{})
			switch {
			case err == nil:
				c, err := LoadWithTrustDomain(s.Data[SecretCertKey], s.Data[SecretKeyKey], src.TrustDomain)
				if err != nil {
					return nil, fmt.Errorf("user ca secret %s/%s: %w", src.Namespace, src.UserName, err)
				}
				return c, nil
			case !apierrors.IsNotFound(err):
				return nil, fmt.Errorf("user ca secret %s/%s: %w", src.Namespace, src.UserName, err)
			}
		}
		s, err := secrets.Get(ctx, src.Name, metav1.GetOptions{})
		switch {
		case err == nil:
			c, err := LoadWithTrustDomain(s.Data[SecretCertKey], s.Data[SecretKeyKey], src.TrustDomain)
			if err != nil {
				return nil, fmt.Errorf("ca secret %s/%s: %w", src.Namespace, src.Name, err)
			}
			return c, nil
		case !apierrors.IsNotFound(err):
			return nil, fmt.Errorf("ca secret %s/%s: %w", src.Namespace, src.Name, err)
		}
		if create != nil && create() {
			c, err := New(src.TrustDomain)
			if err != nil {
				return nil, err
			}
			key, err := c.KeyPEM()
			if err != nil {
				return nil, err
			}
			_, err = secrets.Create(ctx, &corev1.Secret{
				ObjectMeta: metav1.ObjectMeta{Name: src.Name, Namespace: src.Namespace, Labels: map[string]string{"app.kubernetes.io/part-of": "ferry"}},
				Type:       corev1.SecretTypeTLS,
				Data:       map[string][]byte{SecretCertKey: c.RootPEM(), SecretKeyKey: key},
			}, metav1.CreateOptions{})
			if err == nil {
				return c, nil
			}
			if !apierrors.IsAlreadyExists(err) {
				return nil, fmt.Errorf("create ca secret %s/%s: %w", src.Namespace, src.Name, err)
			}
			continue // another replica won the race: load theirs
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("wait for ca secret %s/%s: %w", src.Namespace, src.Name, ctx.Err())
		case <-time.After(interval):
		}
	}
}

// FromDir loads the CA kept in dir (ca.crt, ca.key), creating it on first use. The
// key file is readable by its owner only.
func FromDir(dir, trustDomain string) (*CA, error) {
	certPath, keyPath := filepath.Join(dir, "ca.crt"), filepath.Join(dir, "ca.key")
	certPEM, cerr := os.ReadFile(certPath)
	keyPEM, kerr := os.ReadFile(keyPath)
	if cerr == nil && kerr == nil {
		c, err := LoadWithTrustDomain(certPEM, keyPEM, trustDomain)
		if err != nil {
			return nil, fmt.Errorf("ca in %s: %w", dir, err)
		}
		return c, nil
	}
	if !errors.Is(cerr, os.ErrNotExist) && cerr != nil {
		return nil, fmt.Errorf("ca in %s: %w", dir, cerr)
	}
	if !errors.Is(kerr, os.ErrNotExist) && kerr != nil {
		return nil, fmt.Errorf("ca in %s: %w", dir, kerr)
	}
	c, err := New(trustDomain)
	if err != nil {
		return nil, err
	}
	key, err := c.KeyPEM()
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("ca dir: %w", err)
	}
	if err := atomicfile.Write(keyPath, key, 0o600); err != nil {
		return nil, err
	}
	if err := atomicfile.Write(certPath, c.RootPEM(), 0o644); err != nil {
		return nil, err
	}
	return c, nil
}
