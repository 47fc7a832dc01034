"""Allocator throughput from Python: alloc + free of block batches, in 1 and 2 processes.

Each process loops ``handles = pool.alloc(batch); pool.free(handles)`` on its own handle of one
shared pool; the figure is block ops per second (a block op = one allocation or one free). The
baseline, run by the same harness in the same run, is a process-private Python free list (a
list of block ids: a slice off the end to allocate, ``extend`` to free), which is what a single
engine's own block manager pays and which no other process can see.

Used by ``pykvshm bench`` and by ``bench/alloc.py`` (which adds the C++ figures).
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import time
from typing import Any

import numpy as np

import pykvshm

from . import common

SPEC = pykvshm.KVSpec(1, 1, 16, 16, "float16")
_CTX = mp.get_context("fork")


def _loop_pool(name: str, batch: int, seconds: float) -> float:
    pool = pykvshm.Pool.open(name)
    try:
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(100):
                pool.free(pool.alloc(batch, evict=False))
            n += 100 * batch
        return 2 * n / (time.perf_counter() - t0)  # alloc + free = 2 block ops per block
    finally:
        pool.close()


def _loop_local(blocks: int, batch: int, seconds: float) -> float:
    free = list(range(blocks))
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(100):
            handles = free[-batch:]
            del free[-batch:]
            free.extend(handles)
        n += 100 * batch
    return 2 * n / (time.perf_counter() - t0)


def _worker(kind: str, name: str, blocks: int, seconds: float, batch: int, barrier: Any, out: Any, i: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C and stops us
    barrier.wait()
    out[i] = _loop_pool(name, batch, seconds) if kind == "pool" else _loop_local(blocks, batch, seconds)


def measure(kind: str, procs: int, batch: int, seconds: float) -> dict[str, Any]:
    """Block ops/s of ``procs`` forked processes looping alloc+free of ``batch`` blocks for ``seconds``.

    ``kind`` is ``"pool"`` (one shared pool) or ``"local"`` (a private Python free list per process).
    """
    if kind not in ("pool", "local"):
        raise ValueError(f"kind must be 'pool' or 'local', got {kind!r}")
    with common.scratch_pool("alloc", SPEC, "16MiB") as pool:
        out = _CTX.RawArray("d", procs)
        barrier = _CTX.Barrier(procs)
        ps = [_CTX.Process(target=_worker, args=(kind, pool.name, pool.num_blocks, seconds, batch, barrier, out, i),
                           daemon=True)
              for i in range(procs)]
        try:
            for p in ps:
                p.start()
            for p in ps:
                p.join(seconds + 60)
        finally:
            for p in ps:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        failed = [p.exitcode for p in ps if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"{kind} alloc worker exited with status {failed[0]}")
    return {"kind": kind, "procs": procs, "batch": batch, "block_ops_per_s": float(sum(out)),
            "per_process": float(np.mean(out))}


def python_figures(seconds: float) -> list[dict[str, float]]:
    """bench/alloc.py's Python table: the pool, 1 and 2 processes, batches of 1 and 64."""
    rows = []
    for procs in (1, 2):
        for batch in (1, 64):
            r = measure("pool", procs, batch, seconds)
            rows.append({"procs": procs, "batch": batch, "block_ops_per_s": r["block_ops_per_s"],
                         "per_process": r["per_process"]})
    return rows
