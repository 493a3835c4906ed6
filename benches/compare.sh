#!/usr/bin/env bash
# One command, one session, interleaved: the same guest bytes over loopback by plain TCP,
# by direct rustls (TLS 1.3, AES-256-GCM, ring, 256 KiB writes; also on sockets with
# vmotion's TCP_NOTSENT_LOWAT, "rustls+lowat") and by vmotion migrations
# (plaintext and encrypted, 1 and 2 streams), each between two processes
# (benches/src/bin/vmotion-bench-peer.rs), into cold destination memory (faulted in as
# the bytes arrive) and into warm (faulted in before the clock). Prints a table of
# medians and the ratios; every run's destination is checked equal to its source.
#
#   benches/compare.sh                      # 2 GiB, 3 rounds
#   MIB=512 ROUNDS=5 benches/compare.sh
#   STATES="warm" benches/compare.sh        # only one of cold / warm
set -euo pipefail
cd "$(dirname "$0")/.."

MIB=${MIB:-2048}
ROUNDS=${ROUNDS:-3}
STATES=${STATES:-"cold warm"}
CELLS=("tcp 1" "tls 1" "tls-lowat 1" "plain 1" "encrypted 1" "plain 2" "encrypted 2")

echo "== $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs, load: $(cut -d' ' -f1-3 /proc/loadavg)"
load=$(cut -d' ' -f1 /proc/loadavg)
if awk -v l="$load" 'BEGIN { exit !(l > 1.5) }'; then
    echo "warning: load average $load: another job is running, the figures are void" >&2
fi
cargo build --release -q -p vmotion-benches --bin vmotion-bench-peer
peer=target/release/vmotion-bench-peer

results=$(mktemp)
trap 'rm -f "$results"' EXIT
for round in $(seq 1 "$ROUNDS"); do
    for state in $STATES; do
        for cell in "${CELLS[@]}"; do
            read -r kind streams <<<"$cell"
            warm=()
            [ "$state" = warm ] && warm=(--warm)
            line=$("$peer" run "$kind" --mib "$MIB" --streams "$streams" --seed "$round" "${warm[@]}")
            echo "round $round: $line" >&2
            echo "$line" >>"$results"
        done
    done
done

python3 - "$results" "$MIB" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
mib = sys.argv[2]
assert all(r["digest_ok"] for r in rows), "a destination differs from its source"
cells = {}
for r in rows:
    cells.setdefault((r["warm"], r["kind"], r["streams"]), []).append(r["gbps"])
def med(warm, kind, streams):
    v = cells.get((warm, kind, streams))
    return statistics.median(v) if v else None
print(f"\n{mib} MiB, GB/s (10^9 bytes/s), median (min-max) of {len(next(iter(cells.values())))} rounds\n")
print("| destination | TCP | rustls | rustls+lowat | vmotion plaintext 1 / 2 streams | vmotion encrypted 1 / 2 streams | encrypted / rustls (1 / 2 streams) | encrypted 1 / rustls+lowat | encrypted / plaintext (1 / 2) |")
print("|---|---|---|---|---|---|---|---|---|")
for warm in (False, True):
    if not any(k[0] == warm for k in cells):
        continue
    def show(kind, streams):
        v = sorted(cells[(warm, kind, streams)])
        return f"{statistics.median(v):.2f} ({v[0]:.2f}-{v[-1]:.2f})"
    tls = med(warm, "tls", 1)
    lowat = med(warm, "tls-lowat", 1)
    e1, e2 = med(warm, "encrypted", 1), med(warm, "encrypted", 2)
    p1, p2 = med(warm, "plain", 1), med(warm, "plain", 2)
    print(f"| {'warm' if warm else 'cold'} | {show('tcp', 1)} | {show('tls', 1)} | {show('tls-lowat', 1)} | "
          f"{show('plain', 1)} / {show('plain', 2)} | {show('encrypted', 1)} / {show('encrypted', 2)} | "
          f"{e1 / tls:.2f} / {e2 / tls:.2f} | {e1 / lowat:.2f} | {e1 / p1:.2f} / {e2 / p2:.2f} |")
peaks = [r["receiver_peak_rss_beyond_guest_mib"] for r in rows if r["kind"] in ("plain", "encrypted")]
print(f"\nvmotion receiver's peak RSS beyond the guest's memory: at most {max(peaks)} MiB")
EOF
