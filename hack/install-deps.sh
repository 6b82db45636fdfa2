#!/usr/bin/env bash
# Installs the Debian packages listed in hack/deb-packages. Idempotent: only what is
# missing is installed, so a second run is quick and touches nothing. Recommends are
# never installed: what Ferry needs is listed by name (test/deps checks it).
set -euo pipefail

list="$(dirname "${BASH_SOURCE[0]}")/deb-packages"
mapfile -t packages < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' "$list")

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: needs root to install Debian packages" >&2
  exit 1
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-deps: done"
