"""The vLLM connector's load path on vLLM's CPU KV tensors: a request's prefix (32 MiB by default)
from the pool into the engine's paged KV cache, against one memcpy of the same bytes.

Runs where vLLM is importable (the vLLM environment of scripts/setup_vllm_env.sh; ``pykvshm bench``
starts it there). The worker half of ``PykvshmConnector`` is built over KV tensors of the CPU
attention backend's layout (``[num_blocks, num_kv_heads, block_size, 2 * head_dim]`` per layer, as
vLLM 0.32 allocates them), the prefix is published into a prefaulted pool, and each repetition
loads it into scattered engine blocks the way a model runner does: ``start_load_kv`` then
``wait_for_layer_load`` for every layer. Modes, all in one run:

- ``layerwise``: the connector as configured by default (one batched gather per layer, queued on
  the copy engine; each wait returns when its layer has landed);
- ``sync``: ``layerwise_loads=False`` (the same gathers, done inside ``start_load_kv``);
- ``per-block``: the previous path (one ``torch.Tensor.copy_`` per block and layer from pool views);
- ``async-start`` / ``async-landed``: the same load as an asynchronous one (a request parked in
  WAITING_FOR_REMOTE_KVS): what ``start_load_kv`` costs the forward thread, and the time until
  ``get_finished`` reports the request (polled, as vLLM's engine steps would);
- ``memcpy``: ``numpy.copyto`` of the same number of bytes between two warm buffers.

Every mode's result is checked byte for byte against the published blocks.

    ~/.cache/pykvshm/vllm-venv/bin/python -m pykvshm.benchmarks.connector_load [--mib 32] [--runs 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from typing import Any

import numpy as np

LAYERS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16   # Llama-3-8B's KV geometry, fp16: 2 MiB per block


def _worker(pool: Any, spec: Any, num_blocks: int, layerwise: bool) -> Any:
    import torch

    from pykvshm.integrations.vllm.config import ConnectorConfig
    from pykvshm.integrations.vllm.worker import WorkerSide

    cfg = ConnectorConfig(pool=pool.name, capacity=0, create="open", spec=spec, salt=b"\0" * 16, block_size=BLOCK,
                          hash_stride=1, save=False, load=True, pool_options=(), open_timeout=1.0, stats_file=None,
                          layerwise_loads=layerwise)
    w = WorkerSide(cfg, pool)
    kv = {f"model.layers.{i}.self_attn.attn": torch.zeros(num_blocks, KV_HEADS, BLOCK, 2 * HEAD_DIM,
                                                           dtype=torch.float16) for i in range(LAYERS)}
    w.register_kv_caches(kv, num_blocks)
    return w, kv


@contextlib.contextmanager
def _path_pool(path: str, spec: Any, capacity: int, kernel: str) -> Any:
    import pykvshm

    pool = pykvshm.Pool.create(path, spec=spec, capacity=capacity, prefault=True, copy_kernel=kernel)
    try:
        yield pool
    finally:
        pool.close()
        pykvshm.Pool.destroy(path)


def run(mib: int = 32, runs: int = 3, reps: int = 7, kernel: str = "auto", pool_dir: str | None = None) -> dict[str, Any]:
    import pykvshm
    from pykvshm.integrations.vllm.metadata import BlockTransfer, PykvshmMetadata

    from pykvshm.benchmarks import common

    spec = pykvshm.KVSpec(num_layers=LAYERS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, block_tokens=BLOCK,
                          dtype="float16")
    n = max(1, (mib << 20) // spec.block_bytes)
    num_blocks = 4 * n + 8
    rng = np.random.default_rng(0)
    data = rng.integers(0, 1 << 16, size=(n, *spec.block_shape), dtype=np.uint16).view(np.float16)
    keys = pykvshm.block_keys(np.arange(n * BLOCK), BLOCK, salt=b"connector-load")
    block_ids = rng.choice(np.arange(1, num_blocks), size=n, replace=False).tolist()  # scattered engine blocks
    nbytes = int(data.nbytes)
    src, dst = np.ones(nbytes, np.uint8), np.zeros(nbytes, np.uint8)
    times: dict[str, list[float]] = {"layerwise": [], "sync": [], "per-block": [], "async-start": [],
                                     "async-landed": [], "memcpy": []}
    if pool_dir:  # e.g. a hugetlbfs mount: a pool on 2 MiB pages
        ctx = _path_pool(os.path.join(pool_dir, f"connload-{os.getpid()}"), spec, common.pool_capacity(spec, 2 * n),
                         kernel)
    else:
        ctx = common.scratch_pool("connload", spec, common.pool_capacity(spec, 2 * n), prefault=True,
                                  copy_kernel=kernel)
    with ctx as pool:
        pool.publish(keys, data)
        workers = {"layerwise": _worker(pool, spec, num_blocks, True), "sync": _worker(pool, spec, num_blocks, False)}
        meta = PykvshmMetadata(loads=[BlockTransfer("r", list(block_ids), list(keys))])
        meta_async = PykvshmMetadata(async_loads=[BlockTransfer("r", list(block_ids), list(keys))])
        names = list(workers["layerwise"][1])

        def load(mode: str) -> float | tuple[float, float]:
            w, kv = workers[{"per-block": "sync", "async": "layerwise"}.get(mode, mode)]
            for t in kv.values():
                t.zero_()
            t0 = time.perf_counter()
            if mode == "async":
                w.start_load_kv(meta_async)
                started = time.perf_counter() - t0
                while "r" not in w.get_finished_loads():
                    time.sleep(0)
                if w.get_block_ids_with_load_errors():
                    raise AssertionError("async: load errors")
            elif mode == "per-block":
                lease = pool.acquire(keys)
                try:
                    w._load_per_block(lease, BlockTransfer("r", list(block_ids), list(keys)), len(lease))
                finally:
                    lease.release()
            else:
                w.start_load_kv(meta)
                for name in names:
                    w.wait_for_layer_load(name)
            dt = time.perf_counter() - t0
            # check: engine block block_ids[j] of layer l holds layer l of pool block j
            for layer, name in enumerate(names):
                got = kv[name].numpy()[block_ids].reshape(n, -1).view(np.uint16)
                want = data[:, layer].reshape(n, -1).view(np.uint16)
                if not np.array_equal(got, want):
                    raise AssertionError(f"{mode}: layer {layer} differs")
            return (started, dt) if mode == "async" else dt

        for _ in range(runs):
            per = {m: [] for m in times}
            for _ in range(reps):
                for mode in ("layerwise", "sync", "per-block"):
                    per[mode].append(load(mode))
                started, landed = load("async")
                per["async-start"].append(started)
                per["async-landed"].append(landed)
                t0 = time.perf_counter()
                np.copyto(dst, src)
                per["memcpy"].append(time.perf_counter() - t0)
            for m, v in per.items():
                times[m].append(statistics.median(v))
        for w, _ in workers.values():
            w._finish_loads()
    out: dict[str, Any] = {"bytes": nbytes, "blocks": n, "runs": runs, "reps": reps, "geometry": str(spec),
                           "kernel": kernel, "pool_dir": pool_dir or "/dev/shm", "modes": {}}
    mc = statistics.median(times["memcpy"])
    for m, v in times.items():
        med = statistics.median(v)
        out["modes"][m] = {"median_s": med, "min_s": min(v), "max_s": max(v), "vs_memcpy": med / mc,
                           "GBps": nbytes / med / 1e9}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--kernel", default="auto", choices=("auto", "memcpy", "stream"))
    ap.add_argument("--pool-dir", default=None, help="create the pool in this directory (e.g. a hugetlbfs mount)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    r = run(args.mib, args.runs, args.reps, args.kernel, args.pool_dir)
    print(f"connector load of {r['bytes'] >> 20} MiB ({r['blocks']} blocks of {r['geometry']}) into vLLM CPU KV "
          f"tensors; pool in {r['pool_dir']}, kernel {r['kernel']}; median [min..max] of {r['runs']} runs (each the "
          f"median of {r['reps']})")
    print("| mode | time | GB/s | vs one memcpy |")
    print("|---|---|---|---|")
    for m, v in r["modes"].items():
        print(f"| {m} | {v['median_s'] * 1e3:.2f} ms [{v['min_s'] * 1e3:.2f}..{v['max_s'] * 1e3:.2f}] | "
              f"{v['GBps']:.1f} | {v['vs_memcpy']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
