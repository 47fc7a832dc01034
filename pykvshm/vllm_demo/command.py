"""The `pykvshm demo` command line: picks the engine (real vLLM, or the transformers fallback)."""

from __future__ import annotations

import argparse
import os
import sys



# The demo's output goes where the user says, by default under the user's cache folder: never into
# the current directory (a source checkout, say).
DEFAULT_OUT = os.path.join(os.path.expanduser("~"), ".cache", "pykvshm", "demo")

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", choices=["pd", "multiturn", "rag"], default="pd",
                   help="pd: prefill/decode disaggregation under Poisson arrivals (default, a few minutes); "
                        "multiturn: chats over several vLLM servers behind a cache-unaware router; "
                        "rag: many questions over a few long documents over several servers "
                        "(multiturn and rag need the vLLM environment)")
    p.add_argument("--engine", choices=["auto", "vllm", "transformers"], default="auto",
                   help="vllm: real vLLM engines with the connector (needs scripts/setup_vllm_env.sh); "
                        "transformers: prefill/decode workers on transformers with pykvshm's transports; "
                        "auto: vllm when its environment exists")
    p.add_argument("--vllm-python", default=None, help="Python of the vLLM environment (default: found automatically)")
    p.add_argument("--requests", type=int, default=None, help="number of requests in the workload (pd: 24; rag: 48)")
    p.add_argument("--prompt-tokens", type=int, default=384, help="mean prompt length")
    p.add_argument("--shared-prefix", type=int, default=256, help="tokens of the shared system prompt")
    p.add_argument("--shared-fraction", type=float, default=0.5, help="fraction of requests that share it")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per request (default 16)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--block-tokens", type=int, default=None,
                   help="tokens per KV block (default 32 for vllm, whose CPU backend needs a multiple of 32; 16 otherwise)")
    p.add_argument("--rate", type=float, default=None,
                   help="mean request arrival rate (Poisson), per second (default 4 for vllm, 8 otherwise)")
    p.add_argument("--prefill-instances", type=int, default=None,
                   help="prefill engines (round robin); with the pool they share one prefix cache "
                        "(default 1 for vllm, one CPU core each side here; 2 otherwise)")
    p.add_argument("--baselines", default=None,
                   help="comma-separated; vllm: nixl, recompute (default both); transformers: tcp, nixl, mooncake, "
                        "recompute (default tcp,nixl,recompute)")
    p.add_argument("--capacity", default=None, help="pool size (default 1GiB for vllm, 256MiB otherwise)")
    p.add_argument("--kv-cache-gib", type=int, default=1, help="vLLM KV cache per engine (VLLM_CPU_KVCACHE_SPACE)")
    p.add_argument("--engine-timeout", type=float, default=600, help="seconds an engine may take to start")
    p.add_argument("--request-timeout", type=float, default=600, help="seconds the workload may take")
    p.add_argument("--pool", default="pykvshm-demo", help="shm name of the pool (created, destroyed after)")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"folder for the report (JSON) and plot (PNG) (default {DEFAULT_OUT}, outside any checkout)")
    p.add_argument("--seed", type=int, default=0)
    w = p.add_argument_group("multiturn and rag (defaults per workload in pykvshm/vllm_demo/workloads.py)")
    w.add_argument("--instances", type=int, default=2, help="vLLM servers behind the router")
    w.add_argument("--router", choices=["round_robin", "least_loaded"], default="round_robin",
                   help="how the router spreads requests (it never looks at the prompt)")
    w.add_argument("--alternatives", default=None,
                   help="comma-separated, run after the pool: prefix (vLLM alone, its own prefix cache per server), "
                        "offload (vLLM's OffloadingConnector), lmcache (LMCacheConnectorV1), recompute "
                        "(default all four; recompute always runs: its outputs are the reference)")
    w.add_argument("--model-layers", type=int, default=2,
                   help="layers of the Llama-3.2-1B-shaped seeded model (the real one has 16)")
    w.add_argument("--model-shape", choices=["llama-1b", "tiny"], default="llama-1b",
                   help="llama-1b: Llama-3.2-1B's layer geometry; tiny: hidden 256 (the CI's reduced runs)")
    w.add_argument("--conversations", type=int, default=None, help="multiturn: chats")
    w.add_argument("--turns", type=int, default=None, help="multiturn: turns per chat")
    w.add_argument("--system-words", type=int, default=None, help="multiturn: tokens of the shared system prompt")
    w.add_argument("--user-words", type=int, default=None, help="multiturn: new user tokens per turn")
    w.add_argument("--documents", type=int, default=None, help="rag: shared documents")
    w.add_argument("--document-tokens", type=int, default=None, help="rag: tokens per document")
    w.add_argument("--question-tokens", type=int, default=None, help="rag: tokens per question")
    w.add_argument("--kv-blocks", type=int, default=None,
                   help="cap each server's own KV cache at this many blocks (--num-gpu-blocks-override; "
                        "default: rag 128, a third of its corpus; multiturn: what --kv-cache-gib holds)")
    w.add_argument("--keep-logs", action="store_true", help="copy the servers' and the client's logs into --out")


def run(args: argparse.Namespace) -> int:
    from ..integrations.vllm_env import missing_hint, vllm_python, vllm_version

    python = None
    if args.workload != "pd":
        python = args.vllm_python or vllm_python()
        if python is None:
            print(f"pykvshm demo --workload {args.workload}: error: {missing_hint()}", file=sys.stderr)
            return 1
        from .workloads import main as workload_main

        args.engine_version = vllm_version(python)
        return workload_main(args, python)
    args.requests = args.requests or 24
    args.new_tokens = args.new_tokens or 16
    if args.engine in ("auto", "vllm"):
        python = args.vllm_python or vllm_python()
        if python is None:
            if args.engine == "vllm":
                print(f"pykvshm demo: error: {missing_hint()}", file=sys.stderr)
                return 1
            print(f"pykvshm demo: {missing_hint()}; running the transformers engine instead", file=sys.stderr)
    if python is not None:
        from .driver import main

        args.block_tokens = args.block_tokens or 32
        args.rate = args.rate or 4.0
        args.capacity = args.capacity or "1GiB"
        args.prefill_instances = args.prefill_instances or 1
        args.baselines = args.baselines if args.baselines is not None else "nixl,recompute"
        args.engine_version = vllm_version(python)
        return main(args, python)
    from ..demo import main as transformers_main

    args.block_tokens = args.block_tokens or 16
    args.rate = args.rate or 8.0
    args.capacity = args.capacity or "256MiB"
    args.prefill_instances = args.prefill_instances or 2
    args.baselines = args.baselines if args.baselines is not None else "tcp,nixl,recompute"
    return transformers_main(args)
