#!/usr/bin/env bash
# Installs the Debian packages Ferry's build, tests, demo and bench need. Idempotent:
# only what is missing is installed, so a second run is quick and touches nothing.
# Recommends are never installed, so anything that is only a Recommends of a package
# here must be listed itself. test/deps reads this list (one package a line, between
# "packages=(" and ")") and checks that every program and file Ferry runs or reads
# comes from one of these packages (dpkg -S): add a package here, not by hand on one
# machine.
set -euo pipefail

packages=(
  clang              # compile the eBPF programs (bpf2go)
  llvm               # llvm-strip, which bpf2go runs on the objects
  libbpf-dev         # bpf_helpers.h and friends
  linux-libc-dev     # linux/bpf.h and the other uapi headers the programs include
  bpftool            # inspect programs and maps in the tests
  iproute2           # ip, tc: the lab and tests
  util-linux         # nsenter, taskset, setpriv
  mount              # the lab bind-mounts each pod's resolv.conf (not Essential)
  tcpdump            # capture on the lab fabric in the e2e tests
  tshark             # read those captures
  protobuf-compiler  # protoc: api/ code generation
  libprotobuf-dev    # google/protobuf/*.proto (well-known types protoc imports)
  prometheus         # promtool check metrics and rules; the prometheus server in the e2e dashboards test
  chromium           # the web view test in headless Chromium
  haproxy            # make bench: the peer proxy pair
  nghttp2-client     # h2load: make bench's HTTP/2 load client (h2c, multiplexed streams)
  iptables           # --capture=iptables, and its tests
  git                # make check-generated
  curl               # the L7 e2e tests' HTTP/1.1 client (keep-alive, chunked uploads, Expect: 100-continue)
  nghttp2-client     # h2load: the L7 e2e tests' HTTP/2 client (prior knowledge, 100 concurrent streams)
  nghttp2-server     # nghttpd: the h2c server streaming a 1 GiB sparse file in the L7 e2e memory test
  runc               # the OCI runtime of the test node's containerd (internal/kubetest StartNode)
  containernetworking-plugins # bridge, host-local, loopback: the test node's pod network (CNI)
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
