// This file holds `ferry install` and `ferry uninstall`: render Ferry's
// embedded kustomize base and apply it to a cluster, or remove it.

package main

import (
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/ferrymesh/ferry/deploy"
	"github.com/spf13/cobra"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/yaml"
)

// kubeFlags are the flags of commands that talk to a cluster.
type kubeFlags struct {
	kubeconfig string
	context    string
}

func (f *kubeFlags) add(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.kubeconfig, "kubeconfig", "", "kubeconfig file (default $KUBECONFIG, then ~/.kube/config)")
	cmd.Flags().StringVar(&f.context, "context", "", "kubeconfig context (default the current one)")
}

// restConfig loads the client configuration the way kubectl does.
func (f *kubeFlags) restConfig() (*rest.Config, error) {
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	rules.ExplicitPath = f.kubeconfig
	cfg, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules,
		&clientcmd.ConfigOverrides{CurrentContext: f.context}).ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("kubeconfig: %w", err)
	}
	cfg.UserAgent = "ferry"
	// client-go's default of 5 requests a second would make an install of a
	// few dozen requests take seconds for nothing; the server's priority and
	// fairness still protects it.
	cfg.QPS, cfg.Burst = 50, 100
	cfg.Timeout = 30 * time.Second
	return cfg, nil
}

func newInstallCommand() *cobra.Command {
	var (
		kf        kubeFlags
		dryRun    string
		output    string
		imageTag  string
		imageRepo string
		waitFor   time.Duration
	)
	cmd := &cobra.Command{
		Use:   "install",
		Short: "Install Ferry on a Kubernetes cluster (or print its manifests)",
		Long: `Install renders Ferry's kustomize base (the deploy/ folder, built into this binary:
namespace ferry-system, CRDs, RBAC, the operator Deployment and the agent DaemonSet) and
applies it with server-side apply, object by object, in dependency order. Running it
again upgrades in place; objects that did not change are reported as unchanged.

It needs cluster-administrator credentials: it creates CRDs and cluster-wide RBAC.
The same manifests install with 'kubectl apply --server-side -k deploy/'.`,
		Example: `  # print the manifests, to read or to commit to a GitOps repository
  ferry install -o yaml > ferry.yaml

  # let the API server validate and admit everything, without changing anything
  ferry install --dry-run=server

  # install (or upgrade) with a given image tag, and wait until it runs
  ferry install --image-tag v0.1.0 --wait 5m

  # images built and pushed to your own registry (docs/install.md, "Images")
  ferry install --image-repo registry.example.com/ferry --image-tag dev --wait 5m

  # then enroll a namespace
  ferry enroll shop`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			switch dryRun {
			case "none", "client", "server":
			default:
				return fmt.Errorf("--dry-run=%q: want none, client or server", dryRun)
			}
			switch output {
			case "", "yaml":
			default:
				return fmt.Errorf("-o %q: want yaml (or nothing)", output)
			}
			opts := deploy.Options{ImageTag: imageTag, ImageRepo: imageRepo}
			out := cmd.OutOrStdout()
			if output == "yaml" && dryRun != "server" {
				// The manifests themselves; nothing is sent anywhere.
				data, err := deploy.YAML(opts)
				if err != nil {
					return err
				}
				_, err = out.Write(data)
				return err
			}
			objs, err := deploy.Render(opts)
			if err != nil {
				return err
			}
			if dryRun == "client" {
				for _, o := range objs {
					fmt.Fprintf(out, "%-10s %s\n", "rendered", deploy.Ref(o))
				}
				fmt.Fprintf(out, "%d objects rendered (client dry run: nothing was sent to a cluster)\n", len(objs))
				return nil
			}
			cfg, err := kf.restConfig()
			if err != nil {
				return err
			}
			// With -o yaml the objects go to stdout, so progress goes to stderr.
			progressOut := out
			if output == "yaml" {
				progressOut = cmd.ErrOrStderr()
			}
			suffix := ""
			if dryRun == "server" {
				suffix = " (server dry run)"
			}
			fmt.Fprintf(progressOut, "Installing Ferry on %s%s: %d objects\n", cfg.Host, suffix, len(objs))
			results, err := deploy.Apply(cmd.Context(), cfg, objs, deploy.DryRun(dryRun), func(r deploy.Result) {
				line := fmt.Sprintf("  %-10s %s", r.Outcome, deploy.Ref(r.Object))
				if r.Reason != "" {
					line += " (" + r.Reason + ")"
				}
				fmt.Fprintln(progressOut, line)
			})
			if err != nil {
				return fmt.Errorf("install: %w", err)
			}
			if output == "yaml" {
				if err := writeYAML(out, results); err != nil {
					return err
				}
			}
			writeInstallSummary(progressOut, results, dryRun, waitFor > 0)
			if waitFor > 0 && dryRun == "none" {
				fmt.Fprintf(progressOut, "Waiting up to %v for the operator and the agents to run:\n", waitFor)
				err := deploy.WaitReady(cmd.Context(), cfg, waitFor, 0, func(line string) { fmt.Fprintln(progressOut, "  "+line) })
				if err != nil {
					return fmt.Errorf("ferry is installed but %w", err)
				}
				fmt.Fprintln(progressOut, "Ferry is running. Next: ferry enroll NAMESPACE")
			}
			return nil
		},
	}
	kf.add(cmd)
	cmd.Flags().StringVar(&dryRun, "dry-run", "none", "none, client (render only) or server (the API server checks every object, stores nothing)")
	cmd.Flags().Lookup("dry-run").NoOptDefVal = "client"
	cmd.Flags().StringVarP(&output, "output", "o", "", "yaml: print the manifests instead of applying them (with --dry-run=server: the objects as the server would store them)")
	cmd.Flags().StringVar(&imageTag, "image-tag", "", "tag of the ferry-operator and ferry-agent images (default: the base's)")
	cmd.Flags().StringVar(&imageRepo, "image-repo", "", "repository of the ferry-operator and ferry-agent images, e.g. registry.example.com/ferry (default: ghcr.io/ferrymesh)")
	cmd.Flags().DurationVar(&waitFor, "wait", 0, "after applying, wait up to this long until the operator is available and an agent is ready on every node")
	return cmd
}

func writeYAML(w io.Writer, results []deploy.Result) error {
	for i, r := range results {
		if i > 0 {
			fmt.Fprintln(w, "---")
		}
		data, err := yaml.Marshal(r.Object.Object)
		if err != nil {
			return fmt.Errorf("%s: %w", deploy.Ref(r.Object), err)
		}
		if _, err := w.Write(data); err != nil {
			return err
		}
	}
	return nil
}

func writeInstallSummary(w io.Writer, results []deploy.Result, dryRun string, waiting bool) {
	counts := map[deploy.Outcome]int{}
	for _, r := range results {
		counts[r.Outcome]++
	}
	var parts []string
	for _, o := range []deploy.Outcome{deploy.Created, deploy.Configured, deploy.Unchanged, deploy.Skipped} {
		if counts[o] > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", counts[o], o))
		}
	}
	if dryRun == "server" {
		fmt.Fprintf(w, "Server dry run: %s. Nothing was changed.\n", strings.Join(parts, ", "))
		if counts[deploy.Skipped] > 0 {
			fmt.Fprintf(w, "To have the server check the skipped objects too: kubectl create namespace %s, then run this again.\n", deploy.Namespace)
		}
		return
	}
	fmt.Fprintf(w, "Ferry installed: %s.\n", strings.Join(parts, ", "))
	if waiting {
		return
	}
	fmt.Fprintf(w, "Next: kubectl -n %s rollout status daemonset/ferry-agent deployment/ferry-operator\n", deploy.Namespace)
	fmt.Fprintf(w, "      ferry enroll NAMESPACE\n")
}

func newUninstallCommand() *cobra.Command {
	var (
		kf   kubeFlags
		opts deploy.UninstallOptions
		yes  bool
	)
	cmd := &cobra.Command{
		Use:   "uninstall",
		Short: "Remove Ferry from a Kubernetes cluster, nodes' kernels included",
		Long: `Uninstall removes Ferry in the order that leaves nodes clean:

  1. delete the agent DaemonSet and wait for its pods to stop, so no agent puts
     capture back;
  2. run the ferry-cleanup DaemonSet until it is ready on every node: each of its
     pods ran 'ferry-agent --cleanup', which detaches and unpins every program,
     map and link Ferry put in that node's kernel; then delete it;
  3. delete everything 'ferry install' created, dependents first: the operator, its
     RBAC, the CRDs (and with them every Ferry policy, unless --keep-crds) and the
     namespace ferry-system.

Enrolled pods keep running; once their node is clean their connections are plain
TCP again. Namespace labels (ferry enroll) are left as they are.`,
		Example: `  ferry uninstall
  ferry uninstall --yes --keep-crds
  # nodes already cleaned by hand (docs/install.md):
  ferry uninstall --skip-node-cleanup`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := kf.restConfig()
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if !yes {
				fmt.Fprintf(out, "This removes Ferry from %s", cfg.Host)
				if !opts.KeepCRDs {
					fmt.Fprint(out, ", with every AuthorizationPolicy, PeerAuthentication and TrafficPolicy")
				}
				fmt.Fprint(out, ". Continue? [y/N] ")
				var answer string
				fmt.Fscanln(cmd.InOrStdin(), &answer)
				if a := strings.ToLower(strings.TrimSpace(answer)); a != "y" && a != "yes" {
					return errors.New("uninstall cancelled (--yes skips this question)")
				}
			}
			fmt.Fprintf(out, "Uninstalling Ferry from %s\n", cfg.Host)
			err = deploy.Uninstall(cmd.Context(), cfg, opts, func(line string) { fmt.Fprintln(out, "  "+line) })
			if err != nil {
				return fmt.Errorf("uninstall: %w", err)
			}
			fmt.Fprintf(out, "Ferry uninstalled. The namespace %s disappears once its last objects are gone.\n", deploy.Namespace)
			return nil
		},
	}
	kf.add(cmd)
	f := cmd.Flags()
	f.BoolVarP(&yes, "yes", "y", false, "do not ask for confirmation")
	f.BoolVar(&opts.KeepCRDs, "keep-crds", false, "keep Ferry's CRDs and the policies written with them")
	f.BoolVar(&opts.SkipNodeCleanup, "skip-node-cleanup", false, "do not run ferry-agent --cleanup on the nodes (only if they were cleaned by hand)")
	f.StringVar(&opts.ImageTag, "image-tag", "", "tag of the ferry-agent image the cleanup runs (default: the base's)")
	f.StringVar(&opts.ImageRepo, "image-repo", "", "repository of the ferry-agent image the cleanup runs (default: ghcr.io/ferrymesh)")
	f.DurationVar(&opts.Timeout, "timeout", 5*time.Minute, "how long to wait for the agents to stop, and again for every node to be cleaned")
	return cmd
}
