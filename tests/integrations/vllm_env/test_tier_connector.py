"""The connector's cluster tier under vLLM's real scheduler: a prefix computed behind another pool
(rack A) is promoted from a real Mooncake Store on loopback into this engine's pool (rack B) and
loaded instead of recomputed; the request is held back (``None``, "ask again later") while its
promotion is in flight, so the scheduler itself never blocks."""

from __future__ import annotations

import time

import harness as H
import torch
from test_scheduler import produce, tokens

import pykvshm
from pykvshm.integrations.vllm import request_keys


def test_a_prefix_from_another_rack_is_promoted_and_loaded_bit_exact(model_dir, pool_name, pool_name_b,
                                                                     mooncake_store):
    rack_b, store = pool_name_b, mooncake_store
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
    # vLLM's KV-connector stats (Prometheus /metrics) carry the tier's counts, each once.
    reported = sched.connector.get_kv_connector_stats()
    assert reported is not None
    assert reported.data["tier_promoted_blocks"] == 3 and reported.data["tier_promote_misses"] == 0
    assert reported.data["tier_integrity_failures"] == 0
    again = sched.connector.get_kv_connector_stats()
    assert again is None or again.data["tier_promoted_blocks"] == 0
    with pykvshm.Pool.open(rack_b) as b:
        b.check(strict=True)
        assert b.stats()["pinned"] == 0


def test_a_request_the_store_covers_in_part_is_promoted_once_then_admitted(model_dir, pool_name, pool_name_b,
                                                                          mooncake_store):
    """The store has 2 of the prompt's 3 blocks.  The request waits for that one promotion only:
    once it has landed, the next scheduling admits the request with the 2 blocks; it is not promoted
    again at every ask (which held it back, asking the store each step, until the promotion
    happened to finish between starting it and checking it)."""
    rack_b, store = pool_name_b, mooncake_store
    prompt = tokens(100, start=500)
    produce(model_dir, {"pool": pool_name, "capacity": "64MiB"}, {"a": prompt})
    cfg = H.vllm_config(model_dir, {"pool": rack_b, "capacity": "64MiB", "tier": store.url(), "tier_wait": 30},
                        role="kv_consumer")
    sched = H.scheduler(cfg)
    req = H.request("b", prompt)
    keys = request_keys(sched.connector.scheduler_side.cfg, list(req.block_hashes), 3)
    with pykvshm.Pool.open(pool_name) as a, a.tier(store.url(), demoter=False) as ta:
        assert ta.demote_keys(keys[:2]) == 2
    tier = sched.connector.scheduler_side.tier
    sched.add_request(req)
    asks = 0
    deadline = time.monotonic() + 60
    while True:
        landed = tier.stats()["promote_misses"] > 0  # its promotion has finished (stopped at block 3)
        so = sched.schedule()
        asks += 1
        if so.scheduled_new_reqs:
            break
        assert not landed, f"held back after its promotion had landed ({asks} asks, {tier.stats()})"
        assert time.monotonic() < deadline, (asks, tier.stats())
        time.sleep(0.05)
    [new] = so.scheduled_new_reqs
    assert new.num_computed_tokens == 64  # the store's 2 blocks, loaded; the third is computed
    st = tier.stats()
    assert st["promoted"] == 2 and st["promote_misses"] == 1, st  # one promotion, stopped at the missing block
    with pykvshm.Pool.open(rack_b) as b:
        assert b.match(keys) == 2
        b.check(strict=True)
        assert b.stats()["pinned"] == 0
