"""Soak: several processes mix every operation on one pool under eviction pressure.

    python bench/soak.py --procs 4 --seconds 60 [--coherence noncoherent] [--json out.json]

Each worker publishes (whole and layer by layer), acquires and verifies every byte it reads
against the content its key implies, allocates and frees, and runs recovery.  At the end the
pool must pass check(strict=True) with nothing leaked.  Prints ops/s and violations (must be 0).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import sys
import time
import uuid

import numpy as np

import pykvshm
from pykvshm.testing import blocks_for_keys, count_wrong_blocks, prompt_keys, write_layer_by_layer

CTX = mp.get_context("fork")


def keys_for(spec: pykvshm.KVSpec, prompt: int, blocks: int) -> list[bytes]:
    return prompt_keys(spec, prompt, blocks, salt=b"soak")


def worker(name: str, me: int, seconds: float, prompts: int, blocks: int, counts, wrong, barrier) -> None:
    pool = pykvshm.Pool.open(name)
    spec = pool.spec
    rng = random.Random(me)
    out = np.empty((blocks, *spec.block_shape), dtype=spec.np_dtype)
    held: list[int] = []
    barrier.wait()
    deadline = time.monotonic() + seconds
    ops = 0
    while time.monotonic() < deadline:
        op = rng.random()
        try:
            if op < 0.35:
                keys = keys_for(spec, rng.randrange(prompts), blocks)
                upto = rng.randint(1, blocks)
                pool.publish(keys[:upto], blocks_for_keys(keys[:upto], spec))
            elif op < 0.45:
                keys = keys_for(spec, rng.randrange(prompts), blocks)
                with pool.writer(keys) as w:
                    write_layer_by_layer(w, keys, spec)
            elif op < 0.85:
                keys = keys_for(spec, rng.randrange(prompts), blocks)
                with pool.acquire(keys) as lease:
                    wrong[me] += count_wrong_blocks(lease, keys, out)
            elif op < 0.97:
                if held and rng.random() < 0.5:
                    pool.free(np.array(held, dtype=np.uint64))
                    held = []
                else:
                    held.extend(pool.alloc(rng.randint(1, 4)).tolist())
            else:
                pool.match(keys_for(spec, rng.randrange(prompts), blocks))
                pool.recover()
        except pykvshm.PoolFullError:
            if held:
                pool.free(np.array(held, dtype=np.uint64))
                held = []
        ops += 1
    if held:
        pool.free(np.array(held, dtype=np.uint64))
    counts[me] = ops
    pool.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--coherence", choices=["coherent", "noncoherent"], default="coherent")
    ap.add_argument("--json")
    args = ap.parse_args()
    spec = pykvshm.KVSpec(2, 2, 32, 16, "float16")  # 8 KiB blocks
    prompts, blocks = 64, 16
    name = f"pykvshm-soak-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    counts = CTX.RawArray("q", args.procs)
    wrong = CTX.RawArray("q", args.procs)
    barrier = CTX.Barrier(args.procs)
    violations: list[str] = []
    with pykvshm.Pool.create(name, spec=spec, capacity="4MiB", coherence=args.coherence) as pool:
        print(f"pool {pool.num_blocks} blocks, working set {prompts * blocks} blocks, {args.procs} processes, "
              f"{args.seconds:.0f} s", flush=True)
        procs = [CTX.Process(target=worker, args=(name, i, args.seconds, prompts, blocks, counts, wrong, barrier))
                 for i in range(args.procs)]
        t0 = time.monotonic()
        for p in procs:
            p.start()
        for p in procs:
            p.join(args.seconds + 120)
            if p.exitcode != 0:
                violations.append(f"worker exited with {p.exitcode}")
        elapsed = time.monotonic() - t0
        s = pool.stats()
        try:
            pool.check(strict=True)
        except pykvshm.PoolError as e:
            violations.append(str(e))
        if s["writing"] or s["pinned"] or s["evicting"]:
            violations.append(f"leaked: {s}")
    pykvshm.Pool.destroy(name)
    total = sum(counts)
    bad = sum(wrong)
    if bad:
        violations.append(f"{bad} wrong reads")
    report = {"procs": args.procs, "seconds": elapsed, "ops": total, "ops_per_s": total / elapsed,
              "wrong_reads": bad, "evictions": s["evictions"], "hits": s["hits"], "misses": s["misses"],
              "published": s["published"], "violations": violations}
    print(f"ops          {total}  ({total / elapsed:,.0f} ops/s)")
    print(f"evictions    {s['evictions']}   hits {s['hits']}   misses {s['misses']}   published {s['published']}")
    print(f"wrong reads  {bad}")
    print(f"violations   {len(violations)}")
    for v in violations:
        print(f"  {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if not violations else 1


if __name__ == "__main__":
    sys.exit(main())
