"""In one process: publish and copy_to of 256 MiB of Llama-3-8B KV (128 blocks of 2 MiB) through the
copy engine, per page size (a pool on /dev/shm with 4 KiB pages; on hugetlbfs with 2 MiB pages),
kernel (memcpy, stream = non-temporal stores, auto) and thread count, beside numpy.copyto of the
same bytes (one thread, between two warm anonymous buffers), measured interleaved in the same run.

    python bench/copy_kernels.py                      # /dev/shm only
    python bench/copy_kernels.py --hugetlbfs auto     # as root: reserve 2 MiB pages and mount
                                                      # hugetlbfs in a private directory (restored after)
    python bench/copy_kernels.py --hugetlbfs /mnt/hugetlb --runs 5

Each figure is the median (and min..max) over ``--runs`` runs, each run the median of ``--reps``
repetitions. Writes bench/results/copy_kernels.json (or --out).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterator

import numpy as np

import pykvshm

SPEC = pykvshm.KVSpec(num_layers=32, num_kv_heads=8, head_dim=128, block_tokens=16, dtype="float16")  # 2 MiB blocks
N = 128  # 256 MiB


@contextlib.contextmanager
def hugetlbfs(where: str | None) -> Iterator[str | None]:
    """A hugetlbfs directory: the one given, or (``auto``, root only) a private mount with enough
    2 MiB pages reserved; the reservation and the mount are undone afterwards."""
    if where in (None, "", "none"):
        yield None
        return
    if where != "auto":
        yield where
        return
    if os.geteuid() != 0:
        print("--hugetlbfs auto needs root (it reserves pages); skipping 2 MiB pages", file=sys.stderr)
        yield None
        return
    nr = "/proc/sys/vm/nr_hugepages"
    before = int(open(nr).read())
    need = before + (2 * N * SPEC.block_bytes) // (2 << 20) + 64
    mnt = tempfile.mkdtemp(prefix="pykvshm-hugetlb-")
    try:
        with open(nr, "w") as f:
            f.write(str(need))
        subprocess.run(["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "none", mnt], check=True)
        yield mnt
    finally:
        subprocess.run(["umount", mnt], check=False)
        os.rmdir(mnt)
        with open(nr, "w") as f:
            f.write(str(before))


def measure(path: str, data: np.ndarray, dst: np.ndarray, kernel: str, threads: int, reps: int,
            memcpy: list[float]) -> dict[str, float]:
    with contextlib.suppress(pykvshm.errors.PoolNotFoundError):
        pykvshm.Pool.destroy(path)
    p = pykvshm.Pool.create(path, spec=SPEC, capacity=(2 * N + 4) * SPEC.block_bytes, prefault=True,
                            copy_kernel=kernel, copy_threads=threads)
    try:
        pub, cp = [], []
        for r in range(reps):
            keys = pykvshm.block_keys(np.arange(N * 16) + r * 10**7, 16)
            t = time.perf_counter()
            p.publish(keys, data)
            pub.append(time.perf_counter() - t)
            t = time.perf_counter()
            np.copyto(dst, data)
            memcpy.append(time.perf_counter() - t)
            with p.acquire(keys) as lease:
                t = time.perf_counter()
                lease.copy_to(dst)
                cp.append(time.perf_counter() - t)
            assert dst.tobytes()[:1 << 16] == data.tobytes()[:1 << 16]
        placement = p.placement
        return {"publish_s": statistics.median(pub), "copy_to_s": statistics.median(cp),
                "page_size": placement.get("page_size")}
    finally:
        p.close()
        pykvshm.Pool.destroy(path)


def span_sizes(reps: int = 200) -> list[dict[str, Any]]:
    """One span copied between a pool block and an ordinary numpy buffer, per size, direction and kernel
    (median of ``reps``, in microseconds): where the streaming kernel starts to pay."""
    name = f"copykern-spans-{os.getpid()}"
    with contextlib.suppress(pykvshm.errors.PoolNotFoundError):
        pykvshm.Pool.destroy(name)
    p = pykvshm.Pool.create(name, spec=SPEC, capacity=8 * SPEC.block_bytes, prefault=True)
    buf = np.zeros(2 << 20, np.uint8)
    buf[:] = 1
    pool_addr, buf_addr = int(p._core.block_address(0)), int(buf.ctypes.data)
    rows = []
    try:
        for size in (4 << 10, 32 << 10, 256 << 10, 1 << 20):
            for direction, (dst, src) in (("pool->buffer", (buf_addr, pool_addr)), ("buffer->pool", (pool_addr, buf_addr))):
                row: dict[str, Any] = {"bytes": size, "direction": direction}
                for kname, kcode in (("memcpy", 1), ("stream", 2)):
                    ts = []
                    for _ in range(reps):
                        t = time.perf_counter()
                        pykvshm._core.copy_bytes(dst, src, size, kcode)
                        ts.append(time.perf_counter() - t)
                    row[f"{kname}_us"] = statistics.median(ts) * 1e6
                rows.append(row)
    finally:
        p.close()
        pykvshm.Pool.destroy(name)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hugetlbfs", default=None, help="a hugetlbfs directory, or 'auto' (root)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--kernels", default="memcpy,stream,auto")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "copy_kernels.json"))
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 1 << 16, size=(N, *SPEC.block_shape), dtype=np.uint16).view(np.float16)
    dst = np.zeros_like(data)
    np.copyto(dst, data)
    rows: dict[tuple[str, str, int], dict[str, list[float]]] = {}
    with hugetlbfs(args.hugetlbfs) as huge:
        places = [("/dev/shm, 4 KiB pages", f"copykern-{os.getpid()}")]
        if huge:
            places.append(("hugetlbfs, 2 MiB pages", os.path.join(huge, f"copykern-{os.getpid()}")))
        for run in range(args.runs):
            for label, path in places:
                for kernel in args.kernels.split(","):
                    for threads in [int(t) for t in args.threads.split(",")]:
                        memcpy: list[float] = []
                        r = measure(path, data, dst, kernel, threads, args.reps, memcpy)
                        m = statistics.median(memcpy)
                        row = rows.setdefault((label, kernel, threads), {"publish": [], "copy_to": []})
                        row["publish"].append(m / r["publish_s"])   # x memcpy (1.0 = as fast as memcpy)
                        row["copy_to"].append(m / r["copy_to_s"])
                        row.setdefault("memcpy_GBps", []).append(data.nbytes / m / 1e9)
                        row.setdefault("publish_GBps", []).append(data.nbytes / r["publish_s"] / 1e9)
                        row.setdefault("copy_to_GBps", []).append(data.nbytes / r["copy_to_s"] / 1e9)
    print(f"publish / copy_to of {data.nbytes >> 20} MiB in one process, speed relative to numpy.copyto measured "
          f"in the same run (1.00x = memcpy speed); median [min..max] of {args.runs} runs")
    print("| pages | kernel | threads | publish | copy_to | memcpy GB/s |")
    print("|---|---|---|---|---|---|")
    out = []

    def fmt(xs: list[float]) -> str:
        return f"{statistics.median(xs):.2f}x [{min(xs):.2f}..{max(xs):.2f}]"

    for (label, kernel, threads), r in rows.items():
        print(f"| {label} | {kernel} | {threads} | {fmt(r['publish'])} | {fmt(r['copy_to'])} | "
              f"{statistics.median(r['memcpy_GBps']):.1f} |")
        out.append({"pages": label, "kernel": kernel, "threads": threads, **{k: v for k, v in r.items()}})
    spans = span_sizes()
    print("\none span between a pool block (/dev/shm) and a numpy buffer, median of 200, microseconds")
    print("| bytes | direction | memcpy | stream |")
    print("|---|---|---|---|")
    for r in spans:
        print(f"| {r['bytes'] >> 10} KiB | {r['direction']} | {r['memcpy_us']:.1f} | {r['stream_us']:.1f} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"benchmark": "copy_kernels", "bytes": int(data.nbytes), "runs": args.runs, "reps": args.reps,
                   "rows": out, "spans": spans}, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
