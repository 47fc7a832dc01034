"""Lock shards of noncoherent pools (docs/design/coherence.md, "Lock shards"): options, and several
emulated hosts hammering several shards and the index lock at once while some of their processes
are SIGKILLed, with exact invariants afterwards."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time
import traceback

import numpy as np
import pytest

import pykvshm
from pykvshm.errors import PoolError, PoolFullError
from pykvshm.testing import blocks_for_keys, count_wrong_blocks, prompt_keys, unique_name

CTX = mp.get_context("fork")
SPEC = pykvshm.KVSpec(num_layers=2, num_kv_heads=2, head_dim=16, block_tokens=4, dtype="float16")  # 1 KiB blocks
HOSTS = (0x5A4D0001, 0x5A4D0002)  # two emulated hosts (their own host ids: they meet in each lock's bakery)
PROMPTS, BLOCKS = 24, 6


def _keys(prompt: int) -> list[bytes]:
    return prompt_keys(SPEC, prompt, BLOCKS, salt=b"lock-shards")


def test_lock_shards_options(pool_name: str) -> None:
    with pykvshm.Pool.create(pool_name, SPEC, "16MiB", coherence="noncoherent") as p:
        assert p.lock_shards == 8  # the default, in a pool with room for it
        assert p._core.lock_stats()["lock_shards"] == 8
        with pykvshm.Pool.open(pool_name) as q:  # read from the superblock by every handle
            assert q.lock_shards == 8
    pykvshm.Pool.destroy(pool_name)
    with pykvshm.Pool.create(pool_name, SPEC, "16MiB", coherence="noncoherent", lock_shards=1) as p:
        assert p.lock_shards == 1
        p.free(p.alloc(3))
        assert p._core.lock_stats()["shard_acquisitions"] == 0  # one pool-wide lock, as before
    pykvshm.Pool.destroy(pool_name)
    with pykvshm.Pool.create(pool_name, SPEC, "16MiB") as p:
        assert p.lock_shards == 1  # a coherent pool has no lock
    pykvshm.Pool.destroy(pool_name)
    for bad in (3, 0, 16, True, 2.0):
        with pytest.raises(ValueError):
            pykvshm.Pool.create(pool_name, SPEC, "16MiB", coherence="noncoherent", lock_shards=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        pykvshm.Pool.create(pool_name, SPEC, "16MiB", lock_shards=2)
    # Each shard needs 64 blocks: a small pool refuses more shards than it can give them (and
    # leaves nothing behind).
    tiny = pykvshm.KVSpec(num_layers=32, num_kv_heads=8, head_dim=128, block_tokens=16, dtype="float16")  # 2 MiB
    with pytest.raises(PoolError, match="lock_shards"):
        pykvshm.Pool.create(pool_name, tiny, "300MiB", coherence="noncoherent", lock_shards=8)
    with pytest.raises(pykvshm.errors.PoolNotFoundError):
        pykvshm.Pool.open(pool_name)


def _worker(name: str, host_id: int, seed: int, seconds: float, wrong, reads, unguarded, i: int, parent: int,
            errors: str) -> None:
    try:
        _hammer(name, host_id, seed, seconds, wrong, reads, unguarded, i, parent)
    except BaseException:
        # What a survivor died of goes into the test's failure message (a fenced member, a
        # CorruptPoolError, ...), not only into captured stderr.
        with open(os.path.join(errors, f"worker-{i}.txt"), "w") as f:
            f.write(traceback.format_exc())
        os._exit(1)
    os._exit(0)


def _hammer(name: str, host_id: int, seed: int, seconds: float, wrong, reads, unguarded, i: int, parent: int) -> None:
    rng = random.Random(seed)
    pool = pykvshm.Pool.open(name, host_id=host_id, lease=1.0)
    held: list[int] = []
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end and os.getppid() == parent:
        op = rng.random()
        try:
            if op < 0.35:
                keys = _keys(rng.randrange(PROMPTS))
                pool.publish(keys, blocks_for_keys(keys, SPEC))
            elif op < 0.75:
                keys = _keys(rng.randrange(PROMPTS))
                with pool.acquire(keys) as lease:
                    wrong[i] += count_wrong_blocks(lease, keys)
                    reads[i] += len(lease)
            elif op < 0.95:
                if held and rng.random() < 0.5:
                    pool.free(np.array(held, dtype=np.uint64))
                    held = []
                else:
                    held.extend(pool.alloc(rng.randint(1, 6)).tolist())
            else:
                pool.match(_keys(rng.randrange(PROMPTS)))
        except PoolFullError:
            if held:
                pool.free(np.array(held, dtype=np.uint64))
                held = []
    # A dead process of a live host is recovered by its own host's processes (by pid).
    pool.recover()
    unguarded[i] = pool._core.lock_stats()["unguarded_writes"]
    pool.close()


def test_hosts_hammer_shards_with_kills(pool_name: str, tmp_path) -> None:
    """Two hosts of 3 processes each publish, acquire, allocate and free in an 8-shard pool for a few
    seconds; 2 processes of each host are SIGKILLed at random moments (inside shard holds, index
    holds, all-lock holds alike). The survivors of each host recover their host's dead (by pid) and
    leave. Then: exact accounting, no member left, check(strict) passes, every cached prompt has its
    key's bytes, no worker ever read a wrong block, and no metadata was written outside its lock."""
    procs_per_host, kills_per_host, seconds = 3, 2, 4.0
    n = procs_per_host * len(HOSTS)
    wrong, reads, unguarded = CTX.RawArray("q", n), CTX.RawArray("q", n), CTX.RawArray("q", n)
    rng = random.Random(7)
    with pykvshm.Pool.create(pool_name, SPEC, "8MiB", coherence="noncoherent", lock_shards=8, lease=1.0) as pool:
        assert pool.lock_shards == 8
        ps = []
        for i in range(n):
            host = HOSTS[i % len(HOSTS)]
            ps.append(CTX.Process(target=_worker, args=(pool_name, host, rng.randrange(1 << 30), seconds, wrong, reads,
                                                        unguarded, i, os.getpid(), str(tmp_path))))
        for p in ps:
            p.start()
        # The last process of each host survives; the others are killed mid-run.
        victims = [p for i, p in enumerate(ps) if i < n - len(HOSTS)][: kills_per_host * len(HOSTS)]
        for p in victims:
            time.sleep(rng.uniform(0.2, 0.6))
            os.kill(p.pid, signal.SIGKILL)  # type: ignore[arg-type]
        for p in ps:
            p.join(60)
        died = {f.name: f.read_text() for f in sorted(tmp_path.glob("worker-*.txt"))}
        killed = [p for p in ps if p.exitcode == -signal.SIGKILL]
        assert len(killed) == len(victims), ([p.exitcode for p in ps], died)
        assert all(p.exitcode == 0 for p in ps if p not in victims), ([p.exitcode for p in ps], died)
        # The survivors recovered their own host's dead; nothing is left to recover.
        r = pool.recover()
        assert r["members_recovered"] == 0, r
        assert len(pool.members()) == 1
        s = pool.stats()
        assert s["writing"] == 0 and s["evicting"] == 0 and s["pinned"] == 0, s
        assert s["free"] + s["sealed"] == s["total"], s
        pool.check(strict=True)
        for prompt in range(PROMPTS):
            keys = _keys(prompt)
            with pool.acquire(keys) as lease:
                assert count_wrong_blocks(lease, keys) == 0
        assert sum(wrong) == 0
        assert sum(reads) > 0
        assert list(unguarded[n - len(HOSTS):]) == [0] * len(HOSTS)
        assert pool._core.lock_stats()["unguarded_writes"] == 0
