#!/usr/bin/env bash
# Builds Ferry's container images with ko (hack/ko), with no Docker and no registry:
# the base is an empty image made locally (hack/ko/base, "scratch" with a PATH) and
# each image is written as a tarball that `ctr -n k8s.io images import` and
# `docker load` read. Images, all linux/amd64, tagged ${FERRY_IMAGE_TAG:-dev}:
#
#   ${FERRY_IMAGE_REPO:-registry.ferry.test/ferry}/ferry           the CLI (the lab's echo workload: ferry lab echo-server)
#   ${FERRY_IMAGE_REPO:-registry.ferry.test/ferry}/ferry-agent     the node agent
#   ${FERRY_IMAGE_REPO:-registry.ferry.test/ferry}/ferry-operator  the operator
#   ${FERRY_IMAGE_REPO:-registry.ferry.test/ferry}/pause           the pod sandbox (hack/ko/pause)
#
# Usage: hack/images.sh OUTDIR. Prints one line per image, "REF TARBALL", on stdout;
# progress on stderr. ko comes from hack/build-node.sh (cached).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
out=${1:?usage: hack/images.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)

bins=$("$here/build-node.sh")
ko="$bins/ko"
repo=${FERRY_IMAGE_REPO:-registry.ferry.test/ferry}
tag=${FERRY_IMAGE_TAG:-dev}

export GOWORK=off GOFLAGS="${GOFLAGS:+$GOFLAGS }-buildvcs=false"
export KOCACHE="$out/kocache"
mkdir -p "$KOCACHE"
base_digest=$(cd "$here/ko" && go run ./base)
export KO_DEFAULTBASEIMAGE="$repo/base@$base_digest"
# Reproducible: the image's times are the commit's, not the build's.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$root" log -1 --format=%ct 2>/dev/null || echo 0)}

build() { # name module-dir import-path
  local name=$1 dir=$2 pkg=$3 tarball="$out/$1.tar"
  echo "images: building $repo/$name:$tag from $pkg…" >&2
  (cd "$dir" && KO_DOCKER_REPO="$repo/$name" "$ko" build --bare --push=false \
    --platform=linux/amd64 --tags="$tag" --tarball="$tarball" --sbom=none "$pkg" >/dev/null)
  echo "$repo/$name:$tag $tarball"
}

build ferry "$root" ./cmd/ferry
build ferry-agent "$root" ./cmd/ferry-agent
build ferry-operator "$root" ./cmd/ferry-operator
build pause "$here/ko" ./pause
