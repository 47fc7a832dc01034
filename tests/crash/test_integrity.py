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


def _flip_byte(pool: pykvshm.Pool, index: int, offset: int = 100) -> None:
    """A co-tenant (or a bit flip) changes one byte of block ``index``."""
    stride = pool._core.geometry["block_stride"]
    with open(pool.path, "r+b") as f:
        f.seek(pool._core.data_offset + index * stride + offset)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x40]))


def _published(pool: pykvshm.Pool, spec: pykvshm.KVSpec, salt: bytes = b"") -> tuple[list[bytes], np.ndarray, list[int]]:
    keys = pykvshm.block_keys(np.arange(4 * spec.block_tokens), spec.block_tokens, salt=salt)
    data = blocks_for_keys(keys, spec)
    assert pool.publish(keys, data) == 4
    with pool.acquire(keys) as lease:
        indices = [int(h) & 0xFFFFFFFF for h in lease.handles]
    return keys, data, indices


def test_a_failed_block_is_withdrawn_and_stored_again(pool_name: str, spec: pykvshm.KVSpec) -> None:
    """A block failing its checksum used to stay forever: every acquire raised ChecksumError,
    republishing its key stored nothing, match still counted it and check() called the pool
    consistent.  Now the first acquire that sees it withdraws it."""
    with pykvshm.Pool.create(pool_name, spec=spec, capacity="4MiB", checksums=True) as pool:
        keys, data, idx = _published(pool, spec)
        _flip_byte(pool, idx[2])
        with pytest.raises(errors.CorruptPoolError, match=r"1 sealed block\(s\) do not match.*blocks %d\)" % idx[2]):
            pool.check(checksums=True)
        pool.check()  # the structure is intact; only the bytes are wrong
        sealed = pool.stats()["sealed"]
        with pytest.raises(errors.ChecksumError, match="withdrawn"):
            pool.acquire(keys)
        s = pool.stats()
        assert s["checksum_errors"] == 1 and s["pinned"] == 0 and s["sealed"] == sealed - 1
        assert pool.match(keys) == 2  # no longer counted
        with pool.acquire(keys) as lease:  # a miss at the bad block, not an error every time
            assert len(lease) == 2
        pool.check(strict=True, checksums=True)
        assert pool.publish(keys, data) == 1  # the withdrawn key is stored again
        out = np.empty_like(data)
        with pool.acquire(keys) as lease:
            assert len(lease) == 4
            lease.copy_to(out)
        np.testing.assert_array_equal(out, data)
        pool.check(strict=True, checksums=True)


def test_a_failed_block_pinned_elsewhere_is_reclaimed_once_unpinned(pool_name: str, spec: pykvshm.KVSpec) -> None:
    with pykvshm.Pool.create(pool_name, spec=spec, capacity="4MiB", checksums=True) as pool, \
            pykvshm.Pool.open(pool_name) as other:
        keys, data, idx = _published(pool, spec)
        held = other.acquire(keys)  # verified intact, then pinned by another member
        _flip_byte(pool, idx[1])
        with pytest.raises(errors.ChecksumError):
            pool.acquire(keys)
        assert pool.match(keys) == 1 and other.match(keys) == 1
        pool.check(strict=True)  # sealed and out of the index, but flagged as withdrawn: consistent
        assert pool.publish(keys, data) == 1  # stored anew beside the pinned, withdrawn copy
        assert pool.match(keys) == 4
        pool.check(strict=True)
        held.release()
        # Nothing names the withdrawn block any more: filling the pool evicts it like any other.
        n = pool.num_blocks
        pool.free(pool.alloc(n))
        assert pool.match(keys) == 0
        pool.check(strict=True)
        assert pool.stats()["free"] == n


def test_check_checksums_needs_a_pool_with_checksums(pool: pykvshm.Pool) -> None:
    with pytest.raises(ValueError, match="without block checksums"):
        pool.check(checksums=True)


def test_cli_check_verifies_checksums(pool_name: str, spec: pykvshm.KVSpec) -> None:
    import json
    import subprocess
    import sys

    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pykvshm", *argv], capture_output=True, text=True, timeout=60)

    with pykvshm.Pool.create(pool_name, spec=spec, capacity="4MiB", checksums=True) as pool:
        _, _, idx = _published(pool, spec)
        r = cli("check", pool_name, "--checksums", "--json")
        assert r.returncode == 0 and json.loads(r.stdout) == {"ok": True, "strict": True, "checksums": True}, r.stderr
        _flip_byte(pool, idx[3])
        r = cli("check", pool_name, "--checksums")
        assert r.returncode == 1 and f"do not match their checksums (blocks {idx[3]})" in r.stderr, r.stderr
        assert cli("check", pool_name).returncode == 0  # without --checksums the bytes are not read


_WITHDRAW_WORKER = r"""
import sys
import numpy as np
import pykvshm
from pykvshm import errors
from pykvshm.testing import blocks_for_keys, verify_block

name, rounds = sys.argv[1], int(sys.argv[2])
spec = pykvshm.KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, block_tokens=4, dtype="float16")
keys = pykvshm.block_keys(np.arange(16 * spec.block_tokens), spec.block_tokens, salt=b"withdraw")
data = blocks_for_keys(keys, spec)
failures = 0
with pykvshm.Pool.open(name, spec=spec) as pool:
    for _ in range(rounds):
        try:
            with pool.acquire(keys) as lease:
                for j, v in enumerate(lease.views()):
                    assert verify_block(v, keys[j]), "an acquire returned bytes that are not the key's"
                del v
        except errors.ChecksumError:
            failures += 1
        pool.publish(keys, data)
print(failures)
"""


def test_processes_withdraw_and_republish_failed_blocks_concurrently(pool_name: str, spec: pykvshm.KVSpec) -> None:
    """Four processes acquire a prefix with eight corrupted blocks while republishing it: each bad
    block is withdrawn (perhaps by several at once) and stored again; no acquire returns wrong bytes,
    and afterwards the accounting is exact and every sealed block matches its checksum."""
    import subprocess
    import sys

    with pykvshm.Pool.create(pool_name, spec=spec, capacity="4MiB", checksums=True) as pool:
        keys = pykvshm.block_keys(np.arange(16 * spec.block_tokens), spec.block_tokens, salt=b"withdraw")
        pool.publish(keys, blocks_for_keys(keys, spec))
        with pool.acquire(keys) as lease:
            idx = [int(h) & 0xFFFFFFFF for h in lease.handles]
        for i in idx[::2]:
            _flip_byte(pool, i)
        workers = [subprocess.Popen([sys.executable, "-c", _WITHDRAW_WORKER, pool_name, "40"], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for _ in range(4)]
        results = [w.communicate(timeout=120) for w in workers]
        assert all(w.returncode == 0 for w in workers), [r[1][-2000:] for r in results]
        assert sum(int(r[0]) for r in results) >= 1  # the corruption was seen
        pool.check(strict=True, checksums=True)
        s = pool.stats()
        assert s["free"] + s["sealed"] == s["total"] and s["pinned"] == 0 and s["writing"] == 0
        assert pool.match(keys) == 16
        with pool.acquire(keys) as lease:
            out = lease.copy_to(np.empty((16, *spec.block_shape), spec.np_dtype))
        np.testing.assert_array_equal(out, blocks_for_keys(keys, spec))
