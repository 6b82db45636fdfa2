#!/usr/bin/env bash
# Installs the Debian packages Ferry's build, tests and demo need. Idempotent: only
# what is missing is installed, so a second run is quick and touches nothing.
set -euo pipefail

packages=(
  clang llvm libbpf-dev bpftool   # compile and inspect the eBPF programs
  iproute2 util-linux             # the lab: ip, nsenter
  tcpdump tshark                  # capture on the lab fabric in the e2e tests
  protobuf-compiler               # api/ code generation
  prometheus chromium chromium-driver  # promtool check metrics; the web view test in headless Chromium
  haproxy iptables                # make bench: the peer proxy pair; --capture=iptables
)

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
