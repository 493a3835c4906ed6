#!/usr/bin/env bash
# Runs a libvirtd (Debian's libvirt 9.0, monolithic) as one "host" of a migration test
# bed on this machine: its own mount and UTS namespaces, in which DIR's folders stand
# over /etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/cache/libvirt,
# /var/log/libvirt and /run/vmotion, its own host UUID (libvirt refuses to migrate to a
# host with its own UUID) and host name. Its control socket is DIR/sock/libvirt-sock,
# reachable from every namespace:
#
#   virsh -c "qemu+unix:///system?socket=DIR/sock/libvirt-sock" ...
#
# Run another program in the host's namespaces (a vmotion-recv that delivers to its
# QEMUs' /run/vmotion sockets, a vmotion-send that listens for them):
#
#   nsenter --mount --uts --target "$(cat DIR/libvirtd.pid)" -- PROGRAM ...
#
# Usage: scripts/libvirt-host.sh DIR NAME UUID    (as root; libvirtd stays in the
# foreground: stop it with SIGTERM; destroy its domains first, they outlive it)
#
# QEMU runs as root without cgroups, namespaces or a security driver: Debian's defaults
# (QEMU as libvirt-qemu) booted and migrated much slower in a lab run here (not
# investigated; see docs/libvirt.md), and need virtlogd.
set -euo pipefail

dir=$1 name=$2 uuid=$3
if [ "$(id -u)" != 0 ]; then
  echo "libvirt-host: needs root (mount namespaces)" >&2
  exit 2
fi
for tool in libvirtd unshare; do
  command -v "$tool" >/dev/null 2>&1 || { echo "libvirt-host: $tool not found" >&2; exit 2; }
done
mkdir -p "$dir"/{etc,run,lib,cache,log/qemu,sock,vmotion}
cp -a /etc/libvirt/. "$dir/etc/"
cp -a /var/lib/libvirt/. "$dir/lib/" 2>/dev/null || true
cat >"$dir/etc/libvirtd.conf" <<CONF
unix_sock_dir = "$dir/sock"
unix_sock_group = "root"
unix_sock_rw_perms = "0770"
auth_unix_rw = "none"
auth_unix_ro = "none"
host_uuid = "$uuid"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
CONF
cat >"$dir/etc/qemu.conf" <<CONF
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
stdio_handler = "file"
namespaces = [ ]
CONF
# The mount points must exist in the namespace we start from.
mkdir -p /run/libvirt /run/vmotion /var/cache/libvirt /var/log/libvirt /var/lib/libvirt
exec unshare --mount --uts --propagation private /bin/sh -c "
  hostname '$name'
  mount --bind '$dir/etc' /etc/libvirt
  mount --bind '$dir/run' /run/libvirt
  mount --bind '$dir/lib' /var/lib/libvirt
  mount --bind '$dir/cache' /var/cache/libvirt
  mount --bind '$dir/log' /var/log/libvirt
  mount --bind '$dir/vmotion' /run/vmotion
  exec libvirtd -f /etc/libvirt/libvirtd.conf -p '$dir/libvirtd.pid'
"
