package main

import (
	"strings"
	"testing"

	"github.com/ferrymesh/ferry/api/v1alpha1"
	"github.com/ferrymesh/ferry/internal/kubetest"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

func TestEnroll(t *testing.T) {
	c := kubetest.Start(t)
	ctx := t.Context()
	client, err := kubernetes.NewForConfig(c.RestConfig)
	if err != nil {
		t.Fatal(err)
	}
	for _, ns := range []*corev1.Namespace{
		{ObjectMeta: metav1.ObjectMeta{Name: "shop", Labels: map[string]string{"team": "web"}}},
		{ObjectMeta: metav1.ObjectMeta{Name: "payments", Labels: map[string]string{v1alpha1.MeshLabel: "disabled"}}},
	} {
		if _, err := c.CreateNamespace(ctx, ns); err != nil {
			t.Fatal(err)
		}
	}
	kubeconfig := "--kubeconfig=" + c.Kubeconfig
	labels := func(ns string) map[string]string {
		t.Helper()
		got, err := client.CoreV1().Namespaces().Get(ctx, ns, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return got.Labels
	}
	expect := func(out, want string) {
		t.Helper()
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q", want)
		}
	}

	out, err := ferryCLI(t, newEnrollCommand, "shop", "payments", kubeconfig)
	if err != nil {
		t.Fatalf("ferry enroll: %v", err)
	}
	expect(out, "namespace shop: enrolled (label ferry.io/mesh=enabled added)")
	expect(out, `namespace payments: enrolled (ferry.io/mesh changed from "disabled" to "enabled")`)
	for _, ns := range []string{"shop", "payments"} {
		if got := labels(ns)[v1alpha1.MeshLabel]; got != v1alpha1.MeshEnabled {
			t.Errorf("namespace %s label %s = %q after enroll, want enabled", ns, v1alpha1.MeshLabel, got)
		}
	}
	if got := labels("shop")["team"]; got != "web" {
		t.Errorf("enroll changed another label: team=%q", got)
	}

	out, err = ferryCLI(t, newEnrollCommand, "shop", kubeconfig)
	if err != nil {
		t.Fatalf("ferry enroll again: %v", err)
	}
	expect(out, "namespace shop: already enrolled (ferry.io/mesh=enabled), nothing changed")

	out, err = ferryCLI(t, newUnenrollCommand, "shop", kubeconfig)
	if err != nil {
		t.Fatalf("ferry unenroll: %v", err)
	}
	expect(out, "namespace shop: unenrolled (label ferry.io/mesh=enabled removed)")
	if l := labels("shop"); l[v1alpha1.MeshLabel] != "" || l["team"] != "web" {
		t.Errorf("labels after unenroll = %v, want team=web only", l)
	}

	out, err = ferryCLI(t, newUnenrollCommand, "shop", kubeconfig)
	if err != nil {
		t.Fatalf("ferry unenroll again: %v", err)
	}
	expect(out, "namespace shop: not enrolled, nothing changed")

	_, err = ferryCLI(t, newEnrollCommand, "nowhere", kubeconfig)
	if err == nil || !strings.Contains(err.Error(), `namespace "nowhere" not found`) {
		t.Errorf("ferry enroll nowhere: %v, want namespace not found", err)
	}
	_, err = ferryCLI(t, newUnenrollCommand, "nowhere", kubeconfig)
	if err == nil || !strings.Contains(err.Error(), `namespace "nowhere" not found`) {
		t.Errorf("ferry unenroll nowhere: %v, want namespace not found", err)
	}
}
