"""Per-block CRC32C: a block whose bytes changed after it was sealed is an error, never data."""

from __future__ import annotations

import numpy as np
import pytest

import pykvshm
from pykvshm import _core, errors
from pykvshm.testing import blocks_for_keys


def test_crc32c_known_answer() -> None:
    # RFC 3720 test vector: 32 bytes of zeros.
    assert _core.crc32c(bytes(32)) == 0x8A9136AA
    assert _core.crc32c(b"123456789") == 0xE3069283
    assert _core.crc32c(b"6789", _core.crc32c(b"12345")) == 0xE3069283


def test_corrupted_block_is_detected(pool_name: str, spec: pykvshm.KVSpec) -> None:
    with pykvshm.Pool.create(pool_name, spec=spec, capacity="4MiB", checksums=True) as pool:
        assert pool.checksums
        keys = pykvshm.block_keys(np.arange(4 * spec.block_tokens), spec.block_tokens)
        pool.publish(keys, blocks_for_keys(keys, spec))
        with pool.acquire(keys) as lease:
            index = int(lease.handles[2]) & 0xFFFFFFFF
        stride = pool._core.geometry["block_stride"]
        with open(pool.path, "r+b") as f:  # a co-tenant (or a bit flip) changes one byte of block 2
            f.seek(pool._core.data_offset + index * stride + 100)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0x40]))
        with pytest.raises(errors.ChecksumError, match="does not match its checksum"):
            pool.acquire(keys)
        s = pool.stats()
        assert s["checksum_errors"] == 1 and s["pinned"] == 0  # the failed acquire kept no pins
        with pool.acquire(keys[:2]) as lease:  # the intact prefix is still readable
            assert len(lease) == 2
        pool.check()


def test_checksums_off_by_default(pool: pykvshm.Pool) -> None:
    assert not pool.checksums
