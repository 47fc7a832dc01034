"""The connector's CUDA data path (`PagedGather`: one row gather per layer between a device view of
the pool and the paged KV cache), run here over CPU tensors: the same index arithmetic and torch
operations, checked byte for byte against the copy-engine path (no GPU on this machine)."""

from __future__ import annotations

import time

import harness as H
import pytest
import torch
from test_scheduler import tokens

import pykvshm


def gather_worker(cfg, seed=None) -> H.Worker:
    w = H.Worker.create(cfg, seed=seed)
    w.connector.worker_side._use_paged_gather()
    return w


def schedule_all(sched, worker, max_steps=400):
    """Run steps until every request sampled its first token; returns the block ids per request."""
    ids = {}
    for _ in range(max_steps):
        so = sched.schedule()
        for r in so.scheduled_new_reqs:
            ids[r.req_id] = list(r.block_ids[0])
        errors = worker.run_step(so.kv_connector_metadata)
        assert errors == set()
        sched.update_from_output(so, H.model_output(so, sched, finished_recving=worker.finished))
        if all(r.num_output_tokens > 0 for r in sched.requests.values()):  # max_tokens=1 ones are gone
            return ids
        if so.total_num_scheduled_tokens == 0:
            time.sleep(0.005)  # only asynchronous loads in flight (slow on a loaded machine)
    raise AssertionError("requests never finished their prefill")


@pytest.mark.parametrize("async_load", [False, True])
def test_gather_saves_and_loads_are_bit_exact_with_the_copy_engine_path(model_dir, pool_name, async_load):
    extra = {"pool": pool_name, "capacity": "64MiB", "async_load_bytes": 0 if async_load else None}
    prompts = {"a": tokens(100), "b": tokens(64, start=11)}
    # A producer saving through the gather path.
    pcfg = H.vllm_config(model_dir, extra, role="kv_producer")
    psched, producer = H.scheduler(pcfg), gather_worker(pcfg, seed=3)
    for rid, p in prompts.items():
        psched.add_request(H.request(rid, p, max_tokens=1))
    p_ids = schedule_all(psched, producer)
    with pykvshm.Pool.open(pool_name) as pool:
        assert pool.stats()["sealed"] == 3 + 2
    # Two consumers on the same pool: the gather path and the copy-engine path.
    got = {}
    for name, make in (("gather", gather_worker), ("engine", H.Worker.create)):
        ccfg = H.vllm_config(model_dir, extra, role="kv_consumer")
        csched, consumer = H.scheduler(ccfg), make(ccfg)
        for rid, p in prompts.items():
            csched.add_request(H.request(rid, p))
        c_ids = schedule_all(csched, consumer)
        # Granted: every full block but the one holding the last prompt token.
        got[name] = {rid: [consumer.block(b) for b in c_ids[rid][:(len(p) - 1) // H.BLOCK]] for rid, p in prompts.items()}
        assert [len(v) for v in got[name].values()] == [3, 1]
        for rid, blocks in got[name].items():
            for j, blk in enumerate(blocks):
                assert torch.equal(blk, producer.block(p_ids[rid][j])), f"{name}: {rid} block {j}"
    with pykvshm.Pool.open(pool_name) as pool:
        assert pool.stats()["pinned"] == 0
        pool.check()


def test_gather_plan_rows_cover_each_chunk_once(model_dir, pool_name):
    cfg = H.vllm_config(model_dir, {"pool": pool_name, "capacity": "64MiB"}, role="kv_both")
    w = gather_worker(cfg).connector.worker_side
    g = w._gather
    with pykvshm.Pool.open(pool_name) as pool:
        with pool.writer(pykvshm.block_keys(tokens(96), H.BLOCK, salt=b"plan")) as wr:
            addrs = [int(v.ctypes.data) for v in wr.views()]
            wr.abort()
    src, dst, unit = g.plan(addrs, [5, 1, 9])
    outer, nblocks, inner = w._chunks
    assert unit > 1 and inner % unit == 0
    assert len(src) == len(dst) == 3 * outer * inner // unit
    assert len(set(dst.tolist())) == len(dst)  # no engine row written twice
    assert len(set(src.tolist())) == len(src)
    kv_rows = nblocks * outer * inner // unit
    assert int(dst.max()) < kv_rows and int(src.max()) * unit < g.pool_t.numel()
