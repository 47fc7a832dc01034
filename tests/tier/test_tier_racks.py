"""Two racks = two pools, each driven by a process tree in a PID namespace of its own (a host of its
own), sharing one Mooncake Store on loopback: a prefix computed in rack A is served in rack B from
the store, bit-exact; killing the master or a whole rack mid-transfer loses nothing committed and
leaves every pool consistent (check(strict=True) after recovery)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import pykvshm
from pykvshm.testing.content import prompt_keys, verify_block
from pykvshm.testing.mooncake import MooncakeCluster
from pykvshm.testing.rig import namespaces_available, pid_namespace
from pykvshm.testing.tier_rack import SALT, start_rack

_OK, _WHY = namespaces_available()
pytestmark = pytest.mark.skipif(not _OK, reason=_WHY)

# 64 KiB blocks: rack B's 32-block pool evicts while it cycles through rack A's prompts.
SPEC = pykvshm.KVSpec(num_layers=4, num_kv_heads=4, head_dim=64, block_tokens=16, dtype="float16")
LEASE = 1.0
BLOCKS = 4


@pytest.fixture
def pools() -> Iterator[tuple[str, str]]:
    names = (f"s3-tier-ra-{uuid.uuid4().hex[:10]}", f"s3-tier-rb-{uuid.uuid4().hex[:10]}")
    made = [pykvshm.Pool.create(names[0], spec=SPEC, capacity="24MiB", lease=LEASE),
            pykvshm.Pool.create(names[1], spec=SPEC, capacity="4MiB", lease=LEASE)]
    for p in made:
        p.close()
    yield names
    for n in names:
        try:
            pykvshm.Pool.destroy(n)
        except pykvshm.errors.PoolNotFoundError:
            pass


def _settle(name: str) -> pykvshm.Pool:
    """Open a rack's pool from here, reclaim what dead members held, and check it strictly."""
    p = pykvshm.Pool.open(name, lease=LEASE)
    deadline = time.monotonic() + 30
    while any(not m["alive"] for m in p.members() if m["pid"] != 0) or p.stats()["members"] > 1:
        p.recover()
        if time.monotonic() > deadline:
            raise AssertionError(f"members of {name} not reclaimed: {p.members()}")
        time.sleep(0.1)
    p.check(strict=True)
    return p


def _wrong_blocks(pool: pykvshm.Pool, prompts: range) -> tuple[int, int]:
    """(blocks present, blocks whose bytes are not their key's) over the prompts' keys."""
    present = wrong = 0
    for i in prompts:
        keys = prompt_keys(SPEC, i, BLOCKS, SALT)
        with pool.acquire(keys) as lease:
            views = lease.views()
            present += len(views)
            wrong += sum(not verify_block(v, k) for v, k in zip(views, keys))
            del views
    return present, wrong


def test_a_prefix_computed_in_rack_a_is_served_in_rack_b_bit_exact(store: MooncakeCluster, pools,
                                                                   tmp_path: Path) -> None:
    a = start_rack(tmp_path, "a", "demote", pools[0], store.url(), "--prompts", "6", "--blocks", str(BLOCKS))
    sa = a.wait_status(1, timeout=60, until=lambda s: s[0].get("finished"))[0]
    assert sa["done"] == list(range(6)) and sa["errors"] == 0, a.log_tail()
    b = start_rack(tmp_path, "b", "promote", pools[1], store.url(), "--prompts", "6", "--blocks", str(BLOCKS))
    sb = b.wait_status(1, timeout=60, until=lambda s: s[0].get("finished"))[0]
    assert a.pid_ns != b.pid_ns != pid_namespace()
    assert sb["done"] == list(range(6)) and sb["wrong"] == 0 and sb["errors"] == 0, b.log_tail()
    assert sb["tier"]["promoted"] == 6 * BLOCKS and sb["tier"]["integrity_failures"] == 0
    assert a.stop() == 0 and b.stop() == 0
    for name in pools:
        p = _settle(name)
        assert _wrong_blocks(p, range(6)) == (6 * BLOCKS, 0)
        p.close()


def test_killing_the_master_mid_promotion_loses_nothing_committed(own_store: MooncakeCluster, pools,
                                                                 tmp_path: Path) -> None:
    a = start_rack(tmp_path, "a", "demote", pools[0], own_store.url(), "--prompts", "16", "--blocks", str(BLOCKS))
    assert a.wait_status(1, timeout=60, until=lambda s: s[0].get("finished"))[0]["done"] == list(range(16))
    # Rack B cycles through 16 prompts (64 blocks) in a 32-block pool: it promotes all the time.
    b = start_rack(tmp_path, "b", "promote", pools[1], own_store.url(), "--prompts", "16", "--blocks",
                   str(BLOCKS), "--loop")
    b.wait_status(1, timeout=60, until=lambda s: s[0]["tier"].get("promoted", 0) >= 48)
    own_store.kill_master()
    before = b.status()["rounds"]
    b.wait_status(1, timeout=60, until=lambda s: s[0]["rounds"] >= before + 20)  # B goes on, on misses
    sb = b.status()
    assert sb["wrong"] == 0, b.log_tail()
    assert sb["tier"]["promote_misses"] > 0  # the store's blocks were gone, and only that
    assert b.stop() == 0 and a.stop() == 0
    pa, pb = _settle(pools[0]), _settle(pools[1])
    # Rack A keeps every block it committed; rack B holds only correct blocks, accounted exactly.
    assert _wrong_blocks(pa, range(16)) == (16 * BLOCKS, 0)
    present, wrong = _wrong_blocks(pb, range(16))
    assert wrong == 0 and present == pb.stats()["sealed"] > 0
    pa.close()
    pb.close()


@pytest.mark.parametrize("victim", ["a", "b"])
def test_killing_a_rack_mid_transfer_leaves_every_pool_consistent(store: MooncakeCluster, pools, tmp_path: Path,
                                                                  victim: str) -> None:
    first = 1000 if victim == "a" else 2000  # keys of their own in the shared store
    if victim == "b":
        a = start_rack(tmp_path, "a", "demote", pools[0], store.url(), "--first", str(first), "--prompts", "16",
                       "--blocks", str(BLOCKS))
        a.wait_status(1, timeout=60, until=lambda s: s[0].get("finished"))
        b = start_rack(tmp_path, "b", "promote", pools[1], store.url(), "--first", str(first), "--prompts", "16",
                       "--blocks", str(BLOCKS), "--loop")
        b.wait_status(1, timeout=60, until=lambda s: s[0]["tier"].get("promoted", 0) >= 48)
        b.kill()  # the whole rack, mid-promotion
        assert a.stop() == 0
    else:
        a = start_rack(tmp_path, "a", "demote", pools[0], store.url(), "--first", str(first), "--prompts", "300",
                       "--blocks", str(BLOCKS), "--loop")
        a.wait_status(1, timeout=60, until=lambda s: len(s[0]["done"]) >= 8)
        a.kill()  # the whole rack, mid-demotion
        done = a.status()["done"]
    pa, pb = _settle(pools[0]), _settle(pools[1])
    for p in (pa, pb):
        n = 300 if victim == "a" else 16
        present, wrong = _wrong_blocks(p, range(first, first + n))
        assert wrong == 0 and present == p.stats()["sealed"]
    if victim == "a":
        # Every prompt rack A saw stored is served whole from the store, bit-exact, into rack B.
        with pb.tier(store.url(), demoter=False) as t:
            for i in done[:6]:
                keys = prompt_keys(SPEC, i, BLOCKS, SALT)
                assert t.promote(keys) == BLOCKS
        assert _wrong_blocks(pb, range(first, first + 300))[1] == 0
        pb.check(strict=True)
    pa.close()
    pb.close()
