#!/usr/bin/env bash
# Builds what a real Kubernetes node in Ferry's tests (internal/kubenode) runs beyond
# kube-apiserver and etcd (hack/build-kube.sh): kubelet, kube-scheduler and
# kube-controller-manager and kube-proxy from hack/kube's k8s.io/kubernetes module; containerd 2.x,
# ctr and containerd-shim-runc-v2 from hack/node; and ko from hack/ko. runc and the
# CNI plugins come from Debian (hack/install-deps.sh). Output goes to a cache folder
# shared by every checkout:
#
#   ${FERRY_KUBE_CACHE:-$HOME/.cache/ferry/kube}/node-kubernetes-<v>_containerd-<v>_ko-<v>_<go version>/
#
# Idempotent: when all binaries are there it prints the folder and exits at once.
# stdout is exactly one line, the absolute path of that folder; progress goes to
# stderr. Concurrent runs wait for each other (flock) instead of building twice.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$here/lib.sh"
kube_mod="$here/kube"
node_mod="$here/node"
ko_mod="$here/ko"

kube_version=$(mod_version k8s.io/kubernetes "$kube_mod/go.mod")
containerd_version=$(mod_version github.com/containerd/containerd/v2 "$node_mod/go.mod")
ko_version=$(mod_version github.com/google/ko "$ko_mod/go.mod")
if [ -z "$kube_version" ] || [ -z "$containerd_version" ] || [ -z "$ko_version" ]; then
  echo "build-node: cannot read k8s.io/kubernetes, containerd or ko version from hack/{kube,node,ko}/go.mod" >&2
  exit 1
fi
go_version=$(go env GOVERSION)

cache_root=${FERRY_KUBE_CACHE:-$HOME/.cache/ferry/kube}
out="$cache_root/node-kubernetes-${kube_version}_containerd-${containerd_version}_ko-${ko_version}_${go_version}"
bins=(kubelet kube-scheduler kube-controller-manager kube-proxy containerd ctr containerd-shim-runc-v2 ko)

done_already() {
  for b in "${bins[@]}"; do [ -x "$out/$b" ] || return 1; done
}

print_paths() { echo "$out"; }
build_once build-node "$out" done_already print_paths

export CGO_ENABLED=0 GOWORK=off GOFLAGS="${GOFLAGS:+$GOFLAGS }-buildvcs=false"

# Same tags and version stamp as hack/build-kube.sh: kubelet reports its version to
# the API server, which checks the skew against its own.
tags=selinux,notest,grpcnotrace
build_date=$(cd "$kube_mod" && go list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes)
major=${kube_version#v}; major=${major%%.*}
minor=${kube_version#v*.}; minor=${minor%%.*}
kube_ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  kube_ldflags+=" -X $pkg.gitVersion=$kube_version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
  kube_ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$build_date"
done

# containerd's own Makefile stamps its version the same way; the no_* tags drop
# snapshotters and plugins that need cgo or are not used here (overlayfs and
# native stay).
containerd_ldflags="-s -w -X github.com/containerd/containerd/v2/version.Version=$containerd_version"
containerd_ldflags+=" -X github.com/containerd/containerd/v2/version.Package=github.com/containerd/containerd/v2"
containerd_tags=no_btrfs,no_devmapper,no_zfs,no_aufs

tmp=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

build() { # name module-dir tags ldflags package
  local name=$1 dir=$2 btags=$3 ldf=$4 pkg=$5 start=$SECONDS
  [ -x "$out/$name" ] && return 0
  echo "build-node: building $name (${pkg}) with $go_version…" >&2
  (cd "$dir" && go build -trimpath ${btags:+-tags "$btags"} -ldflags "$ldf" -o "$tmp/$name" "$pkg")
  mv "$tmp/$name" "$out/$name"
  echo "build-node: $name built in $((SECONDS - start))s" >&2
}

build kubelet "$kube_mod" "$tags" "$kube_ldflags" k8s.io/kubernetes/cmd/kubelet
build kube-scheduler "$kube_mod" "$tags" "$kube_ldflags" k8s.io/kubernetes/cmd/kube-scheduler
build kube-controller-manager "$kube_mod" "$tags" "$kube_ldflags" k8s.io/kubernetes/cmd/kube-controller-manager
build kube-proxy "$kube_mod" "$tags" "$kube_ldflags" k8s.io/kubernetes/cmd/kube-proxy
build containerd "$node_mod" "$containerd_tags" "$containerd_ldflags" github.com/containerd/containerd/v2/cmd/containerd
build containerd-shim-runc-v2 "$node_mod" "$containerd_tags" "$containerd_ldflags" github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2
build ctr "$node_mod" "$containerd_tags" "$containerd_ldflags" github.com/containerd/containerd/v2/cmd/ctr
build ko "$ko_mod" "" "-s -w -X github.com/google/ko/pkg/commands.Version=$ko_version" github.com/google/ko

echo "$out"
