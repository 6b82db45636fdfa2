package ca

import (
	"bytes"
	"context"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
)

func TestFromSecretCreatesOnceAndFollowersLoad(t *testing.T) {
	client := fake.NewClientset()
	src := SecretSource{Namespace: "ferry-system", Name: "ferry-ca", UserName: "my-ca", TrustDomain: "cluster.local"}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	// A follower waits for the leader's Secret.
	got := make(chan *CA, 1)
	go func() {
		c, err := FromSecret(ctx, client, src, func() bool { return false }, 10*time.Millisecond)
		if err != nil {
			t.Error(err)
		}
		got <- c
	}()
	leader, err := FromSecret(ctx, client, src, func() bool { return true }, 10*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	follower := <-got
	if follower == nil || !bytes.Equal(follower.RootPEM(), leader.RootPEM()) {
		t.Fatal("the follower did not load the leader's CA")
	}
	s, err := client.CoreV1().Secrets("ferry-system").Get(ctx, "ferry-ca", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if s.Type != corev1.SecretTypeTLS || !bytes.Equal(s.Data[SecretCertKey], leader.RootPEM()) || len(s.Data[SecretKeyKey]) == 0 {
		t.Fatalf("ca secret: type %s, %d key bytes", s.Type, len(s.Data[SecretKeyKey]))
	}
	again, err := FromSecret(ctx, client, src, func() bool { return true }, 10*time.Millisecond)
	if err != nil || !bytes.Equal(again.RootPEM(), leader.RootPEM()) {
		t.Fatalf("a restart must reuse the CA in the Secret: %v", err)
	}
}

func TestFromSecretPrefersUserCA(t *testing.T) {
	user, err := New("cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	key, err := user.KeyPEM()
	if err != nil {
		t.Fatal(err)
	}
	client := fake.NewClientset(&corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: "my-ca", Namespace: "ferry-system"},
		Data:       map[string][]byte{SecretCertKey: user.RootPEM(), SecretKeyKey: key},
	})
	c, err := FromSecret(context.Background(), client, SecretSource{Namespace: "ferry-system", Name: "ferry-ca", UserName: "my-ca", TrustDomain: "cluster.local"}, func() bool { return true }, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(c.RootPEM(), user.RootPEM()) {
		t.Fatal("the user-supplied CA was not used")
	}
	if _, err := client.CoreV1().Secrets("ferry-system").Get(context.Background(), "ferry-ca", metav1.GetOptions{}); err == nil {
		t.Fatal("the operator created its own CA although a user CA exists")
	}
}

func TestFromDirPersists(t *testing.T) {
	dir := t.TempDir()
	first, err := FromDir(dir, "cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	second, err := FromDir(dir, "cluster.local")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(first.RootPEM(), second.RootPEM()) {
		t.Fatal("the local CA changed across restarts")
	}
}
