"""Prefix reuse: requests that share long prefixes, handed from prefill to decode.

A workload of ``--requests`` requests over ``--prompts`` system prompts of ``--prefix-tokens``
tokens, each request with a unique suffix (``--suffix-tokens`` min,max; whole 16-token blocks),
prompts taken round robin. Llama-3-8B-like KV (32 layers, 8 KV heads, head_dim 128, fp16): one
16-token block is 2 MiB. Each block's content is a function of its key (its prefix), so two
requests sharing a prefix share those blocks' bytes, and the consumer checks every byte of
every request.

* The pool: the producer opens the transfer with the request's chained block keys
  (``pykvshm.block_keys``); blocks already in the pool (``pool.match``; the transfer pins them,
  ``TransferProducer.cached_blocks``) are not written again, so a repeated prefix crosses
  nothing. The consumer still copies every block of the request out of the pool into its buffer.
* The baselines (tcp, nixl, mooncake) move every block of every request.

Reported per transport: bytes moved by the producer (the pool: new blocks only), bytes copied
into the decode buffer, handoff time per request (producer's ``send`` start -> consumer's
``wait`` returned; ``register`` and ``prepare`` outside the timed span, ``prepare`` reported),
split into first requests of a prompt and repeats.

    python bench/prefix_reuse.py
    python bench/prefix_reuse.py --transports pool,tcp --requests 32 --prompts 4 --prefix-tokens 2048
    python bench/prefix_reuse.py --quick
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# the workload and its measurement are shared with the packaged suite (pykvshm bench)
from pykvshm.benchmarks.prefix_reuse import Workload  # noqa: E402
from pykvshm.benchmarks.prefix_reuse import make_plan as _make_plan  # noqa: E402
from pykvshm.benchmarks.prefix_reuse import run_transport as _run_transport  # noqa: E402

def workload(args) -> Workload:
    return Workload(requests=args.requests, prompts=args.prompts, prefix_tokens=args.prefix_tokens,
                    suffix_tokens=args.suffix_tokens, layers=args.layers, kv_heads=args.kv_heads,
                    head_dim=args.head_dim, block_tokens=args.block_tokens, seed=args.seed, verify=not args.no_verify)


def make_plan(args) -> list[dict]:
    return _make_plan(workload(args))


def run_transport(name: str, args, spec: dict, plan: list[dict]) -> dict:
    bar = common.progress_bar(len(plan), f"prefix reuse {name}", enabled=not args.no_progress)
    try:
        return _run_transport(name, workload(args), plan, budget=args.budget, progress=bar.update)
    finally:
        bar.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transports", default=",".join(common.ALL_TRANSPORTS))
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=4, help="distinct system prompts (shared prefixes)")
    ap.add_argument("--prefix-tokens", type=int, default=2048)
    ap.add_argument("--suffix-tokens", default="64,512", help="min,max unique tokens per request")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-verify", action="store_true", help="skip the byte-for-byte check of every request")
    ap.add_argument("--budget", type=float, default=900.0, help="seconds per transport before giving up")
    ap.add_argument("--quick", action="store_true", help="tiny run: 6 requests, 2 prompts of 64 tokens, 4 layers")
    ap.add_argument("--out-dir", default=common.RESULTS_DIR)
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.prompts, args.prefix_tokens, args.suffix_tokens = 6, 2, 64, "16,48"
        args.layers, args.kv_heads = 4, 2
    if args.prefix_tokens % args.block_tokens:
        ap.error("--prefix-tokens must be a multiple of --block-tokens")
    spec = {"num_layers": args.layers, "num_kv_heads": args.kv_heads, "head_dim": args.head_dim,
            "block_tokens": args.block_tokens, "dtype": "float16"}
    from pykvshm import KVSpec

    block_bytes = KVSpec(**spec).block_bytes
    plan = make_plan(args)
    names, skipped = common.select_transports(args.transports)
    print(f"prefix reuse: {', '.join(names)}; {args.requests} requests, {args.prompts} prompts x "
          f"{args.prefix_tokens} tokens + {args.suffix_tokens} unique tokens; blocks of {args.block_tokens} tokens "
          f"= {common.fmt_bytes(block_bytes)}; register() and prepare() outside the timed span", flush=True)
    report: dict = {
        "benchmark": "prefix_reuse", "environment": common.environment(),
        "config": {"transports": names, "requests": args.requests, "prompts": args.prompts,
                   "prefix_tokens": args.prefix_tokens, "suffix_tokens": args.suffix_tokens, "spec": spec,
                   "block_bytes": block_bytes, "seed": args.seed, "verified": not args.no_verify,
                   "quick": args.quick},
        "definitions": {
            "bytes_moved": "bytes the producer hands to the transport (pool: blocks not already in the pool, "
                           "i.e. (blocks - pool.match(keys)) x block_bytes; baselines: the whole request)",
            "bytes_to_decode_buffer": "bytes that end up in the consumer's buffer (the whole request, every transport)",
            "handoff": "producer's send() start -> consumer's wait() returned; register()/prepare() untimed",
        },
        "skipped": skipped, "errors": {}, "results": {},
    }
    for name in names:
        t = time.monotonic()
        res = run_transport(name, args, spec, plan)
        print(f"  {name}: {time.monotonic() - t:.1f} s", file=sys.stderr, flush=True)
        if res["error"]:
            report["errors"][name] = res["error"]
            print(f"{name} failed:\n{res['error']}", file=sys.stderr)
        report["results"][name] = res

    pool_s = report["results"].get("pool", {}).get("summary", {})
    rows = []
    for name in names:
        s = report["results"][name].get("summary", {})
        if not s.get("requests"):
            rows.append([name] + ["failed"] * 10)
            continue
        med = s["handoff_s"]["median"]
        s["handoff_vs_pool"] = common.ratio(med, (pool_s.get("handoff_s") or {}).get("median"))
        s["bytes_moved_vs_pool"] = common.ratio(s["bytes_moved"], pool_s.get("bytes_moved"))
        rows.append([name, str(s["requests"]), f"{common.fmt_bytes(s['bytes_moved'])} of "
                     f"{common.fmt_bytes(s['bytes_requested'])}", common.fmt_bytes(s["bytes_moved_per_request_median"]),
                     f"{s['cached_blocks']} / {s['blocks']}", common.fmt_time(med),
                     common.fmt_time(s["handoff_first_of_prompt_s"]["median"]),
                     common.fmt_time(s["handoff_repeat_s"]["median"]),
                     common.fmt_time(s["send_return_repeat_s"]["median"]), common.fmt_time(s["handoff_total_s"]),
                     common.fmt_ratio(s["handoff_vs_pool"])])
    print(f"\nPrefix reuse: {args.requests} requests (first {args.prompts} are the first of their prompt)")
    print(common.markdown_table(["transport", "requests", "bytes moved", "moved per request (median)",
                                 "blocks served from cache", "handoff per request (median)", "first of a prompt",
                                 "repeats", "repeats: producer's send returns", "sum of handoffs",
                                 "median vs pool"], rows))
    print("(the pool's consumer still copies every block, cached or not, out of the pool into its buffer)")
    os.makedirs(args.out_dir, exist_ok=True)
    common.write_json(os.path.join(args.out_dir, "prefix_reuse.json"), report)
    if not args.no_plot:
        plot(os.path.join(args.out_dir, "prefix_reuse.png"), names, report)
    return 1 if report["errors"] else 0


def plot(path: str, names: list[str], report: dict) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    for name in names:
        reqs = report["results"][name].get("requests") or []
        if reqs:
            ax1.semilogy([r["index"] for r in reqs], [r["handoff_s"] * 1e3 for r in reqs], "o-", ms=3, label=name)
    ax1.axvline(report["config"]["prompts"] - 0.5, color="k", ls=":", lw=1)
    ax1.set_xlabel("request (left of the dotted line: first of its prompt)")
    ax1.set_ylabel("handoff (ms)")
    ax1.set_title("handoff time per request")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    moved = [report["results"][n].get("summary", {}).get("bytes_moved", 0) / 2**30 for n in names]
    ax2.bar(names, moved)
    ax2.set_ylabel("GiB moved by the producer, whole workload")
    ax2.set_title("bytes moved")
    ax2.grid(alpha=0.3, axis="y")
    c = report["config"]
    fig.suptitle(f"pykvshm prefix reuse: {c['requests']} requests, {c['prompts']} prompts x {c['prefix_tokens']} tokens",
                 fontsize=10)
    common.save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
