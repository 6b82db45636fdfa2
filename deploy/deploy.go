// Package deploy embeds Ferry's kustomize base (this folder: Namespace, CRDs
// (Ferry's and Gateway API's route CRDs), RBAC, the operator Deployment and the agent DaemonSet) and renders it in
// memory, so `ferry install` needs no checkout and no kustomize binary.
package deploy

import (
	"embed"
	"fmt"
	"io/fs"
	"path"
	"regexp"
	"strings"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/api/resmap"
	"sigs.k8s.io/kustomize/kyaml/filesys"
)

// The base's files, and cleanup/ for uninstalling; examples/ and docker/ are not
// part of it. go:embed needs a package-level variable; nothing writes to it.
//
//go:embed kustomization.yaml namespace.yaml crds/*.yaml gateway-api/*.yaml operator/*.yaml agent/*.yaml cleanup/*.yaml
var base embed.FS

// Namespace is the namespace the base installs into.
const Namespace = "ferry-system"

// Images are the names the base's containers use, which Options.ImageTag and
// kustomize `images:` entries change.
const (
	OperatorImage = "ghcr.io/ferrymesh/ferry-operator"
	AgentImage    = "ghcr.io/ferrymesh/ferry-agent"
)

// Options change what Render produces, the way a kustomize overlay would.
type Options struct {
	// ImageTag replaces the tag of the operator and agent images; empty keeps
	// the base's.
	ImageTag string
	// ImageRepo replaces the repository the operator and agent images come from
	// (ghcr.io/ferrymesh): the images become ImageRepo/ferry-operator and
	// ImageRepo/ferry-agent, as hack/images.sh and `ko` name them. Empty keeps
	// the base's.
	ImageRepo string
}

// Base returns the embedded kustomize base, with kustomization.yaml at its root.
func Base() fs.FS { return base }

// tagPattern is what a container image tag may be (OCI distribution spec).
const tagPattern = `^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$`

// repoPattern is what an image repository may be: an optional registry host (with
// a port) and lower-case path components (OCI distribution spec).
const repoPattern = `^([A-Za-z0-9.-]+(:[0-9]+)?/)?[a-z0-9]+([._-][a-z0-9]+)*(/[a-z0-9]+([._-][a-z0-9]+)*)*$`

// Render builds the base with opts and returns the objects in the order
// `kubectl kustomize` prints them (kustomize's legacy order: Namespace and
// CRDs first, then RBAC, then workloads), ready to apply in that order.
func Render(opts Options) ([]*unstructured.Unstructured, error) {
	return render(opts, "")
}

// RenderCleanup renders cleanup/: the DaemonSet that removes what agents left
// in each node's kernel, for uninstalling.
func RenderCleanup(opts Options) ([]*unstructured.Unstructured, error) {
	return render(opts, "cleanup")
}

func render(opts Options, sub string) ([]*unstructured.Unstructured, error) {
	resources, err := build(opts, sub)
	if err != nil {
		return nil, err
	}
	var objs []*unstructured.Unstructured
	for _, r := range resources.Resources() {
		// Through JSON, so numbers are int64 and float64 as everywhere else
		// in unstructured objects (kustomize's maps hold int, which
		// DeepCopy refuses).
		data, err := r.MarshalJSON()
		if err != nil {
			return nil, fmt.Errorf("kustomize build: %s: %w", r.CurId(), err)
		}
		u := &unstructured.Unstructured{}
		if err := u.UnmarshalJSON(data); err != nil {
			return nil, fmt.Errorf("kustomize build: %s: %w", r.CurId(), err)
		}
		objs = append(objs, u)
	}
	return objs, nil
}

// YAML renders the base with opts as one multi-document YAML stream, the same
// text `kubectl kustomize deploy/` prints.
func YAML(opts Options) ([]byte, error) {
	resources, err := build(opts, "")
	if err != nil {
		return nil, err
	}
	out, err := resources.AsYaml()
	if err != nil {
		return nil, fmt.Errorf("kustomize build: %w", err)
	}
	return out, nil
}

// build runs kustomize on the embedded base, or on its folder sub.
func build(opts Options, sub string) (resmap.ResMap, error) {
	if opts.ImageTag != "" && !regexp.MustCompile(tagPattern).MatchString(opts.ImageTag) {
		return nil, fmt.Errorf("image tag %q: not a valid tag (letters, digits, '_', '.', '-'; at most 128)", opts.ImageTag)
	}
	if r := strings.TrimSuffix(opts.ImageRepo, "/"); r != "" && !regexp.MustCompile(repoPattern).MatchString(r) {
		return nil, fmt.Errorf("image repository %q: not a valid repository (REGISTRY[:PORT]/PATH, the path in lower case, no tag)", opts.ImageRepo)
	}
	mem := filesys.MakeFsInMemory()
	err := fs.WalkDir(base, ".", func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		data, err := fs.ReadFile(base, p)
		if err != nil {
			return err
		}
		return mem.WriteFile(path.Join("/base", p), data)
	})
	if err != nil {
		return nil, fmt.Errorf("copy base: %w", err)
	}
	dir := path.Join("/base", sub)
	if opts.ImageTag != "" || opts.ImageRepo != "" {
		// An overlay, exactly what a user would write to pin a release.
		overlay := fmt.Sprintf("apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [%s]\nimages:\n", ".."+dir)
		for _, image := range []string{OperatorImage, AgentImage} {
			overlay += fmt.Sprintf("  - name: %s\n", image)
			if opts.ImageRepo != "" {
				overlay += fmt.Sprintf("    newName: %s/%s\n", strings.TrimSuffix(opts.ImageRepo, "/"), path.Base(image))
			}
			if opts.ImageTag != "" {
				overlay += fmt.Sprintf("    newTag: %q\n", opts.ImageTag)
			}
		}
		if err := mem.WriteFile("/overlay/kustomization.yaml", []byte(overlay)); err != nil {
			return nil, fmt.Errorf("write overlay: %w", err)
		}
		dir = "/overlay"
	}
	kopts := krusty.MakeDefaultOptions()
	kopts.Reorder = krusty.ReorderOptionLegacy // as kubectl kustomize
	resources, err := krusty.MakeKustomizer(kopts).Run(mem, dir)
	if err != nil {
		return nil, fmt.Errorf("kustomize build: %w", err)
	}
	return resources, nil
}
