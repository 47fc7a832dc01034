"""The pool's Python API, one process: lifecycle, allocator, publish / match / acquire, writer, eviction."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

import pykvshm
from pykvshm import errors


def blocks_for(keys: list[bytes], spec: pykvshm.KVSpec) -> np.ndarray:
    """Deterministic content implied by each key: the key's bytes repeated over the block."""
    reps = spec.block_bytes // 16
    raw = np.frombuffer(b"".join(k * reps for k in keys), dtype=spec.np_dtype)
    return raw.reshape(len(keys), *spec.block_shape)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-for-bit equality (float views of arbitrary bytes may hold NaNs)."""
    return a.shape == b.shape and np.array_equal(np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8))


def test_spec_geometry() -> None:
    s = pykvshm.KVSpec(32, 8, 128, 16, "bfloat16")
    assert s.block_shape == (32, 2, 16, 8, 128)
    assert s.block_bytes == 32 * 2 * 16 * 8 * 128 * 2
    assert s.np_dtype == np.uint16  # numpy has no bfloat16: raw 16-bit words
    assert pykvshm.KVSpec(1, 1, 1, 1, np.float32).dtype == "float32"
    with pytest.raises(errors.GeometryMismatchError):
        pykvshm.KVSpec(0, 8, 128, 16)
    with pytest.raises(errors.GeometryMismatchError):
        pykvshm.KVSpec(1, 8, 128, 16, "complex64")


def test_parse_size() -> None:
    assert pykvshm.parse_size("512MiB") == 512 << 20
    assert pykvshm.parse_size("1.5 GiB") == 3 << 29
    assert pykvshm.parse_size(4096) == 4096
    for bad in ("", "12 parsecs", "-1MiB", 0, True):
        with pytest.raises(ValueError):
            pykvshm.parse_size(bad)  # type: ignore[arg-type]


def test_create_open_close_destroy(pool_name: str, spec: pykvshm.KVSpec) -> None:
    with pykvshm.Pool.create(pool_name, spec=spec, capacity="8MiB") as p:
        assert p.spec == spec
        assert p.path == f"/dev/shm/{pool_name}" == pykvshm.Pool.path_for(pool_name)
        assert stat.S_IMODE(os.stat(p.path).st_mode) == 0o600
        assert p.num_blocks > 1000
        assert p.coherence == "coherent"
        with pykvshm.Pool.open(pool_name) as q:
            assert q.spec == spec and q.uuid == p.uuid and q.num_blocks == p.num_blocks
            assert len(p.members()) == 2
        assert len(p.members()) == 1
    assert p.closed
    with pytest.raises(errors.PoolClosedError):
        p.stats()
    with pykvshm.Pool.open(pool_name, spec=spec) as q:
        assert q.stats()["members"] == 1
    pykvshm.Pool.destroy(pool_name)
    with pytest.raises(errors.PoolNotFoundError):
        pykvshm.Pool.open(pool_name)


def test_file_backed_pool(pool_path: str, spec: pykvshm.KVSpec) -> None:
    with pykvshm.Pool.create(pool_path, spec=spec, capacity="4MiB", mode=0o640, prefault=True) as p:
        assert p.path == pool_path
        assert stat.S_IMODE(os.stat(pool_path).st_mode) == 0o640
        keys = pykvshm.block_keys(np.arange(8), spec.block_tokens)
        p.publish(keys, blocks_for(keys, spec))
    with pykvshm.Pool.open(pool_path, spec=spec) as q:
        assert q.match(keys) == 2
    pykvshm.Pool.destroy(pool_path)
    assert not os.path.exists(pool_path)


def test_alloc_free_and_views(pool: pykvshm.Pool) -> None:
    total = pool.num_blocks
    h = pool.alloc(64)
    assert h.dtype == np.uint64 and len(set(h.tolist())) == 64
    assert pool.stats()["writing"] == 64
    v = pool.block_view(h[0])
    assert v.shape == pool.spec.block_shape and v.flags.writeable
    v[...] = 7
    with pytest.raises(errors.ViewsAliveError):
        pool.free(h[:1])
    del v
    pool.free(h)
    s = pool.stats()
    assert s["free"] == total and s["writing"] == 0
    pool.check()
    # The generation moved on: the old handles are stale after reallocation.
    h2 = pool.alloc(total)
    with pytest.raises(errors.StaleHandleError):
        pool.free(h[:1])
    with pytest.raises(errors.PoolFullError):
        pool.alloc(1)
    pool.free(h2)
    assert pool.alloc(0).size == 0


def test_alloc_all_or_nothing(pool: pykvshm.Pool) -> None:
    n = pool.num_blocks
    held = pool.alloc(n - 3)
    with pytest.raises(errors.PoolFullError, match="asked for 4 blocks"):
        pool.alloc(4)
    assert pool.stats()["writing"] == n - 3  # nothing was kept from the failed call
    pool.free(held)
    pool.check()


def test_publish_match_acquire(pool: pykvshm.Pool) -> None:
    spec = pool.spec
    keys = pykvshm.block_keys(np.arange(40), spec.block_tokens, salt=b"m")
    data = blocks_for(keys, spec)
    assert pool.match(keys) == 0
    assert pool.publish(keys[:6], data[:6]) == 6
    assert pool.publish(keys[:8], data[:8]) == 2  # only the new ones
    assert pool.match(keys) == 8
    assert pool.match(keys[1:]) == 7
    assert pool.match([b"\0" * 16] + keys) == 0
    with pool.acquire(keys) as lease:
        assert len(lease) == 8
        out = np.empty((8, *spec.block_shape), dtype=spec.np_dtype)
        lease.copy_to(out)
        assert same(out, data[:8])
        views = lease.views()
        assert all(same(v, d) for v, d in zip(views, data))
        assert not views[0].flags.writeable
        with pytest.raises(ValueError):
            views[0].flags.writeable = True
        with pytest.raises(ValueError):
            views[0][0, 0, 0, 0, 0] = 1
        del views
        assert pool.stats()["pinned"] == 8
    assert lease.released and pool.stats()["pinned"] == 0
    s = pool.stats()
    assert s["hits"] == 8 and s["misses"] == 2 and s["published"] == 8 and s["bytes_in"] == 8 * spec.block_bytes
    assert s["bytes_out"] == 8 * spec.block_bytes
    pool.check()


def test_empty_and_partial_acquire(pool: pykvshm.Pool) -> None:
    keys = pykvshm.block_keys(np.arange(16), pool.spec.block_tokens)
    with pool.acquire(keys) as lease:
        assert len(lease) == 0 and lease.views() == []
    pool.publish(keys[:1], blocks_for(keys[:1], pool.spec))
    with pool.acquire(keys) as lease:
        assert len(lease) == 1


def test_views_pin_the_lease(pool: pykvshm.Pool) -> None:
    keys = pykvshm.block_keys(np.arange(8), pool.spec.block_tokens)
    pool.publish(keys, blocks_for(keys, pool.spec))
    lease = pool.acquire(keys)
    views = lease.views()
    with pytest.raises(errors.ViewsAliveError):
        lease.release()
    with pytest.raises(errors.ViewsAliveError):
        pool.close()
    del lease  # the views keep it (and its pins) alive
    assert pool.stats()["pinned"] == 2
    assert same(views[1], blocks_for(keys, pool.spec)[1])
    del views
    assert pool.stats()["pinned"] == 0


def test_writer_layer_by_layer(pool: pykvshm.Pool) -> None:
    spec = pool.spec
    keys = pykvshm.block_keys(np.arange(16), spec.block_tokens)
    pool.publish(keys[:1], blocks_for(keys[:1], spec))
    data = blocks_for(keys, spec)
    with pool.writer(keys) as w:
        assert list(w.positions) == [1, 2, 3] and len(w) == 3
        assert pool.match(keys) == 1  # reserved blocks are not visible yet
        for layer in range(spec.num_layers):
            w.write_layer(layer, np.ascontiguousarray(data[1:, layer]))
    assert w.done and pool.match(keys) == 4
    with pool.acquire(keys) as lease:
        out = np.empty((4, *spec.block_shape), dtype=spec.np_dtype)
        assert same(lease.copy_to(out), data)
    with pytest.raises(errors.ShapeMismatchError):
        with pool.writer(pykvshm.block_keys(np.arange(100, 104), spec.block_tokens)) as w2:
            w2.write_layer(0, np.zeros((1, 3), dtype=spec.np_dtype))
    with pytest.raises(errors.ShapeMismatchError):
        with pool.writer(pykvshm.block_keys(np.arange(100, 104), spec.block_tokens)) as w2:
            w2.write_layer(spec.num_layers, np.zeros((1, *spec.layer_shape), dtype=spec.np_dtype))
    pool.check()


def test_writer_abort_frees_and_withdraws(pool: pykvshm.Pool) -> None:
    keys = pykvshm.block_keys(np.arange(16), pool.spec.block_tokens)
    free0 = pool.stats()["free"]
    with pytest.raises(RuntimeError):
        with pool.writer(keys) as w:
            assert len(w) == 4
            raise RuntimeError("prefill failed")
    assert w.done and pool.stats()["free"] == free0 and pool.match(keys) == 0
    pool.check()
    # A second writer of the same keys while the first is in flight gets nothing to do.
    w1 = pool.writer(keys)
    w2 = pool.writer(keys)
    assert len(w1) == 4 and len(w2) == 0
    w1.abort()
    pool.check()


def test_eviction_under_pressure(pool_name: str) -> None:
    spec = pykvshm.KVSpec(2, 2, 64, 16, "float16")  # 16 KiB blocks
    with pykvshm.Pool.create(pool_name, spec=spec, capacity="3MiB") as p:
        n = p.num_blocks
        assert 32 <= n <= 64
        first = pykvshm.block_keys(np.arange(16 * 8), 16, salt=b"first")
        p.publish(first, blocks_for(first, spec))
        pinned = p.acquire(first[:4])
        stored = 0
        for r in range(4):
            ks = pykvshm.block_keys(np.arange(16 * (n // 2)), 16, salt=b"round%d" % r)
            stored += p.publish(ks, blocks_for(ks, spec))
        s = p.stats()
        assert s["evictions"] > 0 and s["sealed"] == n
        assert p.match(first) == 4  # the pinned prefix survived; the rest was evicted
        out = np.empty((4, *spec.block_shape), dtype=spec.np_dtype)
        assert same(pinned.copy_to(out), blocks_for(first[:4], spec))
        pinned.release()
        p.check()
        # Everything pinned: nothing can be evicted, so publishing more is PoolFullError.
        everything = []
        for r in range(4):
            for k in first + pykvshm.block_keys(np.arange(16 * (n // 2)), 16, salt=b"round%d" % r):
                lease = p.acquire([k])  # one key at a time: pins every block still cached
                if len(lease):
                    everything.append(lease)
        assert p.stats()["pinned"] == p.stats()["sealed"] == n
        more = pykvshm.block_keys(np.arange(16 * 2), 16, salt=b"more")
        with pytest.raises(errors.PoolFullError, match="pinned"):
            p.publish(more, blocks_for(more, spec))
        for lease in everything:
            lease.release()
        p.check()


def test_stale_key_after_eviction_and_reuse(pool_name: str) -> None:
    """An evicted, reused block is never readable through its old key or an old handle."""
    spec = pykvshm.KVSpec(1, 1, 64, 64, "float32")  # 16 KiB blocks
    with pykvshm.Pool.create(pool_name, spec=spec, capacity="3MiB") as p:
        n = p.num_blocks
        old = pykvshm.block_keys(np.arange(64), 64, salt=b"old")
        p.publish(old, blocks_for(old, spec))
        with p.acquire(old) as lease:
            old_handle = int(lease.handles[0])
        # Fill the pool twice over with other keys: the old block is evicted and reused.
        for r in range(4):
            ks = pykvshm.block_keys(np.arange(64 * (n // 2)), 64, salt=b"new%d" % r)
            p.publish(ks, blocks_for(ks, spec))
        assert p.match(old) == 0
        with p.acquire(old) as lease:
            assert len(lease) == 0
        # The old handle names a block whose generation moved on.
        with pytest.raises(errors.InvalidHandleError):
            p._core.block_buffer(old_handle, False, None)
        index = old_handle & 0xFFFFFFFF
        gen_now = None
        for lease_keys in (ks,):
            with p.acquire(lease_keys) as l2:
                for h in l2.handles.tolist():
                    if h & 0xFFFFFFFF == index:
                        gen_now = h >> 32
        if gen_now is not None:
            assert gen_now > old_handle >> 32
        p.check()


def test_bfloat16_and_torch_cpu(pool_name: str) -> None:
    torch = pytest.importorskip("torch")
    spec = pykvshm.KVSpec(2, 2, 8, 4, "bfloat16")
    with pykvshm.Pool.create(pool_name, spec=spec, capacity="4MiB") as p:
        keys = pykvshm.block_keys(np.arange(12), 4)
        data = torch.randn(3, *spec.block_shape).to(torch.bfloat16)
        assert p.publish(keys, data) == 3
        out = torch.empty_like(data)
        with p.acquire(keys) as lease:
            lease.copy_to(out)
        assert torch.equal(out, data)
        with pytest.raises(errors.DTypeMismatchError):
            p.publish(keys, data.float())
