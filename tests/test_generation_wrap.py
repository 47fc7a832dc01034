"""Block generations never wrap (issue 15): a stale handle can never match a reused block.

A handle is generation:32 | index:32.  Without a guard, after 2^32 reuses of one block the
generation would come round and a handle from the pool's first use of that block would look current
again: ``block_view``/``free`` on it would reach whatever the block holds now.  The test forces
every block's generation to the last value through the pool file (as if each block had been reused
~4 billion times), reuses the blocks once more, and checks that handles from the first use stay
stale and that a block at the last generation is retired instead of being handed out at a wrapped
generation.
"""

from __future__ import annotations

import mmap
import os
import struct

import pytest

import pykvshm
from pykvshm import _core

LAYOUT = _core.layout_info()
REGIONS_AT = LAYOUT["offsets"]["superblock.regions"]
GEN_LAST = 0xFFFFFFFF


def _set_free_generation(name: str, nblocks: int, gen: int, kind: int = 0) -> None:
    fd = os.open(f"/dev/shm/{name}", os.O_RDWR)
    try:
        m = mmap.mmap(fd, 0)
    finally:
        os.close(fd)
    try:
        states = struct.unpack_from("<Q", m, REGIONS_AT + 16 * LAYOUT["regions"]["states"])[0]
        for i in range(nblocks):
            s = struct.unpack_from("<Q", m, states + 8 * i)[0]
            assert (s >> 29) & 7 == kind, "every block must be of this kind"
            struct.pack_into("<Q", m, states + 8 * i, (gen << 32) | (kind << 29))  # owner 0, at generation `gen`
    finally:
        m.close()


def test_a_stale_handle_never_matches_a_block_reused_past_the_last_generation(pool_name: str,
                                                                              spec: pykvshm.KVSpec) -> None:
    with pykvshm.Pool.create(pool_name, spec=spec, capacity="3MiB") as p:
        n = p.num_blocks
        first = p.alloc(n)  # generation 1 of every block: the handles an old client may still hold
        assert {h >> 32 for h in first} == {1}
        p.free(first)
        _set_free_generation(pool_name, n, GEN_LAST - 1)  # ~4 billion reuses later
        last = p.alloc(n)
        assert {h >> 32 for h in last} == {GEN_LAST}
        p.free(last)
        # The next claim would wrap to generation 0, then 1 == the first handles' generation.
        with pytest.raises(pykvshm.errors.PoolFullError):
            p.alloc(1)
        for h in (first[0], first[-1], last[0]):
            with pytest.raises(pykvshm.errors.InvalidHandleError):
                p.block_view(h)
            with pytest.raises(pykvshm.errors.InvalidHandleError):
                p.free([h])
        s = p.stats()
        assert s["free"] == n and s["writing"] == 0
        p.check(strict=True)


def test_only_exhausted_blocks_are_retired(pool_name: str, spec: pykvshm.KVSpec) -> None:
    with pykvshm.Pool.create(pool_name, spec=spec, capacity="3MiB") as p:
        n = p.num_blocks
        _set_free_generation(pool_name, n, GEN_LAST)
        with pytest.raises(pykvshm.errors.PoolFullError):
            p.alloc(1)
        _set_free_generation(pool_name, n, 7)
        h = p.alloc(n)
        assert {x >> 32 for x in h} == {8}
        p.free(h)
        p.check(strict=True)


def test_an_exhausted_sealed_block_is_retired_by_eviction(pool_name: str, spec: pykvshm.KVSpec) -> None:
    """Eviction hands a block to a new holder at generation + 1 as well: at the last one it retires it."""
    import numpy as np

    with pykvshm.Pool.create(pool_name, spec=spec, capacity="3MiB") as p:
        n = p.num_blocks
        keys = np.arange(2 * n, dtype=np.uint64).reshape(n, 2).view(np.uint8).reshape(n, 16)
        assert p.publish(keys, np.zeros((n, *spec.block_shape), dtype=np.float16)) == n
        _set_free_generation(pool_name, n, GEN_LAST, kind=2)  # SEALED at the last generation
        with pytest.raises(pykvshm.errors.PoolFullError):
            p.alloc(1)  # would evict and hand out generation 0 without the guard
        s = p.stats()
        assert s["free"] == n and s["sealed"] == 0
        p.check(strict=False)  # the forged generations left stale index entries; structure holds
