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
import statistics
import sys
import time
import uuid

import numpy as np

import pykvshm

SMALL = pykvshm.KVSpec(num_layers=2, num_kv_heads=8, head_dim=128, block_tokens=8, dtype="float16")  # 32 KiB blocks
LLAMA3_8B = pykvshm.KVSpec(num_layers=32, num_kv_heads=8, head_dim=128, block_tokens=16, dtype="float16")  # 2 MiB


def median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def fmt_bytes(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def bench_size(total: int, reps: int) -> dict[str, object]:
    spec = SMALL if total < (2 << 20) else LLAMA3_8B
    n = total // spec.block_bytes
    name = f"pykvshm-bench-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    cap = max(64 << 20, (reps + 2) * n * spec.block_bytes + (8 << 20))
    rng = np.random.default_rng(0)
    data = rng.integers(0, 1 << 16, size=(n, *spec.block_shape), dtype=np.uint16).view(np.float16)
    out = np.empty_like(data)
    out.fill(0)
    # The baseline writes to a different destination each repetition, as publish does
    # (fresh blocks), so neither side is flattered by a destination already in cache.
    scratches = [np.zeros_like(data) for _ in range(min(reps + 1, max(2, (512 << 20) // max(data.nbytes, 1))))]
    scratch = scratches[0]
    rot = iter(range(10**9))
    pool = pykvshm.Pool.create(name, spec=spec, capacity=cap, prefault=True)
    try:
        # Keys are computed outside the timed region: publish is what is measured.
        keysets = [pykvshm.block_keys(np.arange(n * spec.block_tokens) + r * 10**7, spec.block_tokens)
                   for r in range(reps + 1)]
        rounds = iter(keysets)

        def publish() -> None:
            stored = pool.publish(next(rounds), data)
            assert stored == n

        def memcpy() -> None:
            np.copyto(scratches[next(rot) % len(scratches)], data)

        publish()  # warm up: first publish touches the index and descriptors
        memcpy()
        t_pub = median_time(publish, reps)
        t_cpy = median_time(memcpy, reps)
        keys = keysets[-1]
        lease = pool.acquire(keys)
        assert len(lease) == n

        def copy_to() -> None:
            lease.copy_to(out)

        def memcpy_out() -> None:
            np.copyto(out, scratch)

        copy_to()
        t_cp = median_time(copy_to, reps)
        t_cpy2 = median_time(memcpy_out, reps)
        assert np.array_equal(out.view(np.uint16), data.view(np.uint16))
        lease.release()
        return {
            "bytes": n * spec.block_bytes,
            "blocks": n,
            "block_bytes": spec.block_bytes,
            "geometry": "llama3-8b fp16" if spec is LLAMA3_8B else "small",
            "publish_gbps": n * spec.block_bytes / t_pub / 1e9,
            "copy_to_gbps": n * spec.block_bytes / t_cp / 1e9,
            "memcpy_gbps": n * spec.block_bytes / min(t_cpy, t_cpy2) / 1e9,
            "publish_vs_memcpy": min(t_cpy, t_cpy2) / t_pub,
            "copy_to_vs_memcpy": min(t_cpy, t_cpy2) / t_cp,
        }
    finally:
        pool.close()
        pykvshm.Pool.destroy(name)


def bench_latency(reps: int) -> dict[str, float]:
    spec = pykvshm.KVSpec(num_layers=1, num_kv_heads=1, head_dim=16, block_tokens=16, dtype="float16")
    name = f"pykvshm-bench-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    pool = pykvshm.Pool.create(name, spec=spec, capacity="16MiB", prefault=True)
    try:
        keys = pykvshm.block_keys(np.arange(128 * 16), 16, salt=b"latency")
        pool.publish(keys, np.zeros((128, *spec.block_shape), dtype=np.float16))
        kb = b"".join(keys)
        loops = 2000

        def per_call(fn) -> float:
            samples = []
            for _ in range(max(reps, 5)):
                t = time.perf_counter()
                for _ in range(loops):
                    fn()
                samples.append((time.perf_counter() - t) / loops)
            return statistics.median(samples) * 1e6

        def acquire_release() -> None:
            pool.acquire(keys).release()

        return {
            "match_128_keys_us": per_call(lambda: pool.match(keys)),
            "match_128_keys_prejoined_us": per_call(lambda: pool._core.match(kb)),
            "acquire_release_128_us": per_call(acquire_release),
            "block_keys_128_blocks_us": per_call(lambda: pykvshm.block_keys(np.arange(128 * 16), 16)),
        }
    finally:
        pool.close()
        pykvshm.Pool.destroy(name)


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
