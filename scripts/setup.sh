#!/usr/bin/env bash
# Installs what building and testing Flotilla needs on a fresh Debian machine, and sets the
# build environment. Source it (`. scripts/setup.sh`) or run it; it is idempotent.
#
# RocksDB: we link Debian's librocksdb (7.8) instead of building the bundled C++ sources,
# which takes about 30 minutes on 2 cores; this pins the rocksdb crate to 0.21, the newest
# that links against 7.8. bindgen in librocksdb-sys needs libclang.
set -euo pipefail

# busybox-static and iptables (with util-linux's nsenter) serve `flotilla local`: the node image
# carries busybox; partitions are iptables rules entered into node containers' namespaces.
# iproute2's `ip` and iptables also make the host bridge of `serve --pod-bridge` (its pods are
# wired in-process).
packages=(librocksdb-dev libclang-dev pkg-config etcd-server busybox-static iptables util-linux iproute2)
missing=()
for package in "${packages[@]}"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

multiarch=$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
export ROCKSDB_LIB_DIR=/usr/lib/$multiarch
export SNAPPY_LIB_DIR=/usr/lib/$multiarch
# The build cache lives outside the clone so that fresh clones on this machine reuse it.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/flotilla/target}
mkdir -p "$CARGO_TARGET_DIR"
