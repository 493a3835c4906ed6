#!/usr/bin/env python3
"""Prints seal/open throughput and vmotion/ring ratios from criterion's last run.

Run `cargo bench -p vmotion-benches --bench seal` first; criterion writes its estimates
under target/criterion/. Uses the median of each benchmark.
"""
import json
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "criterion")


def median_ns(group, impl, size):
    path = os.path.join(ROOT, group, impl, str(size), "new", "estimates.json")
    with open(path) as f:
        return json.load(f)["median"]["point_estimate"]


def main():
    sizes = [4096, 65536, 262144]
    print("| operation | frame | ring GB/s | vmotion GB/s | vmotion / ring |")
    print("|---|---|---|---|---|")
    worst = None
    for group in ["seal", "open"]:
        for size in sizes:
            try:
                ring, ours = median_ns(group, "ring", size), median_ns(group, "vmotion", size)
            except FileNotFoundError as e:
                sys.exit(f"missing estimate ({e.filename}): run the benchmark first")
            ratio = ring / ours
            if size >= 65536:
                worst = ratio if worst is None else min(worst, ratio)
            print(f"| {group} | {size // 1024} KiB | {size / ring:.2f} | {size / ours:.2f} | {ratio:.3f} |")
    print(f"\nlowest ratio at 64 KiB and above: {worst:.3f} (goal: >= 0.9)")


if __name__ == "__main__":
    main()
