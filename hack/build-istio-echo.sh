#!/usr/bin/env bash
# Builds Istio's echo client and server (istio.io/istio/pkg/test/echo/cmd/client and
# .../cmd/server), the HBONE peer of Ferry's interoperability test
# (agent/tunnel/interop_test.go, docs/interop.md), from the Go module in hack/istio/
# into a cache folder shared by every checkout:
#
#   ${FERRY_ISTIO_CACHE:-$HOME/.cache/ferry/istio-echo}/<istio version>_<go version>/
#
# Idempotent: when both binaries are there it prints their paths and exits at once.
# stdout is exactly two lines, the absolute paths of client and server (callers tell
# them apart by base name); progress goes to stderr. Concurrent runs wait for each
# other (flock) instead of building twice.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
source "$here/lib.sh"
mod="$here/istio"

# go.mod is the one place the version is written down.
version=$(mod_version istio.io/istio "$mod/go.mod")
if [ -z "$version" ]; then
  echo "build-istio-echo: cannot read the istio.io/istio version from hack/istio/go.mod" >&2
  exit 1
fi
go_version=$(go env GOVERSION)

cache_root=${FERRY_ISTIO_CACHE:-$HOME/.cache/ferry/istio-echo}
out="$cache_root/${version}_${go_version}"
client="$out/client"
server="$out/server"

done_already() { [ -x "$client" ] && [ -x "$server" ]; }
print_paths() { printf '%s\n%s\n' "$client" "$server"; }

build_once build-istio-echo "$out" done_already print_paths

export GOWORK=off GOFLAGS="${GOFLAGS:+$GOFLAGS }-buildvcs=false"
tmp=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

start=$SECONDS
echo "build-istio-echo: building Istio echo client and server $version with $go_version (a minute or more on 2 cores)…" >&2
(cd "$mod" && go build -ldflags "-s -w" -o "$tmp/" \
  istio.io/istio/pkg/test/echo/cmd/client istio.io/istio/pkg/test/echo/cmd/server)
mv "$tmp/client" "$client"
mv "$tmp/server" "$server"
echo "build-istio-echo: built in $((SECONDS - start))s" >&2

print_paths
