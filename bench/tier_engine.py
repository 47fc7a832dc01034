"""The cluster tier in real vLLM engines: time to first token of a prompt computed behind another
pool, promoted from Mooncake Store and loaded, against recomputing it.

Opt-in (three vLLM engines, ~3 minutes here); needs the vLLM environment (scripts/setup_vllm_env.sh,
or PYKVSHM_VLLM_PYTHON) and Mooncake in both environments (``pip install 'pykvshm[tier]'``).

    python bench/tier_engine.py                        # 3 runs of 4 prompts of 1000 tokens
    python bench/tier_engine.py --runs 5 --prompts 4 --tokens 1000 --layers 8

A Mooncake Store (master + one storage process) runs on loopback. Engine A (rack A: pool A, the
tier) computes every prompt of every run, and its pool's blocks are demoted to the store. Then,
one request at a time (``max_tokens=1``, so the request's time is its TTFT):

- **engine B** (rack B: pool B, the same store, ``tier_wait``): each run's prompts, which it has
  never seen: each is promoted from the store into pool B and loaded (``tier hit``); interleaved
  with them, prompts of the same length that nobody computed (``tier miss``: the store is asked,
  then the prompt is recomputed);
- **engine C** (pool C, the same connector without a tier): the same prompts, recomputed.

Each engine first serves one warm-up prompt. Every request's tokens are checked: B's hits must
be loaded (``num_cached_tokens`` = the prompt's full blocks), C's and B's misses computed, and B
and C must sample the same first token. A run's figure is the median over its prompts; the report
gives the median and min..max over runs, and the ratios recompute / tier hit.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "integrations"))
import common  # noqa: E402
import vllm_support as V  # noqa: E402  (the real-engine harness of the vLLM tests)

import pykvshm  # noqa: E402
from pykvshm.benchmarks import common as pcommon  # noqa: E402
from pykvshm.testing.mooncake import MooncakeCluster, mooncake_available  # noqa: E402


def _kvt(pool: str, **extra: Any) -> dict[str, Any]:
    return {
        "kv_connector": "PykvshmConnector",
        "kv_connector_module_path": "pykvshm.integrations.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"pool": pool, "capacity": "256MiB", **extra},
    }


def _one_by_one(prompts: list[list[int]]) -> list[dict[str, Any]]:
    return [{"prompts": [p], "max_tokens": 1} for p in prompts]


def measure(runs: int, n_prompts: int, tokens: int, *, layers: int, hidden: int, seed: int = 16,
            workdir: str) -> dict[str, Any]:
    bs = V.BLOCK_SIZE
    full = (tokens - 1) // bs * bs
    rng = random.Random(seed)
    vocab = V.TINY_LLAMA["vocab_size"]

    def prompt() -> list[int]:
        return [rng.randrange(1, vocab) for _ in range(tokens)]

    hits = [[prompt() for _ in range(n_prompts)] for _ in range(runs)]
    misses = [[prompt() for _ in range(n_prompts)] for _ in range(runs)]
    warm_b, warm_c = prompt(), prompt()
    overrides = {"num_hidden_layers": layers, "hidden_size": hidden, "intermediate_size": 2 * hidden}
    model = V.write_tiny_llama(os.path.join(workdir, "model"), **overrides)
    max_len = max(1024, tokens + 16)
    pool_a, pool_b, pool_c = (pcommon.unique_pool_name(t) for t in ("tier-a", "tier-b", "tier-c"))
    report: dict[str, Any] = {"runs": runs, "prompts": n_prompts, "tokens": tokens, "loaded_tokens": full,
                              "model": {**V.TINY_LLAMA, **overrides}, "load_avg_before": os.getloadavg()}
    with MooncakeCluster(os.path.join(workdir, "mooncake")) as mc:
        url = mc.url()
        try:
            # Rack A computes every run's tier prompts; its pool's blocks are demoted to the store.
            V.run_engine(model, [{"prompts": [p for run in hits for p in run], "max_tokens": 1}],
                         _kvt(pool_a, tier=url), max_model_len=max_len, timeout=900)
            with pykvshm.Pool.open(pool_a) as pa, pa.tier(url, demoter=False) as ta:
                sealed = pa.stats()["sealed"]
                ta.demote(pa.stats()["total"])
                if ta.stats()["demoted"] != sealed:
                    raise RuntimeError(f"demoted {ta.stats()} of {sealed} sealed blocks")
                report["kv_bytes_per_prompt"] = tokens // bs * pa.spec.block_bytes
            # Engine B: per run, its hits and misses interleaved, one request at a time.
            order = [("hit", r, i) if k == 0 else ("miss", r, i)
                     for r in range(runs) for i in range(n_prompts) for k in (0, 1)]
            batches = _one_by_one([warm_b]) + _one_by_one(
                [hits[r][i] if kind == "hit" else misses[r][i] for kind, r, i in order])
            t0 = time.time()
            b = V.run_engine(model, batches, _kvt(pool_b, tier=url, tier_wait=30), max_model_len=max_len,
                             metrics=True, timeout=900)
            # Engine C: the same tier prompts, no tier: recomputed.
            c = V.run_engine(model, _one_by_one([warm_c]) + _one_by_one([p for run in hits for p in run]),
                             _kvt(pool_c), max_model_len=max_len, timeout=900)
            report["wall_s"] = round(time.time() - t0, 1)
        finally:
            report["load_avg_after"] = os.getloadavg()
            for name in (pool_a, pool_b, pool_c):
                try:
                    pykvshm.Pool.destroy(name)
                except pykvshm.errors.PoolNotFoundError:
                    pass
    b_hit: list[list[float]] = [[] for _ in range(runs)]
    b_miss: list[list[float]] = [[] for _ in range(runs)]
    first_tokens: dict[tuple[int, int], int] = {}
    for (kind, r, i), out in zip(order, b["batches"][1:]):
        want = full if kind == "hit" else 0
        if out["num_cached_tokens"] != [want]:
            raise RuntimeError(f"engine B, {kind} prompt {r}.{i}: {out['num_cached_tokens']} cached, expected {want}")
        (b_hit if kind == "hit" else b_miss)[r].append(out["s"])
        if kind == "hit":
            first_tokens[(r, i)] = out["tokens"][0][0]
    c_s: list[list[float]] = [[] for _ in range(runs)]
    for k, out in enumerate(c["batches"][1:]):
        r, i = divmod(k, n_prompts)
        if out["num_cached_tokens"] != [0]:
            raise RuntimeError(f"engine C, prompt {r}.{i}: {out['num_cached_tokens']} cached, expected 0")
        if out["tokens"][0][0] != first_tokens[(r, i)]:
            raise RuntimeError(f"prompt {r}.{i}: engine B sampled {first_tokens[(r, i)]}, engine C {out['tokens'][0][0]}")
        c_s[r].append(out["s"])
    m = b["batches"][-1]["metrics"]
    promoted = m["vllm:pykvshm_tier_promoted_blocks_total"]
    if promoted != runs * n_prompts * full // bs:
        raise RuntimeError(f"engine B promoted {promoted} blocks, expected {runs * n_prompts * full // bs}")
    per_run = {name: [statistics.median(x) for x in xs] for name, xs in
               (("tier_hit", b_hit), ("tier_miss", b_miss), ("no_tier", c_s))}
    report["ttft_s"] = {name: pcommon.summary(v) for name, v in per_run.items()}
    report["ttft_s_per_run"] = per_run
    report["ttft_s_every_request"] = {"tier_hit": b_hit, "tier_miss": b_miss, "no_tier": c_s}
    report["engine_b_counters"] = m
    report["ratio_no_tier_over_hit"] = [c / h for c, h in zip(per_run["no_tier"], per_run["tier_hit"])]
    report["ratio_miss_over_hit"] = [mi / h for mi, h in zip(per_run["tier_miss"], per_run["tier_hit"])]
    report["promoted_blocks"] = promoted
    report["engine_start_s"] = {"B": b["engine_start_s"], "C": c["engine_start_s"]}
    return report


def table(rep: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    def cell(s: dict[str, Any]) -> str:
        return f"{pcommon.fmt_time(s['median'])} ({pcommon.fmt_time(s['min'])}..{pcommon.fmt_time(s['max'])})"

    def rcell(xs: list[float]) -> str:
        return f"{pcommon.fmt_ratio(statistics.median(xs))} ({min(xs):.2f}..{max(xs):.2f})"

    t = rep["ttft_s"]
    header = ["prompt", "KV per prompt", "TTFT tier hit (B)", "TTFT tier miss (B)", "TTFT no tier (C)",
              "no tier / hit", "miss / hit"]
    row = [f"{rep['tokens']} tokens ({rep['loaded_tokens']} loaded)", pcommon.fmt_bytes(rep["kv_bytes_per_prompt"]),
           cell(t["tier_hit"]), cell(t["tier_miss"]), cell(t["no_tier"]),
           rcell(rep["ratio_no_tier_over_hit"]), rcell(rep["ratio_miss_over_hit"])]
    return header, [row]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per run (one request at a time)")
    ap.add_argument("--tokens", type=int, default=1000, help="tokens per prompt")
    ap.add_argument("--layers", type=int, default=V.TINY_LLAMA["num_hidden_layers"])
    ap.add_argument("--hidden", type=int, default=V.TINY_LLAMA["hidden_size"])
    ap.add_argument("--out-dir", default=common.RESULTS_DIR)
    args = ap.parse_args(argv)
    if args.runs < 3:
        ap.error("--runs must be at least 3 (median and spread)")
    if args.tokens <= V.BLOCK_SIZE:
        ap.error(f"--tokens must exceed one block ({V.BLOCK_SIZE} tokens)")
    ok, why = mooncake_available()
    if not ok:
        print(f"tier_engine: {why}", file=sys.stderr)
        return 2
    if V.vllm_python() is None:
        from pykvshm.integrations.vllm_env import missing_hint

        print(f"tier_engine: {missing_hint()}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="pykvshm-tier-engine-") as d:
        rep = measure(args.runs, args.prompts, args.tokens, layers=args.layers, hidden=args.hidden, workdir=d)
    header, rows = table(rep)
    print(pcommon.markdown_table(header, rows))
    print(f"load average before {rep['load_avg_before']}, after {rep['load_avg_after']}")
    common.write_json(os.path.join(args.out_dir, "tier_engine.json"),
                      {"benchmark": "tier_engine", "environment": pcommon.environment(), **rep})
    return 0


if __name__ == "__main__":
    sys.exit(main())
