"""Opt-in benchmark (issue 15): does a pool that has run for weeks probe like a fresh one?

Ages a pool by publishing --cycles blocks into it (each publish into the full pool evicts one block,
so each is one publish/evict cycle of the index), then times, on the aged pool and on a fresh pool
of the same size filled once, in the same run:
  * a miss: ``match`` of one key that was never published (probes until an empty slot), per call;
  * a publish into the full pool (evicts, removes an entry, inserts one).
Prints the index census of both pools and the aged/fresh ratios, median and spread over --repeats
runs.  Before tombstones were reclaimed the aged pool had no empty slot after ~1.3M cycles and a
miss cost 3.5x a fresh pool's.

    python bench/tombstones.py --cycles 10000000 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import pykvshm
from pykvshm.testing import unique_name

SPEC = pykvshm.KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, block_tokens=4, dtype="float16")
BATCH = 64


def keys(rng: np.random.Generator, n: int = BATCH) -> np.ndarray:
    return rng.integers(0, 2**63, size=(n, 2), dtype=np.uint64).view(np.uint8).reshape(n, 16)


def age(p: pykvshm.Pool, cycles: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    data = np.zeros((BATCH, *SPEC.block_shape), dtype=np.float16)
    for _ in range(max(1, cycles // BATCH)):
        p.publish(keys(rng), data)


def time_ops(p: pykvshm.Pool, seed: int, iters: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    absent = [keys(rng, 1) for _ in range(1024)]  # match stops at the first miss: one key a call
    t0 = time.perf_counter()
    for i in range(iters * 8):
        p.match(absent[i % 1024])
    miss_ns = (time.perf_counter() - t0) / (iters * 8) * 1e9
    data = np.zeros((BATCH, *SPEC.block_shape), dtype=np.float16)
    fresh_keys = [keys(rng) for _ in range(iters)]
    t0 = time.perf_counter()
    for k in fresh_keys:
        p.publish(k, data)
    pub_ns = (time.perf_counter() - t0) / (iters * BATCH) * 1e9
    return miss_ns, pub_ns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=10_000_000, help="publish/evict cycles that age the pool")
    ap.add_argument("--capacity", default="64MiB")
    ap.add_argument("--coherence", default="coherent", choices=["coherent", "noncoherent"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--iters", type=int, default=2000, help="timed batches of 64 per measurement")
    a = ap.parse_args()
    names = [f"issue15-tomb-{unique_name()}" for _ in range(2)]
    try:
        aged = pykvshm.Pool.create(names[0], spec=SPEC, capacity=a.capacity, coherence=a.coherence)
        fresh = pykvshm.Pool.create(names[1], spec=SPEC, capacity=a.capacity, coherence=a.coherence)
        t0 = time.perf_counter()
        age(aged, a.cycles, 1)
        print(f"aged {a.cycles:,} cycles in {time.perf_counter() - t0:.1f} s")
        age(fresh, aged.num_blocks, 2)  # full once, as the aged pool is
        for label, p in (("aged", aged), ("fresh", fresh)):
            c = p._core.index_census()
            total = sum(c.values())
            print(f"{label:5s} index: {c['empty'] / total:6.1%} empty, {c['tombstones'] / total:6.1%} tombstones, "
                  f"{c['live'] / total:6.1%} live ({total} slots)")
        miss, pub = [], []
        for r in range(a.repeats):
            am, ap_ = time_ops(aged, 100 + r, a.iters)
            fm, fp = time_ops(fresh, 100 + r, a.iters)
            miss.append(am / fm)
            pub.append(ap_ / fp)
            print(f"run {r}: miss {am:.0f} vs {fm:.0f} ns/call, publish {ap_:.0f} vs {fp:.0f} ns/block (aged vs fresh)")
        for label, xs in (("miss", miss), ("publish into a full pool", pub)):
            print(f"{label}: aged/fresh = {statistics.median(xs):.2f} (median of {len(xs)}, "
                  f"spread {min(xs):.2f}-{max(xs):.2f})")
        aged.check()
        aged.close()
        fresh.close()
    finally:
        for n in names:
            try:
                pykvshm.Pool.destroy(n)
            except pykvshm.errors.PoolNotFoundError:
                pass


if __name__ == "__main__":
    main()
