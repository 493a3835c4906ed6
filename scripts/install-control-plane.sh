#!/usr/bin/env bash
# Installs what the replicated control plane needs, from Debian bookworm: etcd (the
# `etcd-server` package, 3.4) for the etcd store's tests and benchmarks, and `protoc`
# (`protobuf-compiler`) with protobuf's well-known types (`libprotobuf-dev`), which the
# etcd client crate needs at build time. .ci/run calls this before anything compiles.
# Idempotent; does nothing where all exist.
set -euo pipefail

missing=()
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/descriptor.proto ] || missing+=(libprotobuf-dev)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install-control-plane: not root or no apt-get: install ${missing[*]} yourself (the key service's etcd store needs them to build)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
# etcd-server's package starts a system etcd on 2379; the tests start their own members
# on other ports, and the system one is stopped so nothing listens unasked.
apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
if command -v systemctl >/dev/null 2>&1; then
  systemctl disable --now etcd >/dev/null 2>&1 || true
fi
if command -v service >/dev/null 2>&1; then
  service etcd stop >/dev/null 2>&1 || true
fi
etcd --version | head -n1
protoc --version
