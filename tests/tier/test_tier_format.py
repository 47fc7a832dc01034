"""The tier's pieces that need no store: URL configuration, store keys, the value header and its
checks, and the core's pin_victims (the demoter's view of the next evictions)."""

from __future__ import annotations

import struct
import subprocess
import sys

import numpy as np
import pytest

import pykvshm
from pykvshm.errors import TierConfigError
from pykvshm.testing.content import blocks_for_keys, prompt_keys, verify_block
from pykvshm.tier import format as fmt
from pykvshm.tier.config import parse_url

URL = "mooncake://127.0.0.1:50051?metadata=http://127.0.0.1:8080/metadata"


def test_url_maps_to_the_store_setup() -> None:
    c = parse_url(URL + "&protocol=rdma&device=mlx5_0&segment=4GiB&buffer=256MiB&host=10.0.0.7&replicas=2")
    assert (c.master, c.metadata, c.protocol, c.device) == ("127.0.0.1:50051", "http://127.0.0.1:8080/metadata",
                                                            "rdma", "mlx5_0")
    assert (c.segment, c.buffer, c.local_hostname(), c.replicas) == (4 << 30, 256 << 20, "10.0.0.7", 2)
    d = parse_url(URL)
    assert (d.protocol, d.segment, d.buffer, d.replicas) == ("tcp", 0, 64 << 20, 1)


@pytest.mark.parametrize("url, what", [
    ("redis://h:1?metadata=x", "scheme"),
    ("mooncake://h?metadata=x", "HOST:RPC_PORT"),
    ("mooncake://h:port?metadata=x", "port"),
    ("mooncake://h:1", "metadata"),
    ("mooncake://h:1?metadata=x&protocol=udp", "protocol"),
    ("mooncake://h:1?metadata=x&segment=lots", "segment"),
    ("mooncake://h:1?metadata=x&buffer=1KiB", "buffer"),
    ("mooncake://h:1?metadata=x&replicas=0", "replicas"),
    ("mooncake://h:1?metadata=x&colour=red", "unknown"),
    ("mooncake://h:1?metadata=x&metadata=y", "2 times"),
    (42, "string"),
])
def test_bad_urls_are_refused_saying_why(url, what) -> None:
    with pytest.raises(TierConfigError, match=what):
        parse_url(url)


def test_store_keys_are_namespaced_by_geometry(spec: pykvshm.KVSpec) -> None:
    same = pykvshm.KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, block_tokens=4, dtype="float16")
    others = [pykvshm.KVSpec(num_layers=3, num_kv_heads=2, head_dim=8, block_tokens=4, dtype="float16"),
              pykvshm.KVSpec(num_layers=2, num_kv_heads=1, head_dim=16, block_tokens=4, dtype="float16"),
              pykvshm.KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, block_tokens=8, dtype="float16"),
              pykvshm.KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, block_tokens=4, dtype="bfloat16")]
    assert fmt.namespace(spec) == fmt.namespace(same)
    assert len({fmt.namespace(s) for s in [spec, *others]}) == 5
    k = bytes(range(16))
    assert fmt.store_key(fmt.namespace(spec), k) == f"pykvshm/v1/{fmt.namespace(spec)}/{k.hex()}"


def _value(spec: pykvshm.KVSpec, key: bytes) -> bytearray:
    payload = blocks_for_keys([key], spec)[0].tobytes()
    return bytearray(fmt.header(spec, key, payload) + payload)


def test_a_value_verifies_only_for_its_key_geometry_and_bytes(spec: pykvshm.KVSpec) -> None:
    key, other = prompt_keys(spec, 0, 2, b"t")
    v = _value(spec, key)
    assert len(v) == fmt.HEADER_BYTES + spec.block_bytes
    assert fmt.verify(spec, key, v) == fmt.OK
    assert fmt.verify(spec, key, b"") == fmt.MISSING
    assert fmt.verify(spec, key, v[:40]) == fmt.BAD_HEADER
    assert fmt.verify(spec, other, v) == fmt.BAD_KEY
    wide = pykvshm.KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, block_tokens=4, dtype="float32")
    assert fmt.verify(wide, key, v) == fmt.BAD_GEOMETRY
    assert fmt.verify(spec, key, v[:-1]) == fmt.BAD_LENGTH
    assert fmt.verify(spec, key, v + b"\0") == fmt.BAD_LENGTH
    for pos in (fmt.HEADER_BYTES, fmt.HEADER_BYTES + 101, len(v) - 1):  # any payload byte
        bad = bytearray(v)
        bad[pos] ^= 0x10
        assert fmt.verify(spec, key, bad) == fmt.BAD_CRC
    bad = bytearray(v)
    bad[12] ^= 1  # the stored CRC itself
    assert fmt.verify(spec, key, bad) == fmt.BAD_CRC
    bad = bytearray(v)
    bad[0:8] = b"NOTTIER!"
    assert fmt.verify(spec, key, bad) == fmt.BAD_HEADER
    bad = bytearray(v)
    struct.pack_into("<Q", bad, 56, spec.block_bytes + 1)  # a lying length field
    assert fmt.verify(spec, key, bad) == fmt.BAD_LENGTH


def test_pin_victims_pins_the_next_clock_victims_only(pool: pykvshm.Pool, spec: pykvshm.KVSpec) -> None:
    keys = prompt_keys(spec, 1, 12, b"v")
    pool.publish(keys, blocks_for_keys(keys, spec))
    held = pool.acquire(keys[:3])  # pinned by a reader: never a victim
    hot = pool.acquire(keys[3:5])  # touched (reference bit set): not a victim either
    hot.release()
    handles, kb = pool._core.pin_victims(100)
    got = {kb[i:i + 16] for i in range(0, len(kb), 16)}
    assert len(handles) == len(got) == 7 and got == set(keys[5:])
    assert pool.stats()["pinned"] == 10
    # The demoter's pins do not count as a use: released, the same blocks are the victims again.
    pool._core.release(handles)
    assert set(_victim_keys(pool)) == set(keys[5:])
    handles, kb = pool._core.pin_victims(100)
    # Pinned, they hold against eviction: only the 2 touched blocks can be evicted, not 3.
    free = pool.stats()["free"]
    with pytest.raises(pykvshm.PoolFullError):
        pool.alloc(free + 3)
    for k in keys[5:]:
        assert pool.match([k]) == 1
    pool._core.release(handles)
    held.release()
    pool.check(strict=True)
    assert pool._core.pin_victims(0)[0].size == 0


def _victim_keys(pool: pykvshm.Pool) -> list[bytes]:
    h, kb = pool._core.pin_victims(1000)
    pool._core.release(h)
    return [kb[i:i + 16] for i in range(0, len(kb), 16)]


_EVICTOR = """
import sys, pykvshm
p = pykvshm.Pool.open(sys.argv[1])
n = 0
for _ in range(20):
    try:
        h = p.alloc(p.stats()["total"] // 2)
        n += len(h)
        p.free(h)
    except pykvshm.PoolFullError:
        pass
p.close()
print(n)
"""


def test_victims_pinned_in_one_process_survive_evictions_in_another(pool_name: str) -> None:
    spec = pykvshm.KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, block_tokens=4, dtype="float16")
    pool = pykvshm.Pool.create(pool_name, spec=spec, capacity="3MiB")
    try:
        keys = prompt_keys(spec, 2, pool.num_blocks, b"w")
        pool.publish(keys, blocks_for_keys(keys, spec))
        handles, kb = pool._core.pin_victims(64)
        pinned = [kb[i:i + 16] for i in range(0, len(kb), 16)]
        assert len(pinned) == 64
        r = subprocess.run([sys.executable, "-c", _EVICTOR, pool_name], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert int(r.stdout) > 0  # it did evict (the blocks nobody pinned)
        # Every block the demoter holds is still in the index with its own bytes.
        lease = pykvshm.Lease(pool, handles)
        views = lease.views()
        assert all(verify_block(v, k) for v, k in zip(views, pinned))
        del views
        for k in pinned:
            assert pool.match([k]) == 1
        lease.release()
        pool.check(strict=True)
    finally:
        pool.close()


def test_pin_victims_in_a_noncoherent_pool(pool_name: str, spec: pykvshm.KVSpec) -> None:
    pool = pykvshm.Pool.create(pool_name, spec=spec, capacity="8MiB", coherence="noncoherent")
    try:
        keys = prompt_keys(spec, 3, 6, b"n")
        pool.publish(keys, blocks_for_keys(keys, spec))
        handles, kb = pool._core.pin_victims(4)
        got = [kb[i:i + 16] for i in range(0, len(kb), 16)]
        assert len(handles) == 4 and set(got) <= set(keys)
        lease = pykvshm.Lease(pool, handles)
        views = lease.views()
        assert all(verify_block(v, k) for v, k in zip(views, got))
        del views
        lease.release()
        pool.check(strict=True)
    finally:
        pool.close()


def test_pin_victims_looks_at_a_bounded_stretch_from_the_clock_hand(pool_name: str, spec: pykvshm.KVSpec) -> None:
    """At most 64 n + 1024 blocks are looked at (the pool lock is held for the scan in
    noncoherent mode): with the first 1088 blocks from the hand recently used, one victim asked
    finds none, two find two just past them."""
    pool = pykvshm.Pool.create(pool_name, spec=spec, capacity="4MiB")
    try:
        n = pool.num_blocks
        assert n >= 1300 and pool.stats()["evictions"] == 0  # the clock hand is still at block 0
        keys = prompt_keys(spec, 4, n, b"b")
        pool.publish(keys, blocks_for_keys(keys, spec))
        h, kb = pool._core.pin_victims(n)  # all untouched: every block, in order from the hand
        assert len(h) == n
        pool._core.release(h)
        index = {kb[16 * j:16 * j + 16]: int(x) & 0xFFFFFFFF for j, x in enumerate(h)}
        for k, i in index.items():
            if i < 1088:
                pool.acquire([k]).release()  # recently used: not a victim
        h1, _ = pool._core.pin_victims(1)
        assert len(h1) == 0
        h2, _ = pool._core.pin_victims(2)
        assert sorted(int(x) & 0xFFFFFFFF for x in h2) == [1088, 1089]
        pool._core.release(h2)
        pool.check(strict=True)
    finally:
        pool.close()
