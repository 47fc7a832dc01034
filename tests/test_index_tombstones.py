"""Index tombstones are reclaimed: a pool that has churned through many publish/evict cycles keeps
empty slots, so misses and inserts stay as short as on a fresh pool (issue 15).

Before the fix every evicted entry left a tombstone forever; after ~a million cycles the table had
no empty slot at all and every miss probed the full window.  Here a 2,048-block pool churns through
~130,000 publishes (each one evicting an older block) and the table must keep a bounded share of
tombstones, and stay correct: what was just published is found, what was evicted is not, and
``check(strict=True)`` holds -- with two processes churning at once, too.
"""

from __future__ import annotations

import mmap
import multiprocessing as mp
import time

import numpy as np
import pytest

import pykvshm
from pykvshm import _core

CTX = mp.get_context("fork")
REF_BIT = 1 << 28  # the CLOCK bit of a state word (state.h); a pin sets it without moving the block


class _Blocks:
    """The pool's state words and descriptor keys, mapped read-only: where a key landed, and
    whether that block has moved on since (test instrumentation, layout.md)."""

    def __init__(self, path: str) -> None:
        with open(path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        sb = bytes(self._mm[:512])
        n = int.from_bytes(sb[104:112], "little")
        off = {r: int.from_bytes(sb[128 + 16 * i:136 + 16 * i], "little") for r, i in _core.layout_info()["regions"].items()}
        self.states = np.frombuffer(self._mm, dtype=np.uint64, count=n, offset=off["states"])
        self.keys = np.frombuffer(self._mm, dtype=np.uint64, count=8 * n, offset=off["descriptors"]).reshape(n, 8)[:, 2:4]

    def sealed_at(self, keys: np.ndarray) -> list[tuple[int, int] | None]:
        """For each key, (block, state word) of the sealed block holding it now, or None."""
        where = {(int(a), int(b)): i for i, (a, b) in enumerate(self.keys.tolist())}
        out: list[tuple[int, int] | None] = []
        for k0, k1 in keys.tolist():
            i = where.get((int(k0), int(k1)))
            s = int(self.states[i]) if i is not None else 0
            out.append((i, s) if i is not None and (s >> 29) & 7 == 2 else None)
        return out


def _churn(name: str, seed: int, cycles: int, pause_every: int) -> None:
    # A just-published key may miss only because the other churner evicted its block: then the
    # block that held it has moved on from the sealed generation it had after the publish.  A miss
    # while that block stays sealed, at that generation and with that key, before and after the
    # lookup, is an index entry lost (or made unreachable) under a live block.  Found: every miss
    # was an eviction (pauses here play a churner descheduled between publish and lookup).
    with pykvshm.Pool.open(name) as p:
        blocks = _Blocks(p.path)
        rng = np.random.default_rng(seed)
        data = np.zeros((64, *p.spec.block_shape), dtype=np.float16)
        published = found = evicted = 0
        for c in range(cycles):
            words = rng.integers(0, 2**63, size=(64, 2), dtype=np.uint64)
            keys = words.view(np.uint8).reshape(64, 16)
            published += p.publish(keys, data)
            where = blocks.sealed_at(words)
            if pause_every and c % pause_every == pause_every - 1:
                time.sleep(0.3)
            for j in range(64):
                w = where[j]
                before = int(blocks.states[w[0]]) if w else 0
                if p.match(keys[j:j + 1]) == 1:
                    found += 1
                    continue
                after = int(blocks.states[w[0]]) if w else 0
                if w is not None:
                    unmoved = [(s ^ w[1]) & ~REF_BIT == 0 for s in (before, after)]
                    same_key = [int(x) for x in blocks.keys[w[0]]] == [int(x) for x in words[j]]
                    assert not (all(unmoved) and same_key), (
                        f"key {j} of a batch missed while its block {w[0]} stayed sealed (state {w[1]:#x}): "
                        "an index entry was lost")
                evicted += 1
        assert published == 64 * cycles
        assert found + evicted == published


@pytest.mark.parametrize("coherence", ["coherent", "noncoherent"])
def test_tombstones_stay_bounded_under_churn(pool_name: str, spec: pykvshm.KVSpec, coherence: str) -> None:
    with pykvshm.Pool.create(pool_name, spec=spec, capacity="3MiB", coherence=coherence) as p:
        slots = sum(p._core.index_census().values())
        rng = np.random.default_rng(1)
        data = np.zeros((64, *spec.block_shape), dtype=np.float16)
        cycles = 2000 if coherence == "coherent" else 400
        first = None
        for c in range(cycles):
            keys = rng.integers(0, 2**63, size=(64, 2), dtype=np.uint64).view(np.uint8).reshape(64, 16)
            assert p.publish(keys, data) == 64
            assert p.match(keys) == 64
            if first is None:
                first = keys
        census = p._core.index_census()
        assert census["live"] == p.num_blocks
        # Without reclaiming, every slot that is not live is a tombstone by now (0 empty).
        assert census["tombstones"] <= slots // 4, census
        assert census["empty"] >= slots // 4, census
        assert census["clearing"] == 0 and census["other"] == 0
        assert p.match(first) == 0  # evicted long ago: a miss, found by probing to an empty slot
        p.check(strict=True)


def test_tombstone_reclaim_is_safe_with_concurrent_inserts(pool_name: str, spec: pykvshm.KVSpec) -> None:
    with pykvshm.Pool.create(pool_name, spec=spec, capacity="3MiB") as p:
        # One churner pauses now and then (0.3 s every 100 cycles), so that misses happen and are checked.
        procs = [CTX.Process(target=_churn, args=(pool_name, seed, 600, pause)) for seed, pause in ((11, 100), (12, 0))]
        for q in procs:
            q.start()
        for q in procs:
            q.join(120)
        assert [q.exitcode for q in procs] == [0, 0]
        p.check(strict=True)
        census = p._core.index_census()
        assert census["clearing"] == 0 and census["tombstones"] <= sum(census.values()) // 4, census
