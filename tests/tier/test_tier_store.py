"""The tier against a real Mooncake Store (master + storage process on loopback), two pools in one
process: promotion is bit-exact and only of verified blocks, a hit never reaches the store,
demotion takes the next eviction victims, a store that dies costs misses and nothing else."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

import pykvshm
from pykvshm.errors import PoolClosedError, TierUnavailableError
from pykvshm.testing.content import blocks_for_keys, prompt_keys, verify_block
from pykvshm.testing.mooncake import MooncakeCluster
from pykvshm.tier import format as fmt
from pykvshm.tier.config import parse_url
from pykvshm.tier.store import MooncakeStore

SPEC = pykvshm.KVSpec(num_layers=2, num_kv_heads=2, head_dim=16, block_tokens=4, dtype="float16")


def _name(tag: str) -> str:
    return f"s3-tier-{tag}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def racks() -> Iterator[tuple[pykvshm.Pool, pykvshm.Pool]]:
    names = [_name("a"), _name("b")]
    pools = [pykvshm.Pool.create(n, spec=SPEC, capacity="4MiB") for n in names]
    yield pools[0], pools[1]
    for p, n in zip(pools, names):
        p.close()
        pykvshm.Pool.destroy(n)


def _read(pool: pykvshm.Pool, keys: list[bytes]) -> np.ndarray:
    with pool.acquire(keys) as lease:
        out = np.empty((len(lease), *SPEC.block_shape), dtype=SPEC.np_dtype)
        lease.copy_to(out)
    return out


def test_a_prefix_demoted_by_one_pool_is_promoted_bit_exact_into_another(store: MooncakeCluster, racks) -> None:
    a, b = racks
    keys = prompt_keys(SPEC, 10, 12, b"s")
    data = np.random.default_rng(0).integers(0, 1 << 16, size=(12, *SPEC.block_shape)).astype(np.uint16)
    data = data.view(SPEC.np_dtype)
    a.publish(keys, data)
    with a.tier(store.url(), demoter=False) as ta, b.tier(store.url(), demoter=False) as tb:
        assert ta.demote_keys(keys) == 12
        assert ta.demote_keys(keys) == 0  # already there: nothing is written twice
        assert tb.lookup(keys) == 12 and tb.lookup(keys, start=5) == 7
        assert b.match(keys) == 0
        assert tb.promote(keys) == 12
        assert np.array_equal(_read(b, keys).view(np.uint16), data.view(np.uint16))
        assert tb.stats()["promoted"] == 12 and tb.stats()["integrity_failures"] == 0
        b.check(strict=True)
        # The pools count them too, where a read-only attach (the exporter) reads them.
        assert a.stats()["tier_demoted"] == 12 and b.stats()["tier_demoted"] == 0
        with pykvshm.Pool.open(b.name, read_only=True) as monitor:
            assert monitor.stats()["tier_promoted"] == 12 and monitor.stats()["tier_integrity_failures"] == 0
        # A hit never reaches the store: with every key in the pool, no store read happens even
        # when the store's copy is gone.
        store_client = MooncakeStore(parse_url(store.url()))
        try:
            store_client.remove([tb.store_key(k) for k in keys])
        finally:
            store_client.close()
        assert tb.promote(keys) == 12 and tb.stats()["promote_misses"] == 0


def test_only_the_stored_continuation_is_promoted(store: MooncakeCluster, racks) -> None:
    a, b = racks
    keys = prompt_keys(SPEC, 11, 8, b"s")
    a.publish(keys, blocks_for_keys(keys, SPEC))
    b.publish(keys[:2], blocks_for_keys(keys[:2], SPEC))  # rack B has the first 2 itself
    with a.tier(store.url(), demoter=False) as ta, b.tier(store.url(), demoter=False) as tb:
        ta.demote_keys(keys[:5])  # the store has 0..4, not 5..7
        assert tb.promote(keys) == 5
        assert tb.stats()["promoted"] == 3 and tb.stats()["promote_misses"] == 1
        assert [verify_block(v, k) for v, k in zip(_read(b, keys), keys)] == [True] * 5


def test_a_corrupted_or_misfiled_store_value_is_refused_and_counted(store: MooncakeCluster, racks) -> None:
    a, b = racks
    keys = prompt_keys(SPEC, 12, 6, b"s")
    a.publish(keys, blocks_for_keys(keys, SPEC))
    client = MooncakeStore(parse_url(store.url()))
    try:
        with a.tier(store.url(), demoter=False) as ta, b.tier(store.url(), demoter=False) as tb:
            ta.demote_keys(keys)
            # A flipped payload byte in block 2 (written through a second client).
            k2 = tb.store_key(keys[2])
            v = bytearray(client.get([k2])[0])
            v[fmt.HEADER_BYTES + 77] ^= 0x01
            client.remove([k2])
            assert client.put([k2], [bytes(v)]) == [True]
            assert tb.promote(keys) == 2
            assert tb.stats()["integrity_failures"] == 1
            assert b.match(keys) == 2 and b.stats()["sealed"] == 2
            # Block 4's value stored under block 3's name (a valid block, of another key).
            k3, good4 = tb.store_key(keys[3]), client.get([tb.store_key(keys[4])])[0]
            client.remove([k3])
            client.put([k3], [good4])
            client.remove([k2])
            ta.forget()
            ta.demote_keys(keys[2:3])  # block 2 repaired
            assert tb.promote(keys) == 3
            assert tb.stats()["integrity_failures"] == 2 and b.stats()["tier_integrity_failures"] == 2
            assert [verify_block(x, k) for x, k in zip(_read(b, keys), keys)] == [True] * 3
            b.check(strict=True)
    finally:
        client.close()


def test_the_demoter_copies_the_next_victims_before_eviction_takes_them(store: MooncakeCluster) -> None:
    names = [_name("d"), _name("e")]
    spec = pykvshm.KVSpec(num_layers=4, num_kv_heads=4, head_dim=64, block_tokens=16, dtype="float16")
    small = pykvshm.Pool.create(names[0], spec=spec, capacity="4MiB")  # 32 blocks
    other = pykvshm.Pool.create(names[1], spec=spec, capacity="12MiB")
    try:
        with small.tier(store.url(), low_watermark=0.25, demote_batch=8, interval=0.01) as t, \
                other.tier(store.url(), demoter=False) as t2:
            prompts = [prompt_keys(spec, 100 + i, 4, b"d") for i in range(24)]  # 96 blocks through 32
            for keys in prompts:
                small.publish(keys, blocks_for_keys(keys, spec))
                time.sleep(0.03)  # the demoter runs beside the engine, not inside its calls
            assert small.stats()["evictions"] > 0 and t.stats()["demoted"] > 0
            # Prompts evicted from the small pool come back from the store into another pool.
            evicted = [keys for keys in prompts if small.match(keys) < len(keys)]
            assert evicted
            back = sum(t2.promote(keys) == len(keys) for keys in evicted)
            assert back >= len(evicted) // 2, (back, len(evicted), t.stats())
            for keys in evicted:
                n = other.match(keys)
                assert all(verify_block(x, k) for x, k in zip(_read_spec(other, keys[:n], spec), keys))
        small.check(strict=True)
        other.check(strict=True)
    finally:
        for p, n in zip((small, other), names):
            p.close()
            pykvshm.Pool.destroy(n)


def _read_spec(pool: pykvshm.Pool, keys: list[bytes], spec: pykvshm.KVSpec) -> np.ndarray:
    with pool.acquire(keys) as lease:
        out = np.empty((len(lease), *spec.block_shape), dtype=spec.np_dtype)
        lease.copy_to(out)
    return out


def test_concurrent_promotions_are_batched_and_each_gets_its_answer(store: MooncakeCluster, racks) -> None:
    a, b = racks
    prompts = [prompt_keys(SPEC, 200 + i, 4, b"c") for i in range(16)]
    with a.tier(store.url(), demoter=False) as ta, b.tier(store.url(), demoter=False) as tb:
        for keys in prompts[:12]:
            a.publish(keys, blocks_for_keys(keys, SPEC))
            ta.demote_keys(keys)
        futs = [tb.promote_async(keys) for keys in prompts]
        assert [f.result(60) for f in futs] == [4] * 12 + [0] * 4
    with pytest.raises(PoolClosedError):
        tb.promote_async(prompts[0]).result(1)


def test_a_store_that_dies_costs_misses_only_and_a_restarted_one_serves_again(own_store: MooncakeCluster, racks) -> None:
    a, b = racks
    keys = prompt_keys(SPEC, 13, 6, b"s")
    a.publish(keys, blocks_for_keys(keys, SPEC))
    with a.tier(own_store.url(), demoter=False) as ta, b.tier(own_store.url(), demoter=False) as tb:
        assert ta.demote_keys(keys[:3]) == 3
        assert tb.promote(keys[:3]) == 3
        own_store.kill_master()
        more = prompt_keys(SPEC, 14, 4, b"s")
        a.publish(more, blocks_for_keys(more, SPEC))
        assert ta.demote_keys(more) == 0 and ta.stats()["demote_failed"] == 4
        assert tb.lookup(keys) == 0
        assert tb.promote(keys) == 3  # what was committed stays; the rest is a miss
        assert tb.promote(more) == 0
        assert all(verify_block(x, k) for x, k in zip(_read(b, keys), keys))
        a.check(strict=True)
        b.check(strict=True)
        assert a.match(keys) == 6 and a.match(more) == 4
        # A restarted master has forgotten every object, and the same clients work again.
        own_store.start_master()
        deadline = time.monotonic() + 30
        while True:
            ta.forget()
            if ta.demote_keys(more) == 4 and tb.promote(more) == 4:
                break
            assert time.monotonic() < deadline, (ta.stats(), tb.stats(), own_store.log())
            time.sleep(0.5)
        assert tb.lookup(keys) == 0  # what the dead master held is gone
        assert all(verify_block(x, k) for x, k in zip(_read(b, more), more))
        b.check(strict=True)


def test_an_unreachable_store_is_a_clear_error(racks) -> None:
    a, _ = racks
    t0 = time.monotonic()
    with pytest.raises(TierUnavailableError, match="not reachable"):
        a.tier("mooncake://127.0.0.1:1?metadata=http://127.0.0.1:1/metadata")
    assert time.monotonic() - t0 < 30  # not the store client's own minute and a half of retries


def test_the_schedulers_extend_hit_promotes_a_miss_once_and_never_a_hit(store: MooncakeCluster, racks) -> None:
    a, b = racks
    keys = prompt_keys(SPEC, 15, 8, b"s")
    a.publish(keys, blocks_for_keys(keys, SPEC))
    with a.tier(store.url(), demoter=False) as ta, b.tier(store.url(), demoter=False) as tb:
        ta.demote_keys(keys[:6])
        # Without waiting it only starts the promotion; the blocks are there by the next scheduling.
        first = tb.extend_hit([keys], 0, wait=0.0)
        assert first in (0, 6)
        deadline = time.monotonic() + 30
        while tb.extend_hit([keys], b.match(keys), wait=0.0) < 6:
            assert time.monotonic() < deadline, tb.stats()
            time.sleep(0.05)
        assert tb.stats()["promoted"] == 6  # asked again and again, promoted once
        assert tb.extend_hit([keys[:6]], 6, wait=5.0) == 6  # a full hit: nothing asked of the store
        lookups = tb.stats()
        b2 = keys[:2]
        assert tb.extend_hit([b2, keys[:2]], 2, wait=5.0) == 2 and tb.stats() == lookups
        # With a wait, a tensor-parallel pair of key lists comes back at the minimum over ranks.
        other = prompt_keys(SPEC, 16, 8, b"s")
        a.publish(other, blocks_for_keys(other, SPEC))
        ta.demote_keys(other[:3])
        assert tb.extend_hit([keys, other], 0, wait=10.0) == 3
        assert [verify_block(x, k) for x, k in zip(_read(b, other), other)] == [True] * 3


def test_a_promotion_raced_by_a_local_publish_writes_nothing_twice(store: MooncakeCluster, racks) -> None:
    """Between the promoter's match and its reserve another member may publish the same keys: the
    writer then holds none of them and the commit is empty (no error, nothing overwritten)."""
    a, b = racks
    keys = prompt_keys(SPEC, 17, 4, b"s")
    a.publish(keys, blocks_for_keys(keys, SPEC))
    with a.tier(store.url(), demoter=False) as ta, b.tier(store.url(), demoter=False) as tb:
        ta.demote_keys(keys)
        payloads = [memoryview(v)[fmt.HEADER_BYTES:] for v in tb._store.get([tb.store_key(k) for k in keys])]
        b.publish(keys[:2], blocks_for_keys(keys[:2], SPEC))  # the "other member" wins blocks 0 and 1
        tb._commit(b"".join(keys), payloads)
        assert tb.stats()["promoted"] == 2 and b.match(keys) == 4
        tb._commit(b"".join(keys), payloads)  # all present now: an empty writer
        assert tb.stats()["promoted"] == 2 and tb.stats()["promote_errors"] == 0
        assert all(verify_block(x, k) for x, k in zip(_read(b, keys), keys))
        b.check(strict=True)


def test_extend_hit_after_close_neither_hangs_nor_raises(store: MooncakeCluster, racks) -> None:
    """A promotion future that is already done when extend_hit registers it (here: the tier is
    closed, so it fails at once) must not deadlock the scheduler."""
    _, b = racks
    keys = prompt_keys(SPEC, 18, 4, b"s")
    tb = b.tier(store.url(), demoter=False)
    tb.close()
    assert tb.extend_hit([keys], 0, wait=1.0) == 0
    assert tb.extend_hit([keys], 0, wait=0.0) == 0  # and again: nothing stays "in flight"
