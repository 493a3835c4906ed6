#!/usr/bin/env bash
# Lays out vmotion for a host install in a folder: binaries, man pages and shell
# completions generated from the programs' own argument definitions, and the systemd
# units with their ExecStart pointing at PREFIX/bin.
#
# Usage: scripts/dist.sh OUT [--prefix /usr] [--bin-dir DIR]
#   (without --bin-dir it builds the release binaries first: cargo build --release)
#
#   OUT/bin/{vmotion-send,vmotion-recv,vmotion-evacuate,vmotion-keyservice,vmotion-demo}
#   OUT/share/man/man1/*.1
#   OUT/share/bash-completion/completions/*   OUT/share/zsh/site-functions/_*
#   OUT/share/fish/vendor_completions.d/*.fish
#   OUT/lib/systemd/system/{vmotion-recv,vmotion-keyservice}.service
#
# Then e.g. `cp -a OUT/. /usr/` (with --prefix /usr), `systemctl daemon-reload`. Where
# systemd-analyze exists, the units are checked with `systemd-analyze verify`.
set -euo pipefail
cd "$(dirname "$0")/.."

out=${1:?usage: scripts/dist.sh OUT [--prefix /usr] [--bin-dir DIR]}
shift
prefix=/usr
bindir=
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix=$2; shift 2 ;;
    --bin-dir) bindir=$2; shift 2 ;;
    *) echo "dist: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ -z "$bindir" ]; then
  cargo build --release --bins -p vmotion-cli -p vmotion-keyservice
  bindir=target/release
fi

bins=(vmotion-send vmotion-recv vmotion-evacuate vmotion-keyservice vmotion-demo)
install -d "$out/bin" "$out/share/man/man1" "$out/share/bash-completion/completions" \
  "$out/share/zsh/site-functions" "$out/share/fish/vendor_completions.d" \
  "$out/lib/systemd/system"
for b in "${bins[@]}"; do
  install -m 0755 "$bindir/$b" "$out/bin/$b"
  "$out/bin/$b" --generate man >"$out/share/man/man1/$b.1"
  "$out/bin/$b" --generate bash >"$out/share/bash-completion/completions/$b"
  "$out/bin/$b" --generate zsh >"$out/share/zsh/site-functions/_$b"
  "$out/bin/$b" --generate fish >"$out/share/fish/vendor_completions.d/$b.fish"
done
for unit in packaging/systemd/*.service; do
  sed "s#@BINDIR@#$prefix/bin#g" "$unit" >"$out/lib/systemd/system/$(basename "$unit")"
done

if command -v systemd-analyze >/dev/null 2>&1; then
  # Verified against the binaries just laid out (ExecStart must be executable).
  check=$(mktemp -d)
  trap 'rm -rf "$check"' EXIT
  for unit in packaging/systemd/*.service; do
    sed "s#@BINDIR@#$(cd "$out/bin" && pwd)#g" "$unit" >"$check/$(basename "$unit")"
  done
  said=$(cd "$check" && systemd-analyze verify --man=no ./*.service 2>&1) || true
  if [ -n "$said" ]; then
    echo "dist: systemd-analyze verify:" >&2
    echo "$said" >&2
    exit 1
  fi
fi
echo "$out"
