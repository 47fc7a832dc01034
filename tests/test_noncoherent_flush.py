"""The non-coherent code path really issues cache-line flushes (and the coherent one none).

This is groundwork for multi-host CXL 2.0 pools (issue: rack-scale CXL): on one host the flushes
are functionally no-ops, so what is checked here is that they are issued where the design says.
"""

from __future__ import annotations

import numpy as np

import pytest

import pykvshm
from pykvshm import _core
from pykvshm.testing import blocks_for_keys


def _publish_and_read(pool: pykvshm.Pool) -> None:
    spec = pool.spec
    keys = pykvshm.block_keys(np.arange(8 * spec.block_tokens), spec.block_tokens, salt=pool.coherence.encode())
    pool.publish(keys, blocks_for_keys(keys, spec))
    with pool.acquire(keys) as lease:
        out = np.empty((len(lease), *spec.block_shape), dtype=spec.np_dtype)
        lease.copy_to(out)
    assert np.array_equal(out.view(np.uint8), blocks_for_keys(keys, spec).view(np.uint8))


def test_coherent_pool_issues_no_flushes(pool_name: str, spec: pykvshm.KVSpec) -> None:
    with pykvshm.Pool.create(pool_name, spec=spec, capacity="4MiB") as pool:
        f0, i0 = _core.lines_flushed(), _core.lines_invalidated()
        _publish_and_read(pool)
        assert _core.lines_flushed() == f0 and _core.lines_invalidated() == i0


def test_noncoherent_pool_flushes_data_before_publishing(pool_name: str, spec: pykvshm.KVSpec) -> None:
    assert _core.flush_instruction() in ("clwb", "clflushopt", "clflush")
    with pykvshm.Pool.create(pool_name, spec=spec, capacity="4MiB", coherence="noncoherent") as pool:
        assert pool.coherence == "noncoherent"
        f0, i0 = _core.lines_flushed(), _core.lines_invalidated()
        _publish_and_read(pool)
        # At least every line of the 8 published blocks was written back, and the reader
        # invalidated at least every line it read.
        lines_per_block = -(-spec.block_bytes // 64)
        assert _core.lines_flushed() - f0 >= 8 * lines_per_block
        assert _core.lines_invalidated() - i0 >= 8 * lines_per_block
        pool.check()
    with pykvshm.Pool.open(pool_name) as again:
        assert again.coherence == "noncoherent"  # fixed at creation, stored in the superblock


def _holds(pool: pykvshm.Pool) -> int:
    """Acquisitions of the pool-wide lock and of single lock shards by this handle."""
    st = pool._core.lock_stats()
    return int(st["acquisitions"]) + int(st["shard_acquisitions"])


def _per_operation(pool: pykvshm.Pool) -> dict[str, tuple[int, int, int]]:
    """Lines flushed, lines invalidated and lock acquisitions of each operation, one at a time."""
    spec = pool.spec
    keys = pykvshm.block_keys(np.arange(4 * spec.block_tokens), spec.block_tokens, salt=b"per-op")
    data = blocks_for_keys(keys, spec)
    state: dict[str, object] = {}

    def acquire() -> None:
        state["lease"] = pool.acquire(keys)

    def copy() -> None:
        lease = state["lease"]
        assert isinstance(lease, pykvshm.Lease)
        lease.copy_to(np.empty((4, *spec.block_shape), spec.np_dtype))

    def release() -> None:
        lease = state["lease"]
        assert isinstance(lease, pykvshm.Lease)
        lease.release()

    def alloc() -> None:
        state["handles"] = pool.alloc(4)

    ops = {
        "alloc(4)": alloc,
        "free(4)": lambda: pool.free(state["handles"]),  # type: ignore[arg-type]
        "publish(4)": lambda: pool.publish(keys, data),
        "match(4)": lambda: pool.match(keys),
        "acquire(4)": acquire,
        "copy_to(4)": copy,
        "release(4)": release,
        "stats": pool.stats,
    }
    out = {}
    for name, fn in ops.items():
        f0, i0, a0 = _core.lines_flushed(), _core.lines_invalidated(), _holds(pool)
        fn()
        out[name] = (_core.lines_flushed() - f0, _core.lines_invalidated() - i0,
                     _holds(pool) - a0)
    return out


@pytest.mark.parametrize("shards", [1, 4])
def test_flushes_and_invalidations_per_operation(pool_name: str, spec: pykvshm.KVSpec, shards: int) -> None:
    """Each noncoherent operation writes back what it wrote and invalidates what it read, under the
    pool lock (or the lock shards it touches); the coherent pool does none of it (no flush cost, no
    lock)."""
    with pykvshm.Pool.create(pool_name + "-c", spec=spec, capacity="4MiB") as pool:
        try:
            coherent = _per_operation(pool)
        finally:
            pykvshm.Pool.destroy(pool_name + "-c")
    assert all(v == (0, 0, 0) for v in coherent.values()), coherent
    with pykvshm.Pool.create(pool_name, spec=spec, capacity="4MiB", coherence="noncoherent",
                             lock_shards=shards) as pool:
        assert pool.lock_shards == shards
        nc = _per_operation(pool)
        assert pool._core.lock_stats()["unguarded_writes"] == 0
    lines_per_block = -(-spec.block_bytes // 64)
    for name, (flushed, invalidated, locked) in nc.items():
        if name != "match(4)" or shards == 1:  # with lock shards, lookups read without a lock
            assert locked >= 1, (name, nc)  # copy_to: its checks; the bytes are copied outside the lock
        assert invalidated > 0, (name, nc)  # every operation reads shared metadata
    # Writers write back their block bytes (before the seal) and their metadata lines.
    assert nc["publish(4)"][0] >= 4 * lines_per_block + 4 * 3  # bytes; state, descriptor, index entry per block
    assert nc["free(4)"][0] >= 4 * lines_per_block + 4  # freed bytes written back, then the state words
    assert nc["alloc(4)"][0] >= 4
    assert nc["release(4)"][0] >= 4  # the pin masks
    assert nc["acquire(4)"][0] >= 4 and nc["acquire(4)"][1] >= 4 * lines_per_block  # pin masks; the bytes
    # A reader writes back only the lock's line (5 times: its hold stamp, choosing, ticket, choosing,
    # release; a hold longer than 20 ms renews the stamp once more), the control page's hot lines (5) and
    # its own counters (2).
    if shards == 1:
        assert nc["match(4)"][0] <= 13 and nc["copy_to(4)"][0] <= 13
    else:
        # With lock shards match() only reads (validated, every line invalidated): no lock, nothing
        # written back -- unless the member's heartbeat fell due (it takes the pool-wide lock).
        assert nc["match(4)"][2] == 0 and nc["match(4)"][0] == 0 or nc["match(4)"][2] == 1, nc
        # acquire pins under the block shard of the 4 blocks (published together: one shard), and
        # release unpins under it: one hold each.
        assert nc["acquire(4)"][2] <= 2 and nc["release(4)"][2] <= 2, nc


def _transfer_in_one_process(pool: pykvshm.Pool) -> None:
    from pykvshm.transfer import TransferConsumer, TransferProducer

    spec = pool.spec
    keys = pykvshm.block_keys(np.arange(3 * spec.block_tokens), spec.block_tokens, salt=b"transfer-count")
    data = blocks_for_keys(keys, spec)
    tx = TransferProducer(pool, "req-count", keys)
    for layer in range(spec.num_layers):
        tx.put_layer(layer, np.ascontiguousarray(data[:, layer]))
    with TransferConsumer(pool, "req-count", timeout=10) as rx:
        out = np.empty((3, *spec.block_shape), dtype=spec.np_dtype)
        rx.read_all(out)
    tx.finish()
    assert np.array_equal(out.view(np.uint16), data.view(np.uint16))


def test_transfers_flush_only_when_noncoherent(pool_name: str, spec: pykvshm.KVSpec) -> None:
    with pykvshm.Pool.create(pool_name + "-c", spec=spec, capacity="4MiB") as pool:
        try:
            f0, i0 = _core.lines_flushed(), _core.lines_invalidated()
            _transfer_in_one_process(pool)
            assert (_core.lines_flushed(), _core.lines_invalidated()) == (f0, i0)
            assert pool._core.lock_stats()["acquisitions"] == 0
        finally:
            pykvshm.Pool.destroy(pool_name + "-c")
    with pykvshm.Pool.create(pool_name, spec=spec, capacity="4MiB", coherence="noncoherent") as pool:
        f0, i0 = _core.lines_flushed(), _core.lines_invalidated()
        _transfer_in_one_process(pool)
        lines_per_block = -(-spec.block_bytes // 64)
        assert _core.lines_flushed() - f0 >= 3 * lines_per_block  # every layer written back before `ready` moves
        assert _core.lines_invalidated() - i0 >= 3 * lines_per_block  # and invalidated before it is read
