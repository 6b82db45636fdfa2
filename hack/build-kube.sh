#!/usr/bin/env bash
# Builds the kube-apiserver and etcd that Ferry's tests run (internal/kubetest), and
# the kubectl they drive it with, from the Go modules in hack/kube/ and
# hack/kube/etcd/, into a cache folder shared by every checkout:
#
#   ${FERRY_KUBE_CACHE:-$HOME/.cache/ferry/kube}/kubernetes-<v>_etcd-<v>_<go version>/
#
# Idempotent: when all binaries are there it prints their paths and exits at once.
# stdout is exactly three lines, the absolute paths of kube-apiserver, etcd and
# kubectl (callers tell them apart by base name); progress goes to stderr. Concurrent runs wait for each other (flock) instead of building twice.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$here/lib.sh"
kube_mod="$here/kube"
etcd_mod="$here/kube/etcd"

# go.mod is the one place versions are written down; read them without the go
# command so the cached path is cheap to compute.
kube_version=$(mod_version k8s.io/kubernetes "$kube_mod/go.mod")
etcd_version=$(mod_version go.etcd.io/etcd/server/v3 "$etcd_mod/go.mod")
if [ -z "$kube_version" ] || [ -z "$etcd_version" ]; then
  echo "build-kube: cannot read k8s.io/kubernetes or etcd server version from hack/kube go.mod files" >&2
  exit 1
fi
go_version=$(go env GOVERSION)

cache_root=${FERRY_KUBE_CACHE:-$HOME/.cache/ferry/kube}
out="$cache_root/kubernetes-${kube_version}_etcd-${etcd_version}_${go_version}"
apiserver="$out/kube-apiserver"
etcd="$out/etcd"
kubectl="$out/kubectl"

done_already() { [ -x "$apiserver" ] && [ -x "$etcd" ] && [ -x "$kubectl" ]; }
print_paths() { printf '%s\n%s\n%s\n' "$apiserver" "$etcd" "$kubectl"; }

build_once build-kube "$out" done_already print_paths

# Settings from kubernetes' own hack/lib/golang.sh for release builds: static,
# trimmed, stripped, and the tags that drop test-only and x/net/trace code.
export CGO_ENABLED=0 GOWORK=off GOFLAGS="${GOFLAGS:+$GOFLAGS }-buildvcs=false"
tags=selinux,notest,grpcnotrace

# Clients (client-go's discovery, kubectl) parse the server's /version, so stamp
# it the way kubernetes' hack/lib/version.sh does. buildDate is the release
# commit time, which keeps the build reproducible.
build_date=$(cd "$kube_mod" && go list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes)
major=${kube_version#v}; major=${major%%.*}
minor=${kube_version#v*.}; minor=${minor%%.*}
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$kube_version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$build_date"
done

tmp=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

start=$SECONDS
if [ ! -x "$apiserver" ]; then
  echo "build-kube: building kube-apiserver $kube_version with $go_version (takes several minutes on 2 cores)…" >&2
  (cd "$kube_mod" && go build -trimpath -tags "$tags" -ldflags "$ldflags" \
    -o "$tmp/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver)
  mv "$tmp/kube-apiserver" "$apiserver"
  echo "build-kube: kube-apiserver built in $((SECONDS - start))s" >&2
fi

start=$SECONDS
if [ ! -x "$etcd" ]; then
  echo "build-kube: building etcd $etcd_version with $go_version…" >&2
  (cd "$etcd_mod" && go build -trimpath -ldflags "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=$etcd_version" \
    -o "$tmp/etcd" go.etcd.io/etcd/server/v3)
  mv "$tmp/etcd" "$etcd"
  echo "build-kube: etcd built in $((SECONDS - start))s" >&2
fi

start=$SECONDS
if [ ! -x "$kubectl" ]; then
  # Same module, build flags and version stamp as kube-apiserver: most of it is
  # already in the Go build cache by now, so this takes well under a minute.
  echo "build-kube: building kubectl $kube_version with $go_version…" >&2
  (cd "$kube_mod" && go build -trimpath -tags "$tags" -ldflags "$ldflags" \
    -o "$tmp/kubectl" k8s.io/kubernetes/cmd/kubectl)
  mv "$tmp/kubectl" "$kubectl"
  echo "build-kube: kubectl built in $((SECONDS - start))s" >&2
fi

print_paths
