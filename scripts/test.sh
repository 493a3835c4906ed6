#!/usr/bin/env bash
# The whole vmotion test suite: everything a fresh machine needs, then every test.
# This is the README's test command, and .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the tests need: QEMU for the tunnel tests (they skip, saying why,
# where it cannot be installed).
scripts/install-qemu.sh
# etcd and protoc for the replicated control plane.
scripts/install-control-plane.sh
# libvirt 9.0 for the libvirt tests (they start their own daemons; skip without it).
scripts/install-libvirt.sh
# iproute2 for the WAN test bed (network namespaces; those tests skip without it).
if ! command -v ip >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q iproute2 >/dev/null \
    || echo "test.sh: iproute2 not installed; the WAN tests skip" >&2
fi
# A Linux guest for the QEMU tests: Debian's cloud kernel and busybox, downloaded (not
# installed) and cached under target/linux-guest. Its tests skip, saying why, without it.
scripts/linux-guest.sh >/dev/null || echo "test.sh: no Linux guest (see above); its tests skip" >&2

# Some tests run the workspace's binaries as real processes (the key service): build them.
cargo build --workspace --all-features --bins

# nextest does not run doctests; the rustdoc examples are part of the API's promise.
# They run first so the suite's closing line is the main runner's summary.
cargo test --workspace --all-features --doc

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --all-features --no-fail-fast
  # nextest runs every test in a process of its own; `cargo test` runs a file's tests in
  # one process, where state shared by accident (a process-wide static) shows up. Run the
  # driver crates that way too, so the fallback below is exercised on every CI run.
  cargo test --all-features --no-fail-fast -p vmotion -p vmotion-session -p vmotion-authority --lib --tests
else
  echo "cargo-nextest not found; falling back to cargo test" >&2
  cargo test --workspace --all-features --no-fail-fast --lib --bins --tests
fi
