#!/usr/bin/env bash
# Installs libvirt 9.0 from Debian bookworm (libvirtd, virsh, the QEMU driver) for the
# libvirt tests (crates/vmotion-cli/tests/libvirt.rs), which skip, saying why, without
# it. The package's own daemon is not wanted: the tests start their own, one per
# "host" (scripts/libvirt-host.sh); any system libvirtd the install started is stopped.
# Idempotent; does nothing where libvirtd and virsh exist.
set -euo pipefail

if command -v libvirtd >/dev/null 2>&1 && command -v virsh >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install-libvirt: not root or no apt-get: install libvirt-daemon-system yourself (the libvirt tests skip without it)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends \
  libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu >/dev/null
for unit in libvirtd virtlogd virtlockd; do
  if command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now "$unit" >/dev/null 2>&1 || true
  fi
  if command -v service >/dev/null 2>&1; then
    service "$unit" stop >/dev/null 2>&1 || true
  fi
done
libvirtd --version
