"""The connector's cluster tier under vLLM's real scheduler: a prefix computed behind another pool
(rack A) is promoted from a real Mooncake Store on loopback into this engine's pool (rack B) and
loaded instead of recomputed; the request is held back (``None``, "ask again later") while its
promotion is in flight, so the scheduler itself never blocks."""

from __future__ import annotations

import os
import time

import harness as H
import pytest
import torch
from test_scheduler import produce, tokens

import pykvshm
from pykvshm.integrations.vllm import request_keys
from pykvshm.testing.mooncake import MooncakeCluster, mooncake_available


@pytest.fixture
def store(tmp_path):
    ok, why = mooncake_available()
    if not ok:
        if os.environ.get("PYKVSHM_REQUIRE_TIER") == "1":
            pytest.fail(f"PYKVSHM_REQUIRE_TIER=1 but {why}")
        pytest.skip(why)
    with MooncakeCluster(tmp_path / "mooncake") as mc:
        yield mc


@pytest.fixture
def rack_b(pool_name):
    name = pool_name + "-b"
    yield name
    try:
        pykvshm.Pool.destroy(name)
    except pykvshm.errors.PoolNotFoundError:
        pass


def test_a_prefix_from_another_rack_is_promoted_and_loaded_bit_exact(model_dir, pool_name, rack_b, store):
    prompt = tokens(100)
    _, producer, p_blocks = produce(model_dir, {"pool": pool_name, "capacity": "64MiB"}, {"a": prompt})
    cfg = H.vllm_config(model_dir, {"pool": rack_b, "capacity": "64MiB", "tier": store.url(), "tier_wait": 30},
                        role="kv_consumer")
    sched, consumer = H.scheduler(cfg), H.Worker.create(cfg)
    req = H.request("b", prompt)
    keys = request_keys(sched.connector.scheduler_side.cfg, list(req.block_hashes), 3)
    # Rack A demotes the prefix's blocks to the store (its demoter would, ahead of eviction).
    with pykvshm.Pool.open(pool_name) as a, a.tier(store.url(), demoter=False) as ta:
        assert a.match(keys) == 3
        ta.demote_keys(keys)
    with pykvshm.Pool.open(rack_b) as b:
        assert b.match(keys) == 0  # rack B has never seen the prompt
    sched.add_request(req)
    deadline = time.monotonic() + 60
    while True:
        t0 = time.monotonic()
        so = sched.schedule()
        assert time.monotonic() - t0 < 5  # a promotion in flight holds the request back, not the scheduler
        if so.scheduled_new_reqs:
            break
        assert time.monotonic() < deadline
        time.sleep(0.01)
    [new] = so.scheduled_new_reqs
    assert new.num_computed_tokens == 96  # admitted once the promotion landed: loaded, not recomputed
    [load] = so.kv_connector_metadata.loads
    assert consumer.run_step(so.kv_connector_metadata) == set()
    for src, dst in zip(p_blocks["a"][:3], load.block_ids):
        assert torch.equal(producer.block(src), consumer.block(dst))
    stats = sched.connector.scheduler_side.tier.stats()
    assert stats["promoted"] == 3, stats
    with pykvshm.Pool.open(rack_b) as b:
        b.check(strict=True)
        assert b.stats()["pinned"] == 0
