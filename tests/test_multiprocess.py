"""Many processes hammering one pool: no block is ever held twice, no reader sees a wrong block."""

from __future__ import annotations

import multiprocessing as mp
import random
import time

import numpy as np
import pytest

import pykvshm
from pykvshm.testing import blocks_for_keys, count_wrong_blocks, verify_block

CTX = mp.get_context("fork")

# Every test runs on a coherent pool and on a noncoherent one.  In the noncoherent
# runs half of the workers pretend to be on another host (their own host id, so
# their own line in the pool lock's bakery): the cross-host path is exercised
# even though this machine is coherent.
COHERENCE = pytest.mark.parametrize("coherence", ["coherent", "noncoherent"])
OTHER_HOST = 0x0C0FFEE


def _open(name: str, coherence: str, me: int) -> pykvshm.Pool:
    if coherence == "noncoherent" and me % 2:
        return pykvshm.Pool.open(name, host_id=OTHER_HOST)
    return pykvshm.Pool.open(name)


def _alloc_worker(name: str, coherence: str, me: int, barrier, owners, seconds: float, errors, ops) -> None:
    pool = _open(name, coherence, me)
    rng = random.Random(me)
    barrier.wait()
    held: list[int] = []
    count = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if held and (rng.random() < 0.5 or len(held) > 256):
                k = rng.randint(1, len(held))
                batch, held = held[:k], held[k:]
                for h in batch:
                    v = pool.block_view(h)
                    ok = bool((v.view(np.uint8) == (me * 37 + (h & 0xFF)) % 251).all())
                    del v
                    if not ok:
                        errors.value += 1
                    with owners.get_lock():
                        if owners[h & 0xFFFFFFFF] != me:
                            errors.value += 1
                        owners[h & 0xFFFFFFFF] = 0
                pool.free(np.array(batch, dtype=np.uint64))
                count += len(batch)
            else:
                try:
                    got = pool.alloc(rng.randint(1, 64), evict=False)
                except pykvshm.errors.PoolFullError:
                    continue
                for h in got.tolist():
                    with owners.get_lock():
                        if owners[h & 0xFFFFFFFF] != 0:
                            errors.value += 1  # handed to two holders at once
                        owners[h & 0xFFFFFFFF] = me
                    v = pool.block_view(h)
                    v.view(np.uint8)[...] = (me * 37 + (h & 0xFF)) % 251
                    del v
                held.extend(got.tolist())
                count += len(got)
        for h in held:
            with owners.get_lock():
                owners[h & 0xFFFFFFFF] = 0
        pool.free(np.array(held, dtype=np.uint64))
        with ops.get_lock():
            ops.value += count
    finally:
        pool.close()


@COHERENCE
def test_concurrent_alloc_free_never_double_hands(pool_name: str, coherence: str) -> None:
    spec = pykvshm.KVSpec(1, 1, 16, 16, "float16")  # 512-byte blocks
    procs_n, seconds = 4, 3.0
    with pykvshm.Pool.create(pool_name, spec=spec, capacity="3MiB", coherence=coherence) as pool:
        n = pool.num_blocks
        owners = CTX.Array("i", n)
        errors = CTX.Value("i", 0)
        ops = CTX.Value("q", 0)
        barrier = CTX.Barrier(procs_n)
        procs = [CTX.Process(target=_alloc_worker, args=(pool_name, coherence, i + 1, barrier, owners, seconds, errors, ops))
                 for i in range(procs_n)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
            assert p.exitcode == 0, f"worker exited with {p.exitcode}"
        assert errors.value == 0
        # They really overlapped: work from all four in the same 3 s (a count, not a speed; the
        # machine may be loaded), and in a noncoherent pool lock acquisitions that found another
        # worker holding the lock.
        assert ops.value > 1_000
        if coherence == "noncoherent":
            assert pool.stats()["lock_waits"] > 0
        pool.check()
        s = pool.stats()
        assert s["free"] == s["total"] == n and s["writing"] == 0 and s["members"] == 1


def _publisher(name: str, coherence: str, me: int, barrier, seconds: float, prompts: int, blocks: int, errors) -> None:
    pool = _open(name, coherence, me)
    spec = pool.spec
    rng = random.Random(me)
    barrier.wait()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pid = rng.randrange(prompts)
        keys = pykvshm.block_keys(np.arange(blocks * spec.block_tokens) + pid * 1_000_000, spec.block_tokens,
                                  salt=b"prompt")
        upto = rng.randint(1, blocks)
        try:
            pool.publish(keys[:upto], blocks_for_keys(keys[:upto], spec))
        except pykvshm.errors.PoolFullError:
            pass
    pool.close()


def _reader(name: str, coherence: str, me: int, barrier, seconds: float, prompts: int, blocks: int, errors,
            reads) -> None:
    pool = _open(name, coherence, me)
    spec = pool.spec
    rng = random.Random(100 + me)
    barrier.wait()
    deadline = time.monotonic() + seconds
    count = 0
    out = np.empty((blocks, *spec.block_shape), dtype=spec.np_dtype)
    while time.monotonic() < deadline:
        pid = rng.randrange(prompts)
        keys = pykvshm.block_keys(np.arange(blocks * spec.block_tokens) + pid * 1_000_000, spec.block_tokens,
                                  salt=b"prompt")
        with pool.acquire(keys) as lease:
            n = len(lease)
            bad = count_wrong_blocks(lease, keys, None if rng.random() < 0.5 else out)
            time.sleep(rng.random() * 0.001)  # hold the pins a little while eviction runs
        if bad:
            errors.value += bad
        count += n
    with reads.get_lock():
        reads.value += count
    pool.close()


@COHERENCE
def test_publish_acquire_under_eviction(pool_name: str, coherence: str) -> None:
    spec = pykvshm.KVSpec(2, 2, 64, 16, "float16")  # 16 KiB blocks
    prompts, blocks, seconds = 40, 12, 3.0
    with pykvshm.Pool.create(pool_name, spec=spec, capacity="3MiB", coherence=coherence) as pool:
        assert pool.num_blocks * 4 < prompts * blocks  # the working set is much bigger than the pool
        errors = CTX.Value("i", 0)
        reads = CTX.Value("q", 0)
        barrier = CTX.Barrier(4)
        procs = [CTX.Process(target=_publisher, args=(pool_name, coherence, i, barrier, seconds, prompts, blocks, errors))
                 for i in range(2)]
        procs += [CTX.Process(target=_reader, args=(pool_name, coherence, i, barrier, seconds, prompts, blocks, errors, reads))
                  for i in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
            assert p.exitcode == 0, f"worker exited with {p.exitcode}"
        assert errors.value == 0, f"{errors.value} blocks read with the wrong content"
        assert reads.value > 100
        s = pool.stats()
        assert s["evictions"] > 0 and s["pinned"] == 0 and s["writing"] == 0
        pool.check()
        # Everything still cached is intact.
        for pid in range(prompts):
            keys = pykvshm.block_keys(np.arange(blocks * spec.block_tokens) + pid * 1_000_000, spec.block_tokens,
                                      salt=b"prompt")
            with pool.acquire(keys) as lease:
                views = lease.views()
                assert all(verify_block(v, k) for v, k in zip(views, keys))
                del views
