#!/usr/bin/env bash
# Builds the helm CLI that deploy/'s chart tests run, from the Go module in
# hack/helm/ (helm.sh/helm/v4), into a cache folder shared by every checkout:
#
#   ${FERRY_HELM_CACHE:-$HOME/.cache/ferry/helm}/helm-<v>_<go version>/helm
#
# Idempotent: when the binary is there it prints its path and exits at once.
# stdout is exactly one line, the absolute path of helm; progress goes to
# stderr. Concurrent runs wait for each other (flock) instead of building twice.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$here/lib.sh"
mod="$here/helm"

# go.mod is the one place the version is written down.
helm_version=$(mod_version helm.sh/helm/v4 "$mod/go.mod")
if [ -z "$helm_version" ]; then
  echo "build-helm: cannot read the helm.sh/helm/v4 version from hack/helm/go.mod" >&2
  exit 1
fi
go_version=$(go env GOVERSION)

cache_root=${FERRY_HELM_CACHE:-$HOME/.cache/ferry/helm}
out="$cache_root/helm-${helm_version}_${go_version}"
helm="$out/helm"

done_already() { [ -x "$helm" ]; }
print_paths() { echo "$helm"; }
build_once build-helm "$out" done_already print_paths

export CGO_ENABLED=0 GOWORK=off GOFLAGS="${GOFLAGS:+$GOFLAGS }-buildvcs=false"
# helm prints this in `helm version`; its own Makefile stamps it the same way.
ldflags="-s -w -X helm.sh/helm/v4/internal/version.version=$helm_version"

tmp=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

start=$SECONDS
echo "build-helm: building helm $helm_version with $go_version (a few minutes on 2 cores)…" >&2
(cd "$mod" && go build -trimpath -ldflags "$ldflags" -o "$tmp/helm" helm.sh/helm/v4/cmd/helm)
mv "$tmp/helm" "$helm"
echo "build-helm: helm built in $((SECONDS - start))s" >&2
echo "$helm"
