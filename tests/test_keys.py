"""Block keys: chaining, salt, folding of engine-provided hashes."""

from __future__ import annotations

import numpy as np
import pytest

import pykvshm


def test_one_key_per_full_block() -> None:
    keys = pykvshm.block_keys(list(range(50)), 16)
    assert len(keys) == 3
    assert all(isinstance(k, bytes) and len(k) == 16 for k in keys)
    assert pykvshm.block_keys([], 16) == []
    assert pykvshm.block_keys(list(range(15)), 16) == []


def test_keys_are_chained_prefix_hashes() -> None:
    a = pykvshm.block_keys(np.arange(64), 16)
    b = pykvshm.block_keys(np.arange(64), 16)
    assert a == b
    # Same second block, different first block: every key from block 0 on differs.
    t = np.arange(64)
    t[0] = 999
    c = pykvshm.block_keys(t, 16)
    assert all(x != y for x, y in zip(a, c))
    # Changing block 2 keeps keys 0 and 1.
    t = np.arange(64)
    t[40] = -1
    d = pykvshm.block_keys(t, 16)
    assert d[:2] == a[:2] and d[2] != a[2] and d[3] != a[3]
    # A longer prompt extends the shorter one's keys.
    assert pykvshm.block_keys(np.arange(80), 16)[:4] == a


def test_salt_separates_caches() -> None:
    t = np.arange(32)
    assert pykvshm.block_keys(t, 16, salt=b"llama") != pykvshm.block_keys(t, 16, salt=b"qwen")
    assert pykvshm.block_keys(t, 16, salt=b"llama") == pykvshm.block_keys(t.tolist(), 16, salt=b"llama")


def test_token_dtype_does_not_matter() -> None:
    t = np.arange(32)
    assert pykvshm.block_keys(t.astype(np.int32), 8) == pykvshm.block_keys(t.astype(np.int64), 8)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        pykvshm.block_keys([1, 2, 3], 0)
    with pytest.raises(ValueError):
        pykvshm.block_keys(np.zeros((2, 8), dtype=np.int64), 4)
    with pytest.raises(TypeError):
        pykvshm.block_keys(np.zeros(8, dtype=np.float32), 4)


def test_fold_key() -> None:
    k16 = bytes(range(16))
    assert pykvshm.fold_key(k16) == k16
    k32 = bytes(range(32))
    f = pykvshm.fold_key(k32)
    assert len(f) == 16 and f == pykvshm.fold_key(bytearray(k32)) and f != k32[:16]
    assert pykvshm.fold_key(12345) == pykvshm.fold_key(12345)
    assert pykvshm.fold_key(12345) != pykvshm.fold_key(12346)
    assert pykvshm.fold_key(-1) != pykvshm.fold_key(1)
    with pytest.raises(TypeError):
        pykvshm.fold_key(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        pykvshm.fold_key(b"")


def test_engine_hashes_work_as_keys(pool: pykvshm.Pool) -> None:
    spec = pool.spec
    vllm_like = [bytes([i]) * 32 for i in range(4)]  # 32-byte block hashes
    data = np.ones((4, *spec.block_shape), dtype=spec.np_dtype)
    assert pool.publish(vllm_like, data) == 4
    assert pool.match(vllm_like) == 4
    assert pool.match([pykvshm.fold_key(k) for k in vllm_like]) == 4
