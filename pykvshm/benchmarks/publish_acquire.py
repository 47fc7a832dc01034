"""publish and copy_to throughput against a plain numpy copy of the same bytes; match and acquire latency.

Every figure is a median over ``reps`` repetitions, measured in this one process beside its
baseline, and reported as a ratio. Throughput: the baseline is ``np.copyto`` of the same number
of bytes between two pre-touched buffers; the pool is prefaulted, as a production pool is.
Latency: the baseline is what a single engine's own prefix cache does in Python, a dict from
block key to block id (lookup of the longest cached prefix; pin and unpin counts on acquire).

Used by ``pykvshm bench`` and by ``bench/publish_acquire.py``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import pykvshm

from . import common

SMALL = pykvshm.KVSpec(num_layers=2, num_kv_heads=8, head_dim=128, block_tokens=8, dtype="float16")  # 32 KiB blocks
LLAMA3_8B = pykvshm.KVSpec(num_layers=32, num_kv_heads=8, head_dim=128, block_tokens=16, dtype="float16")  # 2 MiB
LATENCY_SPEC = pykvshm.KVSpec(num_layers=1, num_kv_heads=1, head_dim=16, block_tokens=16, dtype="float16")
LATENCY_BLOCKS = 128


def median_time(fn: Callable[[], Any], reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_size(total: int, reps: int) -> dict[str, Any]:
    """publish of ``total`` bytes of fresh blocks and copy_to of them, each against memcpy."""
    spec = SMALL if total < (2 << 20) else LLAMA3_8B
    n = total // spec.block_bytes
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
    with common.scratch_pool("publish", spec, cap, prefault=True) as pool:
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
        try:
            assert len(lease) == n

            def copy_to() -> None:
                lease.copy_to(out)

            def memcpy_out() -> None:
                np.copyto(out, scratch)

            copy_to()
            t_cp = median_time(copy_to, reps)
            t_cpy2 = median_time(memcpy_out, reps)
            assert np.array_equal(out.view(np.uint16), data.view(np.uint16))
        finally:
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


def _per_call_us(fn: Callable[[], Any], reps: int, loops: int, sample_s: float | None = None) -> float:
    """Median over ``reps`` samples of the time per call, a sample being ``loops`` calls in a row.

    With ``sample_s``, ``loops`` is only an upper bound: a sample lasts about ``sample_s`` seconds.
    """
    if sample_s is not None:
        t = time.perf_counter()
        fn()
        loops = max(1, min(loops, int(sample_s / max(time.perf_counter() - t, 1e-7))))
    samples = []
    for _ in range(max(reps, 5)):
        t = time.perf_counter()
        for _ in range(loops):
            fn()
        samples.append((time.perf_counter() - t) / loops)
    return statistics.median(samples) * 1e6


def bench_latency(reps: int, loops: int = 2000, sample_s: float | None = None) -> dict[str, float]:
    """match / acquire+release of a 128-block prompt, and block_keys, in microseconds per call."""
    spec = LATENCY_SPEC
    with common.scratch_pool("latency", spec, "16MiB", prefault=True) as pool:
        keys = pykvshm.block_keys(np.arange(LATENCY_BLOCKS * 16), 16, salt=b"latency")
        pool.publish(keys, np.zeros((LATENCY_BLOCKS, *spec.block_shape), dtype=np.float16))
        kb = b"".join(keys)

        def acquire_release() -> None:
            pool.acquire(keys).release()

        return {
            "match_128_keys_us": _per_call_us(lambda: pool.match(keys), reps, loops, sample_s),
            "match_128_keys_prejoined_us": _per_call_us(lambda: pool._core.match(kb), reps, loops, sample_s),
            "acquire_release_128_us": _per_call_us(acquire_release, reps, loops, sample_s),
            "block_keys_128_blocks_us": _per_call_us(lambda: pykvshm.block_keys(np.arange(LATENCY_BLOCKS * 16), 16),
                                                     reps, loops, sample_s),
        }


def baseline_latency(reps: int, loops: int = 2000, sample_s: float | None = None) -> dict[str, float]:
    """The same lookups in a process-private Python prefix cache: a dict from key to block id."""
    keys = list(pykvshm.block_keys(np.arange(LATENCY_BLOCKS * 16), 16, salt=b"latency"))
    cache = {k: i for i, k in enumerate(keys)}
    pins = [0] * len(keys)

    def match() -> int:
        n = 0
        for k in keys:
            if k not in cache:
                break
            n += 1
        return n

    def acquire_release() -> None:
        held = []
        for k in keys:
            b = cache.get(k)
            if b is None:
                break
            pins[b] += 1
            held.append(b)
        for b in held:
            pins[b] -= 1

    return {
        "match_128_keys_us": _per_call_us(match, reps, loops, sample_s),
        "acquire_release_128_us": _per_call_us(acquire_release, reps, loops, sample_s),
    }
