"""PykvshmConnector for production, under vLLM's real scheduler (no model): the KV-connector stats
vLLM collects, blocks generated during decode, and tensor parallelism (keys per rank, a block
present only when every rank's shard is)."""

from __future__ import annotations

from unittest import mock

import harness as H
import numpy as np
import pytest
import torch

import pykvshm
from pykvshm.integrations.vllm import request_keys
from pykvshm.integrations.vllm.stats import COUNTERS, PykvshmStats


def tokens(n: int, start: int = 0) -> list[int]:
    return [(start + 7 * i) % 1000 + 1 for i in range(n)]


def run_until_done(sched, workers, max_steps: int = 400) -> list:
    """Run every scheduled step through every worker (one per tensor-parallel rank) until no
    request is left; returns each step's scheduler output and the EngineCoreOutputs."""
    from vllm.v1.outputs import KVConnectorOutput

    steps = []
    for _ in range(max_steps):
        so = sched.schedule()
        if so.total_num_scheduled_tokens == 0:
            break
        errors: set[int] = set()
        stats = None
        for w in workers:
            errors |= w.run_step(so.kv_connector_metadata)
            s = w.connector.get_kv_connector_stats()  # what vLLM's model runner sends with each step
            if s is not None:
                stats = s if stats is None else stats.aggregate(s)
        out = H.model_output(so, sched, errors)
        out.kv_connector_output = KVConnectorOutput(invalid_block_ids=errors, kv_connector_stats=stats)
        steps.append((so, sched.update_from_output(so, out)))
        if not sched.requests:
            break
    return steps


def block_ids_of(steps, req_id: str) -> list[int]:
    ids: list[int] = []
    for so, _ in steps:
        for r in so.scheduled_new_reqs:
            if r.req_id == req_id:
                ids = list(r.block_ids[0])
        cached = so.scheduled_cached_reqs
        for rid, new_ids in zip(cached.req_ids, cached.new_block_ids):
            if rid == req_id and new_ids:
                ids.extend(new_ids[0])
    return ids


def reported(steps) -> dict[str, float]:
    """The connector counters vLLM's scheduler put into SchedulerStats, summed over steps."""
    total = {k: 0.0 for k in COUNTERS}
    for _, outs in steps:
        for eco in outs.values():
            st = eco.scheduler_stats
            if st is not None and st.kv_connector_stats:
                for k, v in st.kv_connector_stats.items():
                    total[k] += v
    return total


# ------------------------------------------------------------------ metrics


def test_stats_reach_vllms_scheduler_stats_and_pool_counts_bytes_out(model_dir, pool_name):
    extra = {"pool": pool_name, "capacity": "64MiB"}
    prod_cfg = H.vllm_config(model_dir, extra, role="kv_producer")
    psched, pworker = H.scheduler(prod_cfg), H.Worker.create(prod_cfg, seed=1)
    psched.add_request(H.request("a", tokens(100), max_tokens=1))
    p = reported(run_until_done(psched, [pworker]))
    with pykvshm.Pool.open(pool_name) as pool:
        block_bytes = pool.spec.block_bytes
        assert pool.stats()["sealed"] == 3
        out_before = pool.stats()["bytes_out"]
    assert p["save_blocks"] == 3 and p["save_bytes"] == 3 * block_bytes and p["save_seconds"] > 0
    assert p["lookups"] == 0 and p["load_blocks"] == 0  # a producer never looks up

    cfg = H.vllm_config(model_dir, extra, role="kv_consumer")
    sched, worker = H.scheduler(cfg), H.Worker.create(cfg)
    sched.add_request(H.request("b", tokens(100), max_tokens=2))
    sched.add_request(H.request("c", tokens(70, start=400), max_tokens=2))  # a miss
    c = reported(run_until_done(sched, [worker]))
    assert c["lookups"] == 2
    assert c["hit_blocks"] == 3 and c["hit_tokens"] == 96
    assert c["load_reqs"] == 1 and c["load_blocks"] == 3 and c["load_failed_blocks"] == 0
    assert c["load_bytes"] == 3 * block_bytes and c["load_seconds"] > 0
    assert c["save_blocks"] == 0
    with pykvshm.Pool.open(pool_name) as pool:
        # Loads gather through Lease.read_spans, which the pool counts like copy_to.
        assert pool.stats()["bytes_out"] - out_before == 3 * block_bytes
    # The same connector class rebuilds the dict the front end receives, and sums it.
    s = PykvshmStats(dict(c)).aggregate(PykvshmStats({"load_blocks": 2, "bogus": 5}))
    assert s.data["load_blocks"] == 5 and "bogus" not in s.data and not s.is_empty()
    assert PykvshmStats({}).is_empty()


def test_prometheus_counters_follow_the_stats(model_dir, pool_name):
    from prometheus_client import REGISTRY
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorProm

    cfg = H.vllm_config(model_dir, {"pool": pool_name, "capacity": "64MiB"})
    prom = KVConnectorProm(cfg, ["model_name", "engine"], {0: ["tiny", "0"]})
    assert prom.prom_metrics is not None
    prom.observe(PykvshmStats({"load_blocks": 3, "load_bytes": 3 << 20, "load_failed_blocks": 1}).to_dict(), 0)
    prom.observe(PykvshmStats({"load_blocks": 2}).to_dict(), 0)
    labels = {"model_name": "tiny", "engine": "0"}
    assert REGISTRY.get_sample_value("vllm:pykvshm_load_blocks_total", labels) == 5
    assert REGISTRY.get_sample_value("vllm:pykvshm_load_bytes_total", labels) == 3 << 20
    assert REGISTRY.get_sample_value("vllm:pykvshm_load_failed_blocks_total", labels) == 1
    assert REGISTRY.get_sample_value("vllm:pykvshm_hit_tokens_total", labels) == 0


# ------------------------------------------------------------------ generated blocks


@pytest.mark.parametrize("save_generated", [True, False])
def test_blocks_filled_during_decode_are_saved_and_hit_by_the_next_turn(model_dir, pool_name, save_generated):
    extra = {"pool": pool_name, "capacity": "64MiB", "save_generated": save_generated}
    cfg = H.vllm_config(model_dir, extra, role="kv_both")
    sched, worker = H.scheduler(cfg), H.Worker.create(cfg, seed=5)
    prompt = tokens(40)
    sched.add_request(H.request("turn1", prompt, max_tokens=60))
    steps = run_until_done(sched, [worker])
    ids = block_ids_of(steps, "turn1")
    # 40 prompt + 60 generated tokens; the last generated token never gets KV: 99 tokens of KV,
    # 3 full blocks, of which only block 0 lies in the prompt.
    n_full = 3 if save_generated else 1
    assert reported(steps)["save_blocks"] == n_full
    with pykvshm.Pool.open(pool_name) as pool:
        assert pool.stats()["sealed"] == n_full

    # Turn 2 on another instance: the first turn's prompt and answer, then new text.
    history = prompt + [7] * 60  # the harness samples token 7
    cfg2 = H.vllm_config(model_dir, extra, role="kv_both")
    sched2, worker2 = H.scheduler(cfg2), H.Worker.create(cfg2)
    sched2.add_request(H.request("turn2", history + tokens(30, start=900), max_tokens=1))
    so = sched2.schedule()
    assert so.scheduled_new_reqs[0].num_computed_tokens == n_full * H.BLOCK
    [load] = so.kv_connector_metadata.loads
    assert worker2.run_step(so.kv_connector_metadata) == set()
    for src, dst in zip(ids[:n_full], load.block_ids):
        assert torch.equal(worker.block(src), worker2.block(dst))


# ------------------------------------------------------------------ tensor parallelism


def tp_config(model_dir: str, extra: dict, tp: int, role: str = "kv_both"):
    cfg = H.vllm_config(model_dir, extra, role=role)
    cfg.parallel_config.tensor_parallel_size = tp
    return cfg


def tp_worker(cfg, rank: int, seed: int | None = None) -> H.Worker:
    with mock.patch("pykvshm.integrations.vllm.config._tp_rank", return_value=rank):
        w = H.Worker.create(cfg, seed=seed)
    assert w.connector.cfg.tp_rank == rank
    return w


def test_tp1_keys_are_unchanged_and_each_tp_rank_has_its_own(model_dir, pool_name):
    from pykvshm.integrations.engine_keys import engine_key
    from pykvshm.integrations.vllm import config as C

    extra = {"pool": pool_name, "capacity": "64MiB"}
    kvc = H.kv_cache_config(128)
    one = C.ConnectorConfig.from_vllm(H.vllm_config(model_dir, extra), kvc, worker=True)
    spec, names = C.spec_from_kv_cache_config(kvc)
    # TP=1: the salt is the one every earlier release computed (nothing about ranks in it).
    assert one.rank_salts == (one.salt,) and one.salt == C._salt(H.vllm_config(model_dir, extra), spec, names, "")
    two = C.ConnectorConfig.from_vllm(tp_config(model_dir, extra, 2), kvc)
    assert two.tp_size == 2 and two.tp_rank == 0 and two.salt == two.rank_salts[0]
    assert len({one.salt, *two.rank_salts}) == 3
    req = H.request("k", tokens(70))
    h = list(req.block_hashes)
    assert request_keys(one, h, 2) == [engine_key(one.salt, bytes(x)) for x in h[:2]]
    assert request_keys(two, h, 2, rank=1) == [engine_key(two.rank_salts[1], bytes(x)) for x in h[:2]]
    with pytest.raises(NotImplementedError, match="pipeline_parallel_size"):
        cfg = H.vllm_config(model_dir, extra)
        cfg.parallel_config.pipeline_parallel_size = 2
        C.ConnectorConfig.from_vllm(cfg, kvc)


def test_tp2_each_rank_saves_its_shard_and_a_hit_needs_every_rank(model_dir, pool_name):
    extra = {"pool": pool_name, "capacity": "64MiB"}
    cfg = tp_config(model_dir, extra, 2, role="kv_producer")
    sched = H.scheduler(cfg)
    ranks = [tp_worker(cfg, 0, seed=11), tp_worker(cfg, 1, seed=12)]
    sched.add_request(H.request("a", tokens(100), max_tokens=1))
    steps = run_until_done(sched, ranks)
    ids = block_ids_of(steps, "a")
    st = reported(steps)
    with pykvshm.Pool.open(pool_name) as pool:
        assert pool.stats()["sealed"] == 2 * 3  # one shard per rank and block
        bb = pool.spec.block_bytes
    assert st["save_blocks"] == 3 and st["save_bytes"] == 2 * 3 * bb  # blocks once, bytes of both ranks

    # A consumer at TP=2: each rank loads its own shard, bit-exact.
    ccfg = tp_config(model_dir, extra, 2, role="kv_consumer")
    csched = H.scheduler(ccfg)
    cranks = [tp_worker(ccfg, 0), tp_worker(ccfg, 1)]
    csched.add_request(H.request("b", tokens(100), max_tokens=1))
    so = csched.schedule()
    assert so.scheduled_new_reqs[0].num_computed_tokens == 96
    [load] = so.kv_connector_metadata.loads
    for src, dst in zip(ranks, cranks):
        assert dst.run_step(so.kv_connector_metadata) == set()
        for s_id, d_id in zip(ids[:3], load.block_ids):
            assert torch.equal(src.block(s_id), dst.block(d_id))
    assert not torch.equal(cranks[0].block(load.block_ids[0]), cranks[1].block(load.block_ids[0]))

    # A prompt of which rank 0 holds 3 blocks but rank 1 only the first 2: the match is 2 blocks.
    req = H.request("x", tokens(100, start=300))
    keys0 = request_keys(csched.connector.cfg, list(req.block_hashes), 3, rank=0)
    keys1 = request_keys(csched.connector.cfg, list(req.block_hashes), 3, rank=1)
    with pykvshm.Pool.open(pool_name) as pool:
        data = np.zeros((3, *pool.spec.block_shape), dtype=pool.spec.np_dtype)
        assert pool.publish(keys0, data) == 3
        conn = csched.connector
        assert conn.get_num_new_matched_tokens(req, 0) == (0, False)  # rank 1 has nothing
        assert pool.publish(keys1[:2], data[:2]) == 2
        assert conn.get_num_new_matched_tokens(req, 0) == (64, False)
    # A TP=1 engine on the same pool shares none of these blocks (other keys, other geometry).
    one = H.scheduler(H.vllm_config(model_dir, extra, role="kv_consumer")).connector
    assert one.get_num_new_matched_tokens(H.request("y", tokens(100)), 0) == (0, False)


def test_save_generated_must_be_a_boolean(model_dir, pool_name):
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from pykvshm.integrations.vllm import PykvshmConnector

    cfg = H.vllm_config(model_dir, {"pool": pool_name, "capacity": "64MiB", "save_generated": "yes"})
    with pytest.raises(ValueError, match="'save_generated' must be true or false"):
        PykvshmConnector(cfg, KVConnectorRole.SCHEDULER, H.kv_cache_config(128))
