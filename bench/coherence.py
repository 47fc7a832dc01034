"""Coherent against noncoherent pools, side by side: what the cross-host protocol costs on one host.

    python bench/coherence.py [--reps 7] [--seconds 1] [--quick] [--json docs/results/coherence.json]

A noncoherent pool (multi-host CXL 2.0) writes back every line it writes (clwb or clflushopt,
then sfence), invalidates every metadata line before reading it, and runs every metadata change
under the pool lock (a per-host lock plus a bakery among hosts, docs/design/coherence.md). This
script measures, for both modes in the same run with the repetitions interleaved:

* publish GB/s and acquire + copy_to + release GB/s of a request's KV (prefaulted pool);
* latency of match() and of acquire()+release() over 128 keys;
* alloc+free block operations per second, one process, and two processes (in the noncoherent
  pool the second one poses as another host, so the two meet in the bakery).

On one coherent host the flushes and invalidations are real instructions with real cost, but
the memory is local DRAM: a CXL device adds its own latency to every write-back and refill.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
import uuid
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import pykvshm  # noqa: E402
from pykvshm import _core  # noqa: E402

MODES = ("coherent", "noncoherent")
SMALL = pykvshm.KVSpec(num_layers=2, num_kv_heads=8, head_dim=128, block_tokens=8, dtype="float16")  # 32 KiB
LLAMA3_8B = pykvshm.KVSpec(num_layers=32, num_kv_heads=8, head_dim=128, block_tokens=16, dtype="float16")  # 2 MiB
CTX = mp.get_context("fork")


def _name(tag: str) -> str:
    return f"pykvshm-bench-coh-{tag}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def bench_throughput(total: int, reps: int) -> dict[str, dict[str, Any]]:
    spec = SMALL if total < (4 << 20) else LLAMA3_8B
    n = max(1, total // spec.block_bytes)
    nbytes = n * spec.block_bytes
    cap = max(64 << 20, (reps + 2) * nbytes + (8 << 20))
    data = np.random.default_rng(0).integers(0, 1 << 16, size=(n, *spec.block_shape), dtype=np.uint16).view(np.float16)
    out = np.zeros_like(data)
    pools = {m: pykvshm.Pool.create(_name(m[:2]), spec=spec, capacity=cap, prefault=True, coherence=m) for m in MODES}
    times: dict[str, dict[str, list[float]]] = {m: {"publish": [], "acquire_copy": []} for m in MODES}
    lines: dict[str, dict[str, float]] = {}
    try:
        keysets = [pykvshm.block_keys(np.arange(n * spec.block_tokens) + r * 10**7, spec.block_tokens)
                   for r in range(reps + 1)]
        for m, pool in pools.items():  # warm-up: the first publish touches index and descriptors
            assert pool.publish(keysets[-1], data) == n
        for r in range(reps):
            for m, pool in pools.items():  # interleaved: both modes see the same machine state
                f0, i0 = _core.lines_flushed(), _core.lines_invalidated()
                t = time.perf_counter()
                assert pool.publish(keysets[r], data) == n
                times[m]["publish"].append(time.perf_counter() - t)
                t = time.perf_counter()
                with pool.acquire(keysets[r]) as lease:
                    lease.copy_to(out)
                times[m]["acquire_copy"].append(time.perf_counter() - t)
                lines[m] = {"flushed": (_core.lines_flushed() - f0) * 64 / nbytes,
                            "invalidated": (_core.lines_invalidated() - i0) * 64 / nbytes}
        assert np.array_equal(out.view(np.uint16), data.view(np.uint16))
    finally:
        for pool in pools.values():
            name = pool.name
            pool.close()
            pykvshm.Pool.destroy(name)
    res: dict[str, dict[str, Any]] = {}
    for m in MODES:
        tp, ta = statistics.median(times[m]["publish"]), statistics.median(times[m]["acquire_copy"])
        res[m] = {"bytes": nbytes, "blocks": n, "block_bytes": spec.block_bytes,
                  "publish_gbps": nbytes / tp / 1e9, "acquire_copy_gbps": nbytes / ta / 1e9,
                  "bytes_written_back_per_byte": lines[m]["flushed"],
                  "bytes_invalidated_per_byte": lines[m]["invalidated"]}
    return res


def bench_latency(reps: int, loops: int) -> dict[str, dict[str, float]]:
    spec = pykvshm.KVSpec(num_layers=1, num_kv_heads=1, head_dim=16, block_tokens=16, dtype="float16")
    keys = pykvshm.block_keys(np.arange(128 * 16), 16, salt=b"latency")
    pools = {m: pykvshm.Pool.create(_name(m[:2]), spec=spec, capacity="16MiB", prefault=True, coherence=m)
             for m in MODES}
    samples: dict[str, dict[str, list[float]]] = {m: {"match": [], "acquire_release": []} for m in MODES}
    try:
        for pool in pools.values():
            pool.publish(keys, np.zeros((128, *spec.block_shape), dtype=np.float16))
        for _ in range(max(reps, 5)):
            for m, pool in pools.items():
                t = time.perf_counter()
                for _ in range(loops):
                    assert pool.match(keys) == 128
                samples[m]["match"].append((time.perf_counter() - t) / loops)
                t = time.perf_counter()
                for _ in range(loops):
                    pool.acquire(keys).release()
                samples[m]["acquire_release"].append((time.perf_counter() - t) / loops)
    finally:
        for pool in pools.values():
            name = pool.name
            pool.close()
            pykvshm.Pool.destroy(name)
    return {m: {"match_128_keys_us": statistics.median(samples[m]["match"]) * 1e6,
                "acquire_release_128_keys_us": statistics.median(samples[m]["acquire_release"]) * 1e6}
            for m in MODES}


def _alloc_worker(name: str, host_id: int, seconds: float, batch: int, barrier, out, i: int) -> None:
    pool = pykvshm.Pool.open(name, host_id=host_id)
    barrier.wait()
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            pool.free(pool.alloc(batch, evict=False))
        n += 20 * batch
    out[i] = 2 * n / (time.perf_counter() - t0)  # alloc + free: 2 block operations per block
    pool.close()
    os._exit(0)


def bench_alloc(seconds: float) -> dict[str, dict[str, float]]:
    spec = pykvshm.KVSpec(1, 1, 16, 16, "float16")
    res: dict[str, dict[str, float]] = {m: {} for m in MODES}
    for procs in (1, 2):
        for batch in (1, 64):
            for m in MODES:
                name = _name("alloc")
                with pykvshm.Pool.create(name, spec=spec, capacity="16MiB", coherence=m):
                    out = CTX.RawArray("d", procs)
                    barrier = CTX.Barrier(procs)
                    # the second process of the noncoherent pool poses as another host
                    hosts = [0, 0xB0B if m == "noncoherent" else 0]
                    ps = [CTX.Process(target=_alloc_worker, args=(name, hosts[i], seconds, batch, barrier, out, i))
                          for i in range(procs)]
                    for p in ps:
                        p.start()
                    for p in ps:
                        p.join()
                pykvshm.Pool.destroy(name)
                res[m][f"{procs}proc_batch{batch}_block_ops_per_s"] = float(sum(out))
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=1.0, help="per alloc figure")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few repetitions (a smoke test)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    sizes = [256 << 10, 4 << 20, 64 << 20]
    reps, loops, seconds = args.reps, 500, args.seconds
    if args.quick:
        sizes, reps, loops, seconds = [256 << 10], 3, 20, 0.2
    print(f"flush instruction: {_core.flush_instruction()}, invalidate: {_core.invalidate_instruction()}")
    report: dict[str, Any] = {"benchmark": "coherence", "environment": common.environment(),
                              "config": {"reps": reps, "sizes": sizes, "loops": loops, "alloc_seconds": seconds,
                                         "flush": _core.flush_instruction(),
                                         "invalidate": _core.invalidate_instruction()},
                              "throughput": {}, "latency": {}, "alloc": {}}
    rows = []
    for s in sizes:
        r = bench_throughput(s, reps)
        report["throughput"][common.fmt_bytes(s).replace(" ", "")] = r
        c, nc = r["coherent"], r["noncoherent"]
        rows.append([common.fmt_bytes(s), f"{c['publish_gbps']:.2f}", f"{nc['publish_gbps']:.2f}",
                     f"{nc['publish_gbps'] / c['publish_gbps']:.2f}x", f"{c['acquire_copy_gbps']:.2f}",
                     f"{nc['acquire_copy_gbps']:.2f}", f"{nc['acquire_copy_gbps'] / c['acquire_copy_gbps']:.2f}x"])
    print(common.markdown_table(["KV bytes", "publish GB/s coherent", "noncoherent", "nc/c",
                                 "acquire+copy GB/s coherent", "noncoherent", "nc/c"], rows))
    lat = bench_latency(reps, loops)
    report["latency"] = lat
    print()
    print(common.markdown_table(
        ["latency (128 keys)", "coherent", "noncoherent", "nc/c"],
        [[k.replace("_128_keys_us", ""), f"{lat['coherent'][k]:.1f} µs", f"{lat['noncoherent'][k]:.1f} µs",
          f"{lat['noncoherent'][k] / lat['coherent'][k]:.1f}x"] for k in lat["coherent"]]))
    al = bench_alloc(seconds)
    report["alloc"] = al
    print()
    print(common.markdown_table(
        ["alloc+free block ops/s", "coherent", "noncoherent", "nc/c"],
        [[k.replace("_block_ops_per_s", "").replace("proc_", " proc, ").replace("batch", "batch "),
          f"{al['coherent'][k]:,.0f}", f"{al['noncoherent'][k]:,.0f}",
          f"{al['noncoherent'][k] / al['coherent'][k]:.3f}x"] for k in al["coherent"]]))
    if args.json:
        common.write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
