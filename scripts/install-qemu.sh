#!/usr/bin/env bash
# Installs QEMU (qemu-system-x86) for the tunnel tests and benchmarks, on Debian bookworm.
#
# These machines carry qemu-utils 10.0 from bookworm-backports, which conflicts with
# bookworm's own QEMU 7.2: QEMU comes from the backports suite of the Debian mirror apt
# already uses. Idempotent; does nothing where qemu-system-x86_64 exists.
set -euo pipefail

if command -v qemu-system-x86_64 >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install-qemu: not root or no apt-get: install qemu-system-x86 yourself (the QEMU tests skip without it)" >&2
  exit 0
fi

# The mirror of the configured bookworm suite (deb822 or one-line format).
mirror=$(grep -rhoE '^URIs:\s*\S+' /etc/apt/sources.list.d/*.sources 2>/dev/null \
  | awk '{print $2}' | grep -v security | head -n1 || true)
if [ -z "$mirror" ]; then
  mirror=$(grep -rhoE '^deb\s+\S+\s+bookworm\s' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
    | awk '{print $2}' | head -n1 || true)
fi
mirror=${mirror:-http://deb.debian.org/debian}

if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  cat > /etc/apt/sources.list.d/vmotion-bookworm-backports.sources <<SRC
Types: deb
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q -t bookworm-backports qemu-system-x86 >/dev/null
qemu-system-x86_64 --version | head -n1
