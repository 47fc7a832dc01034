"""Asynchronous loads through vLLM's WAITING_FOR_REMOTE_KVS path, under vLLM's real scheduler.

A load of at least ``async_load_bytes`` is granted as asynchronous: vLLM parks the request with
its blocks allocated, the worker copies on the pool handle's copy engine while other requests
keep running, and reports the request through ``get_finished`` once every layer has landed.
"""

from __future__ import annotations

import time

import harness as H
import pytest
import torch
from test_scheduler import produce, tokens
from vllm.v1.request import RequestStatus

import pykvshm
from pykvshm.integrations.vllm.worker import evict_all

BLOCK_BYTES = H.LAYERS * 2 * H.KV_HEADS * H.BLOCK * H.HEAD_DIM * 4  # float32


def step(sched, worker):
    """One engine step: schedule, run it on the worker, feed back errors and finished loads."""
    so = sched.schedule()
    errors = worker.run_step(so.kv_connector_metadata)
    sched.update_from_output(so, H.model_output(so, sched, errors, finished_recving=worker.finished))
    return so, errors, worker.finished


def until_loaded(sched, worker, req_id: str, timeout: float = 30.0) -> list:
    """Step until the worker reports ``req_id``'s asynchronous load finished; returns the steps."""
    steps = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps.append(step(sched, worker))
        if req_id in steps[-1][2]:
            return steps
        time.sleep(0.002)
    raise AssertionError(f"{req_id}'s asynchronous load never reported finished")


def test_threshold_decides_which_loads_are_asynchronous(model_dir, pool_name):
    extra = {"pool": pool_name, "capacity": "64MiB", "async_load_bytes": 4 * BLOCK_BYTES}
    produce(model_dir, extra, {"a": tokens(200)})
    conn = H.scheduler(H.vllm_config(model_dir, extra, role="kv_consumer")).connector
    assert conn.get_num_new_matched_tokens(H.request("x", tokens(97)), 0) == (96, False)   # 3 blocks
    assert conn.get_num_new_matched_tokens(H.request("y", tokens(129)), 0) == (128, True)  # 4 blocks
    assert conn.get_num_new_matched_tokens(H.request("z", tokens(129)), 32) == (96, False)  # 3 of them new
    never = {**extra, "async_load_bytes": None}
    conn = H.scheduler(H.vllm_config(model_dir, never, role="kv_consumer")).connector
    assert conn.get_num_new_matched_tokens(H.request("y", tokens(200)), 0) == (192, False)


@pytest.mark.parametrize("bad", [True, -1, "lots", "0MiB"])
def test_async_load_bytes_must_be_a_size(model_dir, pool_name, bad):
    with pytest.raises(ValueError, match="async_load_bytes"):
        H.scheduler(H.vllm_config(model_dir, {"pool": pool_name, "capacity": "64MiB", "async_load_bytes": bad}))


def test_async_load_lands_bit_exact_while_another_request_keeps_running(model_dir, pool_name):
    extra = {"pool": pool_name, "capacity": "64MiB", "async_load_bytes": 0}
    _, producer, p_blocks = produce(model_dir, extra, {"a": tokens(100)})
    cfg = H.vllm_config(model_dir, extra, role="kv_consumer")
    sched, consumer = H.scheduler(cfg), H.Worker.create(cfg)
    # A request with nothing in the pool is decoding when the long load arrives.
    sched.add_request(H.request("r", tokens(40, start=900), max_tokens=50))
    step(sched, consumer)
    sched.add_request(H.request("b", tokens(100)))
    so, errors, finished = step(sched, consumer)
    assert sched.requests["b"].status in (RequestStatus.WAITING_FOR_REMOTE_KVS, RequestStatus.WAITING)
    assert "b" not in so.num_scheduled_tokens and so.num_scheduled_tokens.get("r") == 1  # r decodes on
    meta = so.kv_connector_metadata
    assert not meta.loads and [t.req_id for t in meta.async_loads] == ["b"]
    [load] = meta.async_loads
    assert len(load.block_ids) == 3 and errors == set()
    if "b" not in finished:
        until_loaded(sched, consumer, "b")
    so = sched.schedule()
    [new] = [r for r in so.scheduled_new_reqs if r.req_id == "b"]
    assert new.num_computed_tokens == 96 and so.num_scheduled_tokens["b"] == 4
    assert list(new.block_ids[0][:3]) == load.block_ids
    assert not so.kv_connector_metadata.loads and not so.kv_connector_metadata.async_loads  # loaded once
    for src, dst in zip(p_blocks["a"][:3], load.block_ids):
        assert torch.equal(producer.block(src), consumer.block(dst))
    with pykvshm.Pool.open(pool_name) as pool:
        assert pool.stats()["pinned"] == 0  # pins dropped once the load was reported


def test_async_load_under_an_eviction_race_is_recomputed(model_dir, pool_name):
    extra = {"pool": pool_name, "capacity": "64MiB", "async_load_bytes": 0}
    produce(model_dir, extra, {"a": tokens(100)})
    cfg = H.vllm_config(model_dir, extra, role="kv_both")
    sched, worker = H.scheduler(cfg), H.Worker.create(cfg)
    sched.add_request(H.request("b", tokens(100), max_tokens=2))
    so = sched.schedule()
    [load] = so.kv_connector_metadata.async_loads
    with pykvshm.Pool.open(pool_name) as pool:
        assert evict_all(pool)  # a concurrent engine's saves between the match and the load
    errors = worker.run_step(so.kv_connector_metadata)
    # Reported finished in the same pass as its errors, as vLLM requires.
    assert errors == set(load.block_ids) and worker.finished == {"b"}
    sched.update_from_output(so, H.model_output(so, sched, errors, finished_recving=worker.finished))
    so2 = sched.schedule()
    assert so2.num_scheduled_tokens["b"] == 100  # everything recomputed
    assert not so2.kv_connector_metadata.loads and not so2.kv_connector_metadata.async_loads
    assert worker.run_step(so2.kv_connector_metadata) == set()
    sched.update_from_output(so2, H.model_output(so2, sched))
    assert sched.requests["b"].num_output_tokens == 1
    with pykvshm.Pool.open(pool_name) as pool:
        assert pool.stats()["sealed"] == 3 and pool.stats()["pinned"] == 0  # the recomputed blocks saved


def test_request_aborted_during_its_load_keeps_its_blocks_until_the_load_ends(model_dir, pool_name):
    extra = {"pool": pool_name, "capacity": "64MiB", "async_load_bytes": 0}
    produce(model_dir, extra, {"a": tokens(100)})
    cfg = H.vllm_config(model_dir, extra, role="kv_consumer")
    sched, worker = H.scheduler(cfg), H.Worker.create(cfg)
    free_before = sched.kv_cache_manager.block_pool.get_num_free_blocks()
    sched.add_request(H.request("b", tokens(100)))
    so = sched.schedule()
    assert so.kv_connector_metadata.async_loads
    sched.finish_requests("b", RequestStatus.FINISHED_ABORTED)
    # The load is still to copy into b's blocks: vLLM must not hand them to anyone yet, and gets
    # them back only when the worker reports the aborted request's load finished.
    assert sched.kv_cache_manager.block_pool.get_num_free_blocks() < free_before
    worker.run_step(so.kv_connector_metadata)
    sched.update_from_output(so, H.model_output(so, sched, finished_recving=worker.finished))
    if "b" not in worker.finished:
        until_loaded(sched, worker, "b")
    assert "b" not in sched.requests
    assert sched.kv_cache_manager.block_pool.get_num_free_blocks() == free_before
    with pykvshm.Pool.open(pool_name) as pool:
        assert pool.stats()["pinned"] == 0
