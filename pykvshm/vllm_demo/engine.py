"""One vLLM engine serving requests from a driver: runs in the vLLM environment.

    python -m pykvshm.vllm_demo.engine CONFIG.json
    python -m pykvshm.vllm_demo.engine --write-model DIR LLAMA_CONFIG_JSON SEED

The driver writes one JSON command per line on stdin::

    {"op": "generate", "rid": "...", "prompt": [ids], "max_tokens": n, "kv_transfer_params": {...}|null}
    {"op": "stop"}

and reads one JSON event per line on stdout: ``ready`` once the engine is up, ``done`` per
request (``token_times``: wall-clock time each output token was seen, ``tokens``,
``num_cached_tokens``, ``kv_transfer_params``), ``error`` on a failure. Requests are added to
the running engine as they arrive (continuous batching, as a server would), so the times
include queueing behind other requests. Anything vLLM prints goes to stderr.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from typing import Any


def _emit(out: Any, event: dict[str, Any]) -> None:
    out.write(json.dumps(event) + "\n")
    out.flush()


def serve(config: dict[str, Any], proto: Any) -> None:
    asyncio.run(_serve(config, proto))


async def _serve(config: dict[str, Any], proto: Any) -> None:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.async_llm import AsyncLLM

    kvt = config.get("kv_transfer_config")
    t0 = time.time()
    engine_args = AsyncEngineArgs(
        model=config["model"], skip_tokenizer_init=True, dtype="float32", block_size=config["block_size"],
        max_model_len=config["max_model_len"], enforce_eager=True, seed=0,
        max_num_batched_tokens=config.get("max_num_batched_tokens", 2048), disable_log_stats=True,
        kv_transfer_config=kvt,
    )
    engine = AsyncLLM.from_engine_args(engine_args)
    _emit(proto, {"event": "ready", "start_s": round(time.time() - t0, 2), "pid": os.getpid()})

    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def read() -> None:
        for line in sys.stdin:
            if line.strip():
                loop.call_soon_threadsafe(inbox.put_nowait, json.loads(line))
        loop.call_soon_threadsafe(inbox.put_nowait, None)

    threading.Thread(target=read, daemon=True).start()

    async def generate(cmd: dict[str, Any]) -> None:
        extra = {"kv_transfer_params": cmd["kv_transfer_params"]} if cmd.get("kv_transfer_params") else None
        sp = SamplingParams(max_tokens=int(cmd["max_tokens"]), temperature=0.0, detokenize=False, extra_args=extra)
        times: list[float] = []
        last = None
        async for o in engine.generate(TokensPrompt(prompt_token_ids=cmd["prompt"]), sp, cmd["rid"]):
            now = time.time()
            n = len(o.outputs[0].token_ids) if o.outputs else 0
            times.extend([now] * (n - len(times)))
            last = o
        assert last is not None
        _emit(proto, {
            "event": "done", "rid": cmd["rid"], "tokens": list(last.outputs[0].token_ids), "token_times": times,
            "num_cached_tokens": last.num_cached_tokens, "kv_transfer_params": last.kv_transfer_params,
        })

    tasks: set[asyncio.Task[None]] = set()
    try:
        while True:
            cmd = await inbox.get()
            if cmd is None or cmd.get("op") == "stop":
                break
            task = asyncio.create_task(generate(cmd))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    finally:
        engine.shutdown()
        _emit(proto, {"event": "stopped"})


def write_model(path: str, config: dict[str, Any], seed: int) -> None:
    """A seeded random Llama (config and weights, no tokenizer) for the engines to load."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**config)).eval().save_pretrained(path)


def main(argv: list[str]) -> None:
    if argv[0] == "--write-model":
        write_model(argv[1], json.loads(argv[2]), int(argv[3]))
        return
    with open(argv[0]) as f:
        config = json.load(f)
    # vLLM and its libraries print to stdout; keep our protocol on a private copy of it.
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    try:
        serve(config, proto)
    except BaseException as e:  # the driver shows it and stops the run
        import traceback

        sys.stderr.write(traceback.format_exc())
        sys.stderr.flush()
        _emit(proto, {"event": "error", "error": f"{type(e).__name__}: {e}"})
    os._exit(0)  # EngineCore children are reaped by the driver (process group)


if __name__ == "__main__":
    main(sys.argv[1:])
