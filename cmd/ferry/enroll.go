// This file holds `ferry enroll` and `ferry unenroll`: add or remove the label
// that puts a namespace's pods in the mesh.

package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"

	"github.com/ferrymesh/ferry/api/v1alpha1"
	"github.com/spf13/cobra"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
)

func newEnrollCommand() *cobra.Command {
	var kf kubeFlags
	cmd := &cobra.Command{
		Use:   "enroll NAMESPACE...",
		Short: "Put a namespace's pods in the mesh (label ferry.io/mesh=enabled)",
		Long: `Enroll labels each namespace ferry.io/mesh=enabled. The operator sees the label and
the agent on each node enrolls the namespace's pods: their new TCP connections are
captured and, between enrolled pods, carried over mutual TLS. Connections already open
are left alone. A pod labelled ferry.io/mesh=disabled stays out.

Enrolling a namespace that already is changes nothing.`,
		Example: `  ferry enroll shop
  ferry enroll shop payments --context prod`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return setEnrollment(cmd.Context(), &kf, cmd.OutOrStdout(), args, true)
		},
	}
	kf.add(cmd)
	return cmd
}

func newUnenrollCommand() *cobra.Command {
	var kf kubeFlags
	cmd := &cobra.Command{
		Use:   "unenroll NAMESPACE...",
		Short: "Take a namespace's pods out of the mesh (remove label ferry.io/mesh)",
		Long: `Unenroll removes the ferry.io/mesh label from each namespace. The agents take its
pods out of the mesh: their new connections are plaintext and not captured.

Unenrolling a namespace that is not enrolled changes nothing.`,
		Example: `  ferry unenroll shop`,
		Args:    cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return setEnrollment(cmd.Context(), &kf, cmd.OutOrStdout(), args, false)
		},
	}
	kf.add(cmd)
	return cmd
}

// setEnrollment adds (enroll) or removes the mesh label on each namespace and
// prints what changed. It stops at the first namespace it cannot change.
func setEnrollment(ctx context.Context, kf *kubeFlags, w io.Writer, namespaces []string, enroll bool) error {
	cfg, err := kf.restConfig()
	if err != nil {
		return err
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("kubernetes client: %w", err)
	}
	for _, name := range namespaces {
		ns, err := client.CoreV1().Namespaces().Get(ctx, name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return fmt.Errorf("namespace %q not found (kubectl get namespaces lists them)", name)
		}
		if err != nil {
			return fmt.Errorf("namespace %s: %w", name, err)
		}
		old, had := ns.Labels[v1alpha1.MeshLabel]
		var value any // JSON null removes the label
		switch {
		case enroll && old == v1alpha1.MeshEnabled:
			fmt.Fprintf(w, "namespace %s: already enrolled (%s=%s), nothing changed\n", name, v1alpha1.MeshLabel, old)
			continue
		case !enroll && !had:
			fmt.Fprintf(w, "namespace %s: not enrolled, nothing changed\n", name)
			continue
		case enroll:
			value = v1alpha1.MeshEnabled
		}
		// A merge patch touches this one label only, and the resourceVersion
		// makes it fail rather than overwrite a change made since the Get.
		patch, err := json.Marshal(map[string]any{"metadata": map[string]any{
			"resourceVersion": ns.ResourceVersion,
			"labels":          map[string]any{v1alpha1.MeshLabel: value},
		}})
		if err != nil {
			return fmt.Errorf("namespace %s: %w", name, err)
		}
		if _, err := client.CoreV1().Namespaces().Patch(ctx, name, types.MergePatchType, patch,
			metav1.PatchOptions{FieldManager: "ferry"}); err != nil {
			if apierrors.IsConflict(err) {
				return fmt.Errorf("namespace %s changed while labelling it: run the command again", name)
			}
			return fmt.Errorf("label namespace %s: %w", name, err)
		}
		switch {
		case enroll && had:
			fmt.Fprintf(w, "namespace %s: enrolled (%s changed from %q to %q)\n", name, v1alpha1.MeshLabel, old, v1alpha1.MeshEnabled)
		case enroll:
			fmt.Fprintf(w, "namespace %s: enrolled (label %s=%s added)\n", name, v1alpha1.MeshLabel, v1alpha1.MeshEnabled)
		default:
			fmt.Fprintf(w, "namespace %s: unenrolled (label %s=%s removed)\n", name, v1alpha1.MeshLabel, old)
		}
	}
	return nil
}
