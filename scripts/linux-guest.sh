#!/usr/bin/env bash
# Builds a bootable Linux guest for the tests, benchmarks and docs from Debian's packages
# only: the kernel of `linux-image-cloud-amd64` and busybox from `busybox-static`, taken
# with `apt-get download` + `dpkg -x` (nothing is installed, nothing goes into /boot),
# and an initramfs whose init
#   - prints a heartbeat on the serial console every 100 ms:
#       vmotion-heartbeat <counter> <uptime in s>
#     (the counter lives in guest memory, so after a live migration it goes on from the
#     source's last value);
#   - keeps rewriting `vmotion.dirty_mib=N` MiB of tmpfs (kernel command line; default 0)
#     with random bytes, pausing `vmotion.dirty_pause_ms=M` between passes (default 0).
#
# Usage: scripts/linux-guest.sh [OUT_DIR]     (default target/linux-guest)
# Prints the folder holding `vmlinuz` and `initramfs.cpio.gz`. Cached: does nothing when
# both exist and this script has not changed. Exit 2 (with the reason on stderr) where the
# packages cannot be had: the tests that need the guest skip, saying why.
set -euo pipefail
cd "$(dirname "$0")/.."

out="${1:-target/linux-guest}"
stamp="$(sha256sum "$0" | cut -c1-16)"
if [ -f "$out/vmlinuz" ] && [ -f "$out/initramfs.cpio.gz" ] && [ "$(cat "$out/stamp" 2>/dev/null)" = "$stamp" ]; then
  echo "$out"
  exit 0
fi
for tool in apt-get apt-cache dpkg gzip; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "linux-guest: $tool not found: cannot build the Linux guest (needs Debian's apt-get, dpkg, gzip)" >&2
    exit 2
  fi
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"

# The kernel package the meta-package points at today (bookworm's cloud kernel).
kernel_package() {
  apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}'
}
kpkg="$(kernel_package)"
if [ -z "$kpkg" ] && [ "$(id -u)" = 0 ]; then
  apt-get update -q >/dev/null 2>&1 || true
  kpkg="$(kernel_package)"
fi
if [ -z "$kpkg" ]; then
  echo "linux-guest: apt-cache knows no linux-image-cloud-amd64 (run apt-get update, as root)" >&2
  exit 2
fi
if ! (cd "$work" && apt-get download "$kpkg" busybox-static >"$work/apt.log" 2>&1); then
  echo "linux-guest: apt-get download $kpkg busybox-static failed:" >&2
  tail -n 5 "$work/apt.log" >&2
  exit 2
fi
mkdir -p "$work/kernel" "$work/bb" "$work/root"
dpkg -x "$work"/linux-image-*.deb "$work/kernel"
dpkg -x "$work"/busybox-static_*.deb "$work/bb"

root="$work/root"
mkdir -p "$root"/{bin,sbin,proc,sys,dev,mem,tmp}
cp "$work/bb/bin/busybox" "$root/bin/busybox"
for applet in sh mount sleep usleep dd cat echo mkdir head cut tr awk; do
  ln -s busybox "$root/bin/$applet"
done
cat >"$root/init" <<'INIT'
#!/bin/sh
# vmotion's Linux test guest: a heartbeat on the serial console, and memory it keeps
# rewriting. See scripts/linux-guest.sh.
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
dirty_mib=0
pause_ms=0
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    vmotion.dirty_mib=*) dirty_mib="${arg#*=}" ;;
    vmotion.dirty_pause_ms=*) pause_ms="${arg#*=}" ;;
  esac
done
console=/dev/ttyS0
[ -c "$console" ] || console=/dev/console
echo "vmotion-guest: up, rewriting $dirty_mib MiB every pass, pause ${pause_ms} ms" >"$console"
if [ "$dirty_mib" -gt 0 ]; then
  mount -t tmpfs -o size=$((dirty_mib * 2 + 8))m tmpfs /mem
  # Random bytes once; each pass copies them over the whole area again.
  dd if=/dev/urandom of=/mem/seed bs=1M count="$dirty_mib" 2>/dev/null
  (
    while :; do
      dd if=/mem/seed of=/mem/area bs=1M conv=notrunc 2>/dev/null
      [ "$pause_ms" -gt 0 ] && usleep $((pause_ms * 1000))
    done
  ) &
  echo "vmotion-guest: dirtying" >"$console"
fi
n=0
while :; do
  read -r up _ </proc/uptime
  echo "vmotion-heartbeat $n $up" >"$console"
  n=$((n + 1))
  usleep 100000
done
INIT
chmod 755 "$root/init"

mkdir -p "$out"
cp "$work"/kernel/boot/vmlinuz-* "$out/vmlinuz"
# busybox's own cpio writes the archive: no cpio package needed on the host.
(cd "$root" && find . | "$work/bb/bin/busybox" cpio -o -H newc -R 0:0 2>/dev/null | gzip -1) >"$out/initramfs.cpio.gz"
echo "$kpkg" >"$out/kernel-package"
echo "$stamp" >"$out/stamp"
echo "$out"
