package deploy_test

import (
	"strings"
	"testing"

	"github.com/ferrymesh/ferry/deploy"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// containerImages returns every container's and init container's image in objs.
func containerImages(objs []*unstructured.Unstructured) []string {
	var images []string
	for _, o := range objs {
		for _, field := range []string{"containers", "initContainers"} {
			cs, _, _ := unstructured.NestedSlice(o.Object, "spec", "template", "spec", field)
			for _, c := range cs {
				image, _ := c.(map[string]any)["image"].(string)
				images = append(images, o.GetName()+" "+image)
			}
		}
	}
	return images
}

// --image-repo and --image-tag name images in the user's registry, for the
// install and for the cleanup DaemonSet of the uninstall alike; the base names
// a released version, never :latest (which kubelet would pull each time).
func TestRenderImages(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts deploy.Options
		want map[string]string // object name: image
	}{
		{"base", deploy.Options{}, map[string]string{
			"ferry-operator": "ghcr.io/ferrymesh/ferry-operator:v0.1.0",
			"ferry-agent":    "ghcr.io/ferrymesh/ferry-agent:v0.1.0",
		}},
		{"repo and tag", deploy.Options{ImageRepo: "registry.example.com:5000/team/ferry/", ImageTag: "dev"}, map[string]string{
			"ferry-operator": "registry.example.com:5000/team/ferry/ferry-operator:dev",
			"ferry-agent":    "registry.example.com:5000/team/ferry/ferry-agent:dev",
		}},
		{"repo only", deploy.Options{ImageRepo: "registry.ferry.test/ferry"}, map[string]string{
			"ferry-operator": "registry.ferry.test/ferry/ferry-operator:v0.1.0",
			"ferry-agent":    "registry.ferry.test/ferry/ferry-agent:v0.1.0",
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			objs, err := deploy.Render(tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			cleanup, err := deploy.RenderCleanup(tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			images := containerImages(append(objs, cleanup...))
			if len(images) < 4 {
				t.Fatalf("only %d containers rendered: %v", len(images), images)
			}
			for _, ni := range images {
				name, image, _ := strings.Cut(ni, " ")
				if strings.HasPrefix(image, "registry.k8s.io/pause:") {
					continue // the cleanup's idle container: every node has the sandbox image
				}
				want := tc.want[name]
				if name == deploy.CleanupDaemonSet {
					want = tc.want["ferry-agent"]
				}
				if image != want {
					t.Errorf("%s runs %s, want %s", name, image, want)
				}
			}
		})
	}
	for _, bad := range []string{"Registry.Example.com/Ferry", "ghcr.io/ferrymesh:v1", "ghcr.io//ferry", "-x"} {
		if _, err := deploy.Render(deploy.Options{ImageRepo: bad}); err == nil || !strings.Contains(err.Error(), "not a valid repository") {
			t.Errorf("--image-repo %q: err %v, want it refused", bad, err)
		}
	}
}
