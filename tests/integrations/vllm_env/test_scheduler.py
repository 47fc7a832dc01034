"""PykvshmConnector driven by vLLM's real scheduler, without a model (scheduler-level tests)."""

from __future__ import annotations

import harness as H
import numpy as np
import pytest
import torch

import pykvshm
from pykvshm.integrations.vllm import PykvshmMetadata, request_keys
from pykvshm.integrations.vllm.worker import evict_all


def tokens(n: int, start: int = 0) -> list[int]:
    return [(start + 7 * i) % 1000 + 1 for i in range(n)]


def run_to_first_token(sched, worker, invalid: set[int] | None = None) -> list:
    """Schedule and run steps until every request has sampled a token; returns the scheduler outputs."""
    outs = []
    for _ in range(20):
        so = sched.schedule()
        if so.total_num_scheduled_tokens == 0:
            break
        errors = worker.run_step(so.kv_connector_metadata)
        sched.update_from_output(so, H.model_output(so, sched, errors | (invalid or set())))
        outs.append((so, errors))
        if all(r.num_output_tokens > 0 for r in sched.requests.values()) and not sched.waiting:
            break
    return outs


def produce(model_dir: str, extra: dict, prompts: dict[str, list[int]], seed: int = 1, **cfg_kw):
    cfg = H.vllm_config(model_dir, extra, role="kv_producer", **cfg_kw)
    sched, worker = H.scheduler(cfg), H.Worker.create(cfg, seed=seed)
    for rid, p in prompts.items():
        sched.add_request(H.request(rid, p, max_tokens=1))
    outs = run_to_first_token(sched, worker)
    block_ids = {}
    for so, _ in outs:
        for r in so.scheduled_new_reqs:
            block_ids[r.req_id] = list(r.block_ids[0])
        cached = so.scheduled_cached_reqs
        for rid, new_ids in zip(cached.req_ids, cached.new_block_ids):
            if new_ids:
                block_ids[rid].extend(new_ids[0])
    return sched, worker, block_ids


def test_producer_saves_full_prompt_blocks_and_consumer_loads_them_bit_exact(model_dir, pool_name):
    extra = {"pool": pool_name, "capacity": "64MiB"}
    _, producer, p_blocks = produce(model_dir, extra, {"a": tokens(100)})
    with pykvshm.Pool.open(pool_name) as pool:
        assert pool.stats()["sealed"] == 3  # 100 tokens = 3 full blocks of 32; the partial block is not saved

    cfg = H.vllm_config(model_dir, extra, role="kv_consumer")
    sched, consumer = H.scheduler(cfg), H.Worker.create(cfg)
    sched.add_request(H.request("b", tokens(100)))
    so = sched.schedule()
    new = so.scheduled_new_reqs[0]
    assert new.num_computed_tokens == 96 and so.num_scheduled_tokens["b"] == 4
    meta = so.kv_connector_metadata
    assert isinstance(meta, PykvshmMetadata) and not meta.saves
    [load] = meta.loads
    assert load.block_ids == list(new.block_ids[0][:3])
    assert consumer.run_step(meta) == set()
    for src, dst in zip(p_blocks["a"][:3], load.block_ids):
        assert torch.equal(producer.block(src), consumer.block(dst))
    # Blocks the load did not touch stay as they were.
    assert not consumer.block(new.block_ids[0][3]).any()


def test_match_leaves_the_last_prompt_token_to_compute(model_dir, pool_name):
    extra = {"pool": pool_name, "capacity": "64MiB"}
    produce(model_dir, extra, {"a": tokens(96)})
    cfg = H.vllm_config(model_dir, extra, role="kv_consumer")
    sched = H.scheduler(cfg)
    conn = sched.connector
    # 96 tokens = 3 full blocks, all in the pool; only 2 may be granted (one token must be computed).
    assert conn.get_num_new_matched_tokens(H.request("x", tokens(96)), 0) == (64, False)
    assert conn.get_num_new_matched_tokens(H.request("y", tokens(97)), 0) == (96, False)
    # Tokens the engine already has locally are not granted again.
    assert conn.get_num_new_matched_tokens(H.request("z", tokens(97)), 64) == (32, False)
    assert conn.get_num_new_matched_tokens(H.request("w", tokens(97)), 96) == (0, False)
    # Side-effect free: asking twice changes nothing in the pool.
    with pykvshm.Pool.open(pool_name) as pool:
        before = pool.stats()["sealed"]
        conn.get_num_new_matched_tokens(H.request("v", tokens(97)), 0)
        assert pool.stats()["sealed"] == before and pool.stats()["pinned"] == 0


def test_shared_prefix_hits_only_the_shared_blocks(model_dir, pool_name):
    extra = {"pool": pool_name, "capacity": "64MiB"}
    produce(model_dir, extra, {"a": tokens(130)})
    cfg = H.vllm_config(model_dir, extra, role="kv_consumer")
    conn = H.scheduler(cfg).connector
    other = tokens(64) + tokens(66, start=500)  # shares the first 2 blocks only
    assert conn.get_num_new_matched_tokens(H.request("b", other), 0) == (64, False)
    assert conn.get_num_new_matched_tokens(H.request("c", tokens(130, start=3)), 0) == (0, False)


def test_chunked_prefill_saves_each_chunk_and_all_blocks_arrive(model_dir, pool_name):
    extra = {"pool": pool_name, "capacity": "64MiB"}
    prompt = tokens(300)  # 9 full blocks, prefilled 64 tokens per step
    _, producer, p_blocks = produce(model_dir, extra, {"a": prompt}, max_num_batched_tokens=64)
    req = H.request("k", prompt)
    cfg = H.vllm_config(model_dir, extra, role="kv_consumer")
    conn = H.scheduler(cfg).connector
    keys = request_keys(conn.cfg, list(req.block_hashes), 9)
    with pykvshm.Pool.open(pool_name) as pool:
        assert pool.match(keys) == 9
        with pool.acquire(keys) as lease:
            got = lease.copy_to(np.empty((9, *pool.spec.block_shape), dtype=pool.spec.np_dtype))
    for i in range(9):
        want = producer.block(p_blocks["a"][i])  # [layers, heads, block, 2*head_dim]: the engine's bytes
        assert torch.equal(torch.from_numpy(got[i]).reshape(want.shape), want), f"block {i}"


def test_blocks_evicted_between_match_and_load_are_recomputed(model_dir, pool_name):
    extra = {"pool": pool_name, "capacity": "64MiB"}
    produce(model_dir, extra, {"a": tokens(100)})
    cfg = H.vllm_config(model_dir, extra, role="kv_both")
    sched, worker = H.scheduler(cfg), H.Worker.create(cfg)
    sched.add_request(H.request("b", tokens(100), max_tokens=2))
    so = sched.schedule()
    assert so.scheduled_new_reqs[0].num_computed_tokens == 96
    meta = so.kv_connector_metadata
    with pykvshm.Pool.open(pool_name) as pool:
        assert evict_all(pool)  # what a concurrent engine's saves could do
        assert pool.stats()["sealed"] == 0
    errors = worker.run_step(meta)
    assert errors == set(meta.loads[0].block_ids)
    with pykvshm.Pool.open(pool_name) as pool:
        # The step's forward pass ran over unloaded blocks: nothing it computed was published.
        assert pool.stats()["sealed"] == 0
    out = sched.update_from_output(so, H.model_output(so, sched, errors))
    req = sched.requests["b"]
    assert req.num_output_tokens == 0 and req.num_computed_tokens == 0  # rolled back, token dropped
    # The next step recomputes the whole prompt (the pool has nothing to offer now) and saves it.
    so2 = sched.schedule()
    assert so2.num_scheduled_tokens["b"] == 100
    assert not so2.kv_connector_metadata.loads
    assert worker.run_step(so2.kv_connector_metadata) == set()
    sched.update_from_output(so2, H.model_output(so2, sched))
    assert sched.requests["b"].num_output_tokens == 1
    with pykvshm.Pool.open(pool_name) as pool:
        assert pool.stats()["sealed"] == 3
    del out


def test_roles_producer_never_loads_consumer_never_saves(model_dir, pool_name):
    extra = {"pool": pool_name, "capacity": "64MiB"}
    produce(model_dir, extra, {"a": tokens(100)})
    prod = H.scheduler(H.vllm_config(model_dir, extra, role="kv_producer")).connector
    assert prod.get_num_new_matched_tokens(H.request("b", tokens(100)), 0) == (0, False)
    cfg = H.vllm_config(model_dir, extra, role="kv_consumer")
    sched, worker = H.scheduler(cfg), H.Worker.create(cfg)
    sched.add_request(H.request("c", tokens(200, start=9)))
    so = sched.schedule()
    assert not so.kv_connector_metadata.saves and not so.kv_connector_metadata.loads
    worker.run_step(so.kv_connector_metadata)
    with pykvshm.Pool.open(pool_name) as pool:
        assert pool.stats()["sealed"] == 3


def test_both_role_saves_locally_cached_blocks_the_pool_lost(model_dir, pool_name):
    extra = {"pool": pool_name, "capacity": "64MiB"}
    cfg = H.vllm_config(model_dir, extra, role="kv_both")
    sched, worker = H.scheduler(cfg), H.Worker.create(cfg, seed=3)
    sched.add_request(H.request("a", tokens(100), max_tokens=1))
    run_to_first_token(sched, worker)
    with pykvshm.Pool.open(pool_name) as pool:
        assert pool.stats()["sealed"] == 3
        assert evict_all(pool)
    # Same prefix again: the engine's own prefix cache supplies it; the pool gets it back.
    sched.add_request(H.request("b", tokens(100) + tokens(40, start=77), max_tokens=1))
    so = sched.schedule()
    assert so.scheduled_new_reqs[0].num_computed_tokens == 96  # local hit, not the pool's
    assert not so.kv_connector_metadata.loads
    worker.run_step(so.kv_connector_metadata)
    with pykvshm.Pool.open(pool_name) as pool:
        assert pool.stats()["sealed"] == 4  # 3 re-saved from the local cache + 1 newly computed


def test_reset_cache_empties_the_shared_pool(model_dir, pool_name):
    extra = {"pool": pool_name, "capacity": "64MiB"}
    produce(model_dir, extra, {"a": tokens(100)})
    sched = H.scheduler(H.vllm_config(model_dir, extra, role="kv_consumer"))
    assert sched.reset_connector_cache() is True
    assert sched.connector.get_num_new_matched_tokens(H.request("b", tokens(100)), 0) == (0, False)


def test_configuration_errors_are_clear(model_dir, pool_name):
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from pykvshm.integrations.vllm import PykvshmConnector

    def build(extra, num_blocks=128, **kw):
        cfg = H.vllm_config(model_dir, extra, **kw)
        return PykvshmConnector(cfg, KVConnectorRole.SCHEDULER, H.kv_cache_config(num_blocks))

    with pytest.raises(ValueError, match="unknown kv_connector_extra_config keys.*'capcity'"):
        build({"pool": pool_name, "capcity": "1GiB"})
    with pytest.raises(ValueError, match="'create' must be one of"):
        build({"pool": pool_name, "create": "maybe"})
    with pytest.raises(pykvshm.errors.PoolNotFoundError):
        build({"pool": pool_name, "create": "open"})
    with pykvshm.Pool.create(pool_name, pykvshm.KVSpec(num_layers=2, num_kv_heads=2, head_dim=64, block_tokens=32),
                             "16MiB"):
        with pytest.raises(pykvshm.errors.GeometryMismatchError):
            build({"pool": pool_name})


def test_worker_refuses_kv_caches_of_another_geometry(model_dir, pool_name):
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from pykvshm.integrations.vllm import PykvshmConnector

    cfg = H.vllm_config(model_dir, {"pool": pool_name, "capacity": "64MiB"})
    conn = PykvshmConnector(cfg, KVConnectorRole.WORKER, H.kv_cache_config(16))
    names = [f"model.layers.{i}.self_attn.attn" for i in range(H.LAYERS)]
    with pytest.raises(pykvshm.errors.GeometryMismatchError, match="layers"):
        conn.register_kv_caches({n: torch.zeros(16, 2, 32, 128) for n in names[:3]})
    with pytest.raises(pykvshm.errors.GeometryMismatchError, match="bytes"):
        conn.register_kv_caches({n: torch.zeros(16, 2, 32, 64) for n in names})
    with pytest.raises(pykvshm.errors.GeometryMismatchError, match="block dimension"):
        conn.register_kv_caches({n: torch.zeros(17, 2, 32, 128) for n in names})
    conn.shutdown()
