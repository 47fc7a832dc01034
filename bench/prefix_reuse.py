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
import uuid

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SALT = b"pykvshm-bench-prefix-reuse"


def make_plan(args) -> list[dict]:
    """The requests: prompt index, suffix token count and seeds, deterministic."""
    rng = np.random.default_rng(args.seed)
    lo, hi = (int(x) for x in args.suffix_tokens.split(","))
    bt = args.block_tokens
    plan = []
    for i in range(args.requests):
        suffix = int(rng.integers(lo // bt, hi // bt + 1)) * bt
        plan.append({"index": i, "prompt": i % args.prompts, "suffix_tokens": suffix,
                     "blocks": (args.prefix_tokens + suffix) // bt})
    return plan


def request_tokens(item: dict, prefix_tokens: int, seed: int) -> np.ndarray:
    prompt = np.random.default_rng([seed, 1, item["prompt"]]).integers(0, 128_000, prefix_tokens, dtype=np.int64)
    suffix = np.random.default_rng([seed, 2, item["index"]]).integers(0, 128_000, item["suffix_tokens"], dtype=np.int64)
    return np.concatenate([prompt, suffix])


def fill_request(buf: np.ndarray, keys, layers: int) -> None:
    """Layer-major request buffer; block j's bytes are a function of keys[j] only."""
    n = len(keys)
    words = buf.view(np.uint64).reshape(layers, n, -1)
    seeds = np.array([int.from_bytes(bytes(k)[:8], "little") for k in keys], dtype=np.uint64)
    base = np.arange(layers * words.shape[2], dtype=np.uint64).reshape(layers, 1, -1)
    np.add(base, seeds.reshape(1, n, 1), out=words)


def _side(role: str, link: common.Link, *, transport: str, pool: str | None, spec: dict, plan: list[dict],
          prefix_tokens: int, seed: int, token: str, verify: bool) -> list[dict]:
    import pykvshm
    from pykvshm import KVSpec

    ks = KVSpec(**spec)
    layers, bt = ks.num_layers, ks.block_tokens
    side = common.make_side(transport, role, **({"pool": pool, "spec": ks} if transport == "pool" else {}))
    link.send(("meta", side.metadata()))
    side.connect(link.expect("meta"), timeout=60)
    if transport == "pool":
        common.warm_pool_in_turn(side, role, link)
    big = np.zeros(max(p["blocks"] for p in plan) * ks.block_bytes, np.uint8)
    big.fill(0)  # fault the pages in
    expect = np.zeros_like(big) if role == "consumer" and verify else None
    rows = []
    for item in plan:
        rid = f"prefix-{token}-{item['index']}"
        keys = pykvshm.block_keys(request_tokens(item, prefix_tokens, seed), bt, salt=SALT)
        n = len(keys)
        assert n == item["blocks"]
        buf = big[: n * ks.block_bytes]
        if role == "consumer":
            if verify:
                buf.fill(0)
            side.register(rid, buf, layers)
            link.send(("ready", item["index"]))
            side.wait(rid, timeout=300)
            t1 = common.now()
            if verify:
                want = expect[: buf.nbytes]
                fill_request(want, keys, layers)
                if not np.array_equal(buf, want):
                    raise AssertionError(f"{transport}: request {item['index']} arrived corrupt")
            side.release(rid)
            rows.append({"t1": t1})
            link.progress()
        else:
            fill_request(buf, keys, layers)
            if transport == "pool":
                side.register(rid, buf, layers, keys=keys)
            else:
                side.register(rid, buf, layers)
            if link.expect("ready") != item["index"]:
                raise RuntimeError("producer and consumer disagree on the request")
            cached = side.pool.match(keys) if transport == "pool" else 0
            before = side.pool.stats()["bytes_in"] if transport == "pool" else 0
            tp = common.now()
            side.prepare(rid, timeout=60)  # pool: pins the cached prefix, allocates the rest
            t0 = common.now()
            side.send(rid, timeout=300)
            t2 = common.now()
            side.release(rid)
            # the pool's bytes_in counter also counts the cached blocks put_layer skips (reported
            # as found), so bytes moved = the blocks that were not cached
            counter = side.pool.stats()["bytes_in"] - before if transport == "pool" else None
            rows.append({"tp": tp, "t0": t0, "t2": t2, "blocks": n, "cached": cached,
                         "bytes_sent": (n - cached) * ks.block_bytes, "bytes_in_counter": counter})
    common.close_after_peer(side, role, link)
    return rows


def run_transport(name: str, args, spec: dict, plan: list[dict]) -> dict:
    from pykvshm import KVSpec, Pool

    ks = KVSpec(**spec)
    pname, pool = None, None
    if name == "pool":
        unique = args.prompts * (args.prefix_tokens // args.block_tokens) + sum(
            p["suffix_tokens"] // args.block_tokens for p in plan)
        pname = common.unique_pool_name("prefix")
        pool = Pool.create(pname, spec=ks, capacity=common.pool_capacity(ks, max(p["blocks"] for p in plan),
                                                                       at_least=unique + 16), prefault=True)
    bar = common.progress_bar(len(plan), f"prefix reuse {name}", enabled=not args.no_progress)
    try:
        res = common.run_pair(_side, {"transport": name, "pool": pname, "spec": spec, "plan": plan,
                                      "prefix_tokens": args.prefix_tokens, "seed": args.seed,
                                      "token": uuid.uuid4().hex[:8], "verify": not args.no_verify},
                              env=common.TRANSPORT_OPTIONS[name][1], budget=args.budget, progress=bar.update)
        stats = pool.stats() if pool is not None else None
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            Pool.destroy(pname)
    out: dict = {"error": res["error"], "requests": [], "pool_stats": stats}
    prod, cons = res["producer"] or [], res["consumer"] or []
    for item, p, c in zip(plan, prod, cons):
        out["requests"].append({
            "index": item["index"], "prompt": item["prompt"], "blocks": p["blocks"], "cached_blocks": p["cached"],
            "bytes_moved": p["bytes_sent"], "pool_bytes_in_counter": p["bytes_in_counter"],
            "bytes_to_decode_buffer": p["blocks"] * ks.block_bytes,
            "handoff_s": (c["t1"] - p["t0"]) / 1e9, "send_return_s": (p["t2"] - p["t0"]) / 1e9,
            "prepare_s": (p["t0"] - p["tp"]) / 1e9,
        })
    reqs = out["requests"]
    firsts = [r for r in reqs if r["index"] < args.prompts]
    repeats = [r for r in reqs if r["index"] >= args.prompts]
    out["summary"] = {
        "requests": len(reqs),
        "bytes_moved": sum(r["bytes_moved"] for r in reqs),
        "bytes_requested": sum(r["bytes_to_decode_buffer"] for r in reqs),
        "cached_blocks": sum(r["cached_blocks"] for r in reqs),
        "blocks": sum(r["blocks"] for r in reqs),
        "handoff_s": common.summary(r["handoff_s"] for r in reqs),
        "handoff_first_of_prompt_s": common.summary(r["handoff_s"] for r in firsts),
        "handoff_repeat_s": common.summary(r["handoff_s"] for r in repeats),
        "handoff_total_s": sum(r["handoff_s"] for r in reqs),
        "prepare_s": common.summary(r["prepare_s"] for r in reqs),
        "send_return_first_of_prompt_s": common.summary(r["send_return_s"] for r in firsts),
        "send_return_repeat_s": common.summary(r["send_return_s"] for r in repeats),
        "bytes_moved_per_request_median": float(np.median([r["bytes_moved"] for r in reqs])) if reqs else None,
    }
    return out


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
