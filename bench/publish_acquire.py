"""publish and copy_to throughput against a plain numpy copy of the same bytes, and match/acquire latency.

    python bench/publish_acquire.py [--reps 7] [--max-mib 256] [--json bench/results/publish_acquire.json]

Every figure is a median over --reps repetitions, measured in this one process beside
its baseline (np.copyto of the same number of bytes between two pre-touched buffers),
and reported as a ratio.  The pool is prefaulted (MAP_POPULATE), as a production pool is.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# the measurements are shared with the packaged suite (pykvshm bench)
from pykvshm.benchmarks.publish_acquire import bench_latency, bench_size


def fmt_bytes(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--max-mib", type=int, default=256)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    sizes = [64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20]
    sizes = [s for s in sizes if s <= args.max_mib << 20]
    rows = []
    print(f"{'KV bytes':>9} {'geometry':>15} {'publish GB/s':>13} {'copy_to GB/s':>13} {'memcpy GB/s':>12} "
          f"{'publish/memcpy':>15} {'copy_to/memcpy':>15}")
    for s in sizes:
        r = bench_size(s, args.reps)
        rows.append(r)
        print(f"{fmt_bytes(s):>9} {r['geometry']:>15} {r['publish_gbps']:13.2f} {r['copy_to_gbps']:13.2f} "
              f"{r['memcpy_gbps']:12.2f} {r['publish_vs_memcpy']:14.2f}x {r['copy_to_vs_memcpy']:14.2f}x", flush=True)
    lat = bench_latency(args.reps)
    for k, v in lat.items():
        print(f"{k:>30}: {v:8.2f} us")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"sizes": rows, "latency": lat}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
