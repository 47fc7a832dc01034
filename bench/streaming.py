"""Layer-wise streaming: when does decode have every layer, with and without overlap?

A producer process simulates prefill of one request, layer after layer (``--compute-ms`` per
layer, ``--layers`` layers, Llama-3-8B-like layers: 8 KV heads x head_dim 128, fp16,
``--tokens`` tokens, so 2048 tokens = 8 MiB per layer). A consumer process (decode) waits for the
layers. Two schedules per transport:

* ``overlap``: the producer calls ``send_layer(l)`` right after computing layer ``l``; the
  consumer calls ``wait_layer(l)`` for l = 0, 1, ... and so reads layers as they arrive (for
  the pool: futex wait + copy of the layer out of the pool; ``finish()`` after the last layer);
* ``no-overlap``: the producer computes every layer, then calls ``send`` once; the consumer
  calls ``wait``.

Figures per repetition (CLOCK_MONOTONIC, shared by both processes): *total* = prefill start ->
the consumer has every layer in its buffer; *after prefill* = the producer finished computing
the last layer -> the consumer has every layer (target: no more than one layer's compute time);
*prefill* = prefill start -> last layer computed (sends are synchronous on the producer's
thread, so a slow ``send_layer`` stretches prefill). ``register`` and ``prepare`` happen before
prefill starts (not timed). Compute is simulated with ``--compute sleep`` (the host thread idles,
as while a GPU computes; default) or ``spin`` (a busy CPU).

    python bench/streaming.py                         # all transports available
    python bench/streaming.py --transports pool,tcp --compute-ms 2 --tokens 2048
    python bench/streaming.py --quick
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

MODES = ("overlap", "no-overlap")


def simulate_compute(seconds: float, how: str) -> None:
    """Occupy ``seconds``: sleep (host idle) or spin (host busy); ends within a few us of it."""
    end = time.perf_counter() + seconds
    if how == "sleep":
        left = end - time.perf_counter() - 2e-4  # wake early, finish by spinning: sleep overshoots
        if left > 0:
            time.sleep(left)
    while time.perf_counter() < end:
        pass


def payload(nbytes: int) -> np.ndarray:
    return np.frombuffer(np.random.default_rng(nbytes).bytes(nbytes), dtype=np.uint8).copy()


def _side(role: str, link: common.Link, *, transport: str, pool: str | None, spec: dict, nbytes: int,
          modes: list[str], reps: int, warmup: int, compute_s: float, compute: str, token: str) -> dict:
    from pykvshm import KVSpec

    layers = spec["num_layers"]
    opts = {"pool": pool, "spec": KVSpec(**spec)} if common.is_pool(transport) else {}
    side = common.make_side(transport, role, **opts)
    link.send(("meta", side.metadata()))
    side.connect(link.expect("meta"), timeout=60)
    if common.is_pool(transport):
        common.warm_pool_in_turn(side, role, link)
    buf = payload(nbytes) if role == "producer" else np.zeros(nbytes, np.uint8)
    expect = payload(nbytes) if role == "consumer" else None
    out: dict[str, list] = {}
    for mode in modes:
        rows = []
        check_at = {0, warmup, warmup + reps - 1}
        for rep in range(warmup + reps):
            rid = f"stream-{token}-{mode}-{rep}"
            if role == "consumer":
                if rep in check_at:
                    buf.fill(0)
                side.register(rid, buf, layers)
                link.send(("ready", rep))
                arrived = []
                if mode == "overlap":
                    for layer in range(layers):
                        side.wait_layer(rid, layer, timeout=120)
                        arrived.append(common.now())
                else:
                    side.wait(rid, timeout=120)
                    arrived = [common.now()] * layers
                if rep in check_at and not np.array_equal(buf, expect):
                    raise AssertionError(f"{transport} {mode}: corrupt data, rep {rep}")
                side.release(rid)
                rows.append(arrived)
                link.progress()
            else:
                side.register(rid, buf, layers)
                if link.expect("ready") != rep:
                    raise RuntimeError("producer and consumer disagree on the repetition")
                side.prepare(rid, timeout=60)  # per-request setup before prefill starts (not timed)
                start = common.now()
                computed, sent = [], []
                for layer in range(layers):
                    simulate_compute(compute_s, compute)
                    computed.append(common.now())
                    if mode == "overlap":
                        side.send_layer(rid, layer, timeout=120)
                        sent.append(common.now())
                if mode == "no-overlap":
                    side.send(rid, timeout=120)
                    sent = [common.now()] * layers
                side.release(rid)
                rows.append((start, computed, sent))
        out[mode] = rows
    common.close_after_peer(side, role, link)
    return out


def run_transport(name: str, args, spec: dict, nbytes: int) -> dict:
    from pykvshm import KVSpec, Pool

    pname, pool = None, None
    if common.is_pool(name):
        ks = KVSpec(**spec)
        n = nbytes // ks.block_bytes
        pname = common.unique_pool_name("stream")
        pool = Pool.create(pname, spec=ks, capacity=common.pool_capacity(ks, n), prefault=True)
    bar = common.progress_bar(len(MODES) * (args.reps + args.warmup), f"streaming {name}", enabled=not args.no_progress)
    try:
        res = common.run_pair(_side, {"transport": name, "pool": pname, "spec": spec, "nbytes": nbytes,
                                      "modes": list(MODES), "reps": args.reps, "warmup": args.warmup,
                                      "compute_s": args.compute_ms / 1e3, "compute": args.compute,
                                      "token": uuid.uuid4().hex[:8]},
                              env=common.TRANSPORT_OPTIONS[name][1], budget=args.budget, progress=bar.update)
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            Pool.destroy(pname)
    out: dict = {"error": res["error"], "modes": {}}
    prod, cons = res["producer"] or {}, res["consumer"] or {}
    for mode in MODES:
        if mode not in prod or mode not in cons:
            continue
        total, after, prefill, first, per_layer = [], [], [], [], []
        for (start, computed, sent), arrived in list(zip(prod[mode], cons[mode]))[args.warmup:]:
            total.append((arrived[-1] - start) / 1e9)
            after.append((arrived[-1] - computed[-1]) / 1e9)
            prefill.append((computed[-1] - start) / 1e9)
            first.append((arrived[0] - start) / 1e9)
            per_layer.append({"computed_ms": [(c - start) / 1e6 for c in computed],
                              "arrived_ms": [(a - start) / 1e6 for a in arrived]})
        out["modes"][mode] = {
            "total_s": common.summary(total), "after_prefill_s": common.summary(after),
            "prefill_s": common.summary(prefill), "first_layer_s": common.summary(first),
            "median_layer_timeline_ms": {
                "computed": np.median([p["computed_ms"] for p in per_layer], axis=0).tolist() if per_layer else [],
                "arrived": np.median([p["arrived_ms"] for p in per_layer], axis=0).tolist() if per_layer else [],
            },
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transports", default="pool,pool-inplace,tcp,nixl,mooncake")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=2048, help="prompt tokens (a multiple of 16)")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--compute-ms", type=float, default=2.0, help="simulated prefill compute per layer")
    ap.add_argument("--compute", choices=("sleep", "spin"), default="sleep")
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions per schedule (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--budget", type=float, default=900.0, help="seconds per transport before giving up")
    ap.add_argument("--quick", action="store_true", help="tiny run: 4 layers, 64 tokens, 2 KV heads, 3 reps")
    ap.add_argument("--out-dir", default=common.RESULTS_DIR)
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.tokens, args.kv_heads, args.reps, args.warmup = 4, 64, 2, 3, 1
        args.compute_ms = min(args.compute_ms, 1.0)
    block_tokens = 16
    if args.tokens % block_tokens:
        ap.error(f"--tokens must be a multiple of {block_tokens}")
    spec = {"num_layers": args.layers, "num_kv_heads": args.kv_heads, "head_dim": args.head_dim,
            "block_tokens": block_tokens, "dtype": "float16"}
    layer_bytes = 2 * args.tokens * args.kv_heads * args.head_dim * 2
    nbytes = layer_bytes * args.layers
    names, skipped = common.select_transports(args.transports)
    compute_s = args.compute_ms / 1e3
    print(f"streaming: {', '.join(names)}; {args.layers} layers x {common.fmt_bytes(layer_bytes)} "
          f"({args.tokens} tokens, {common.fmt_bytes(nbytes)} in all), {args.compute_ms:g} ms/layer compute "
          f"({args.compute}); register() and prepare() before prefill starts (not timed)", flush=True)
    report: dict = {
        "benchmark": "streaming", "environment": common.environment(),
        "config": {"transports": names, "layers": args.layers, "tokens": args.tokens, "kv_heads": args.kv_heads,
                   "head_dim": args.head_dim, "layer_bytes": layer_bytes, "request_bytes": nbytes,
                   "compute_ms_per_layer": args.compute_ms, "compute": args.compute, "reps": args.reps,
                   "warmup": args.warmup, "quick": args.quick},
        "definitions": {
            "total": "prefill start -> consumer has every layer in its buffer",
            "after_prefill": "producer finished computing the last layer -> consumer has every layer",
            "prefill": "prefill start -> last layer computed (synchronous sends stretch it)",
            "first_layer": "prefill start -> consumer has layer 0",
            "untimed": "register() and prepare() before prefill starts; pool prefaulted and mapped",
        },
        "skipped": skipped, "errors": {}, "results": {},
        "memcpy_layer_s": common.summary(common.memcpy_times(layer_bytes, 9)),
    }
    for name in names:
        t = time.monotonic()
        res = run_transport(name, args, spec, nbytes)
        print(f"  {name}: {time.monotonic() - t:.1f} s", file=sys.stderr, flush=True)
        if res["error"]:
            report["errors"][name] = res["error"]
            print(f"{name} failed:\n{res['error']}", file=sys.stderr)
        report["results"][name] = res["modes"]

    ref = (report["results"].get("pool", {}).get("overlap") or {}).get("total_s", {}).get("median")
    ideal = args.layers * compute_s
    rows = []
    for name in names:
        for mode in MODES:
            r = report["results"][name].get(mode)
            if r is None:
                rows.append([name, mode] + ["failed"] * 6)
                continue
            tot = r["total_s"]["median"]
            r["vs_pool_overlap"] = common.ratio(tot, ref)
            rows.append([name, mode, common.fmt_time(tot), common.fmt_time(r["prefill_s"]["median"]),
                         common.fmt_time(r["after_prefill_s"]["median"]),
                         f"{r['after_prefill_s']['median'] / compute_s:.2f}",
                         common.fmt_time(r["first_layer_s"]["median"]), common.fmt_ratio(r["vs_pool_overlap"])])
    print(f"\nStreaming, median of {args.reps}: compute alone = {common.fmt_time(ideal)} "
          f"({args.layers} x {args.compute_ms:g} ms); one layer's memcpy = "
          f"{common.fmt_time(report['memcpy_layer_s']['median'])}")
    print(common.markdown_table(
        ["transport", "schedule", "total", "prefill", "decode has all layers after prefill ends",
         "... in layer compute times", "layer 0 at decode", "total vs pool overlap"], rows))
    pool_ov = report["results"].get("pool", {}).get("overlap")
    targets = []
    if pool_ov:
        after = pool_ov["after_prefill_s"]["median"]
        targets.append({"target": "pool, overlap: decode has all layers <= one layer's compute time after prefill ends",
                        "measured": f"{after * 1e3:.2f} ms (compute {args.compute_ms:g} ms)",
                        "met": after <= compute_s})
        print("\nTargets (issue 6)")
        print(common.markdown_table(["target", "measured", "met"],
                                    [[t["target"], t["measured"], "yes" if t["met"] else "NO"] for t in targets]))
    report["targets"] = targets
    os.makedirs(args.out_dir, exist_ok=True)
    common.write_json(os.path.join(args.out_dir, "streaming.json"), report)
    if not args.no_plot:
        plot(os.path.join(args.out_dir, "streaming.png"), names, report, args)
    return 1 if report["errors"] else 0


def plot(path: str, names: list[str], report: dict, args) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    layers = np.arange(args.layers)
    ax1.plot(layers, layers * 0 + (layers + 1) * args.compute_ms, "k--", label="layer computed (compute only)")
    for name in names:
        r = report["results"][name].get("overlap")
        if r and r["median_layer_timeline_ms"]["arrived"]:
            ax1.plot(layers, r["median_layer_timeline_ms"]["arrived"], "o-", ms=3, label=f"{name}: layer at decode")
    ax1.set_xlabel("layer")
    ax1.set_ylabel("ms since prefill start (median)")
    ax1.set_title("overlap: when each layer is in decode's buffer")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    labels, totals, afters = [], [], []
    for name in names:
        for mode in MODES:
            r = report["results"][name].get(mode)
            if r:
                labels.append(f"{name}\n{mode}")
                totals.append(r["total_s"]["median"] * 1e3)
                afters.append(r["after_prefill_s"]["median"] * 1e3)
    x = np.arange(len(labels))
    ax2.bar(x - 0.2, totals, 0.4, label="total (prefill start -> all layers at decode)")
    ax2.bar(x + 0.2, afters, 0.4, label="after prefill ends")
    ax2.axhline(args.layers * args.compute_ms, color="k", ls="--", lw=1, label="compute alone")
    ax2.axhline(args.compute_ms, color="r", ls=":", lw=1, label="one layer's compute (target)")
    ax2.set_xticks(x, labels, fontsize=7)
    ax2.set_yscale("log")
    ax2.set_ylabel("ms (median)")
    ax2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    ax2.grid(alpha=0.3, axis="y")
    fig.suptitle(f"pykvshm layer-wise streaming: {args.layers} layers x "
                 f"{common.fmt_bytes(report['config']['layer_bytes'])}, {args.compute_ms:g} ms/layer ({args.compute})",
                 fontsize=10)
    common.save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
