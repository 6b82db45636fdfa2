// Command base writes the empty base image Ferry's images are built on (scratch: no
// layers, linux/amd64) into the OCI image layout that ko reads as its cache
// ($KOCACHE/img), and prints its digest. ko finds a base given by digest in that
// cache without asking a registry, so images build with no network and no Docker.
package main

import (
	"fmt"
	"os"
	"path/filepath"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "base:", err)
		os.Exit(1)
	}
}

func run() error {
	kocache := os.Getenv("KOCACHE")
	if kocache == "" {
		return fmt.Errorf("KOCACHE is not set")
	}
	cfg, err := empty.Image.ConfigFile()
	if err != nil {
		return fmt.Errorf("empty config: %w", err)
	}
	cfg = cfg.DeepCopy()
	cfg.OS, cfg.Architecture = "linux", "amd64"
	// Programs in these images find nothing else on the file system; a PATH and a
	// writable place for temporary files are all the Go programs expect.
	cfg.Config.Env = []string{"PATH=/ko-app:/usr/bin:/bin", "TMPDIR=/tmp"}
	img, err := mutate.ConfigFile(empty.Image, cfg)
	if err != nil {
		return fmt.Errorf("base config: %w", err)
	}
	path := filepath.Join(kocache, "img")
	p, err := layout.FromPath(path)
	if err != nil {
		if p, err = layout.Write(path, empty.Index); err != nil {
			return fmt.Errorf("image layout %s: %w", path, err)
		}
	}
	if err := p.AppendImage(img, layout.WithPlatform(v1.Platform{OS: "linux", Architecture: "amd64"})); err != nil {
		return fmt.Errorf("append base: %w", err)
	}
	d, err := img.Digest()
	if err != nil {
		return fmt.Errorf("base digest: %w", err)
	}
	fmt.Println(d.String())
	return nil
}
