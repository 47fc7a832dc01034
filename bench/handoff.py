"""Request handoff: how long until a decode worker has a request's KV, 16 KiB to 256 MiB.

For each transport (the pool, plain TCP, NIXL/UCX, Mooncake) two processes hand over one
request per repetition: the producer calls ``send`` and the consumer's ``wait`` returns once the
bytes are in *its* buffer. The figure is the time from just before ``send`` in the producer to
just after ``wait`` returns in the consumer (CLOCK_MONOTONIC, shared by both processes), so it
includes the notification the decode worker waits for. For the pool, ``send`` is ``put_layer``
of every layer plus ``finish()``, and ``wait`` is a futex wait plus the copy of every layer out of
the pool (``wait_layer`` per layer).

Outside the timed span, as an engine does it ahead of time: buffer registration
(``register``) and per-request setup (``prepare``: the pool allocates the blocks and opens the
transfer channel; NIXL and Mooncake wait for the consumer's registration and prepare their
descriptors). ``prepare`` is timed separately and reported. The request buffer is layer-major
(``--layers`` layers); the pool's geometry is chosen per size (head_dim 128, fp16, 1-8 KV heads,
blocks of up to 16 tokens; 64 MiB = 512 tokens of a Llama-3-8B-like model), and the pool is
created by this process with ``prefault=True``. Every byte is checked on the first warm-up and the
first and last timed repetition. ``numpy.copyto`` of the same bytes, one thread, measured here
before every transport and after the last (samples pooled), is the memcpy reference.

    python bench/handoff.py                              # all transports available, full sizes
    python bench/handoff.py --transports pool,tcp --sizes 16K,1M,64M
    python bench/handoff.py --quick                      # tiny run (CI smoke test)
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

DEFAULT_SIZES = "16K,64K,256K,1M,4M,16M,64M,256M"
QUICK_SIZES = "16K,1M"
HEAD_DIM = 128
ITEMSIZE = 2  # float16


def spec_args(size: int, layers: int) -> dict[str, int | str]:
    """A KVSpec (as kwargs) whose blocks tile ``size`` bytes: 1-8 KV heads, up to 16 tokens/block."""
    per_head_token = layers * 2 * HEAD_DIM * ITEMSIZE  # one token of one KV head, every layer
    if size % per_head_token:
        raise ValueError(f"{size} bytes is not a whole number of tokens for {layers} layers "
                         f"(multiples of {per_head_token} bytes)")
    kv_heads = 1
    while kv_heads < 8 and size % (per_head_token * kv_heads * 2) == 0:
        kv_heads *= 2
    tokens = size // (per_head_token * kv_heads)
    block_tokens = 1
    while block_tokens < 16 and tokens % (block_tokens * 2) == 0:
        block_tokens *= 2
    return {"num_layers": layers, "num_kv_heads": kv_heads, "head_dim": HEAD_DIM,
            "block_tokens": block_tokens, "dtype": "float16"}


def reps_for(size: int, scale: float, quick: bool) -> tuple[int, int]:
    """(timed repetitions, warm-up repetitions) for a size: more for small sizes."""
    if quick:
        return 3, 1
    if size <= 1 << 20:
        reps, warm = 50, 5
    elif size <= 16 << 20:
        reps, warm = 15, 3
    elif size <= 64 << 20:
        reps, warm = 7, 2
    else:
        reps, warm = 5, 2
    # the pool keeps a finished transfer channel for 2 s and has 64: stay under 64 per pool
    return min(60 - warm, max(3, int(round(reps * scale)))), warm


def payload(size: int) -> np.ndarray:
    return np.frombuffer(np.random.default_rng(size).bytes(size), dtype=np.uint8).copy()


# -- the two processes --------------------------------------------------------------------------------
def _side(role: str, link: common.Link, *, transport: str, plan: list[dict], token: str) -> dict:
    """Both children run this; returns per size the timestamps of every repetition."""
    from pykvshm import KVSpec

    out: dict[int, list] = {}
    shared = None
    if transport != "pool":  # one connection for the whole run, as an engine keeps it
        shared = common.make_side(transport, role)
        link.send(("meta", shared.metadata()))
        shared.connect(link.expect("meta"), timeout=60)
    for item in plan:
        size, reps, warm, layers = item["size"], item["reps"], item["warmup"], item["spec"]["num_layers"]
        if transport == "pool":
            side = common.make_side("pool", role, pool=item["pool"], spec=KVSpec(**item["spec"]))
            link.send(("meta", side.metadata()))
            side.connect(link.expect("meta"), timeout=60)
            common.warm_pool_in_turn(side, role, link)  # map every page before timing
        else:
            side = shared
        buf = payload(size) if role == "producer" else np.zeros(size, np.uint8)
        expect = payload(size) if role == "consumer" else None
        check_at = {0, warm, warm + reps - 1}
        rows = []
        for rep in range(warm + reps):
            rid = f"handoff-{token}-{size}-{rep}"
            if role == "consumer":
                if rep in check_at:
                    buf.fill(0)
                side.register(rid, buf, layers)
                link.send(("ready", rep))
                side.wait(rid, timeout=120)
                t1 = common.now()
                if rep in check_at and not np.array_equal(buf, expect):
                    bad = int(np.flatnonzero(buf != expect)[0])
                    raise AssertionError(f"{transport}: corrupt data at {size} bytes, rep {rep}, first bad byte {bad}")
                side.release(rid)
                rows.append(t1)
                link.progress()
            else:
                side.register(rid, buf, layers)
                got = link.expect("ready")
                if got != rep:
                    raise RuntimeError(f"consumer is at repetition {got}, producer at {rep}")
                tp = common.now()
                side.prepare(rid, timeout=60)  # per-request setup, outside the timed span
                t0 = common.now()
                side.send(rid, timeout=120)
                t2 = common.now()
                side.release(rid)
                rows.append((tp, t0, t2))
        out[size] = rows
        if transport == "pool":
            side.close()
    common.close_after_peer(shared, role, link)
    return out


# -- the parent ---------------------------------------------------------------------------------------
def run_transport(name: str, sizes: list[int], args, bar_total: int) -> dict:
    from pykvshm import KVSpec, Pool

    plan, pools = [], []
    try:
        for size in sizes:
            reps, warm = reps_for(size, args.reps_scale, args.quick)
            sa = spec_args(size, args.layers)
            item = {"size": size, "reps": reps, "warmup": warm, "spec": sa, "pool": None}
            if name == "pool":
                spec = KVSpec(**sa)
                n = size // spec.block_bytes
                pname = common.unique_pool_name("handoff")
                pool = Pool.create(pname, spec=spec, capacity=common.pool_capacity(spec, n), prefault=True)
                pools.append((pname, pool))
                item["pool"] = pname
            plan.append(item)
        bar = common.progress_bar(bar_total, f"handoff {name}", enabled=not args.no_progress)
        try:
            res = common.run_pair(_side, {"transport": name, "plan": plan, "token": uuid.uuid4().hex[:8]},
                                  env=common.TRANSPORT_OPTIONS[name][1], budget=args.budget, progress=bar.update)
        finally:
            bar.close()
    finally:
        for pname, pool in pools:
            pool.close()
            Pool.destroy(pname)
    out: dict = {"error": res["error"], "sizes": {}}
    prod, cons = res["producer"] or {}, res["consumer"] or {}
    for item in plan:
        size, warm = item["size"], item["warmup"]
        if size not in prod or size not in cons:
            continue
        p, c = prod[size], cons[size]
        handoff = [(t1 - t0) / 1e9 for (_, t0, _), t1 in zip(p, c)]
        send = [(t2 - t0) / 1e9 for _, t0, t2 in p]
        prep = [(t0 - tp) / 1e9 for tp, t0, _ in p]
        out["sizes"][size] = {
            "reps": item["reps"], "warmup": warm, "spec": item["spec"],
            "handoff_s": common.summary(handoff[warm:]), "send_return_s": common.summary(send[warm:]),
            "prepare_s": common.summary(prep[warm:]), "first_rep_handoff_s": handoff[0],
            "samples_s": handoff[warm:],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transports", default=",".join(common.ALL_TRANSPORTS))
    ap.add_argument("--sizes", default=None, help=f"comma list (default {DEFAULT_SIZES})")
    ap.add_argument("--layers", type=int, default=32, help="layers per request (the pool puts and reads each)")
    ap.add_argument("--reps-scale", type=float, default=1.0, help="multiply the default repetition counts")
    ap.add_argument("--budget", type=float, default=900.0, help="seconds per transport before giving up")
    ap.add_argument("--quick", action="store_true", help=f"tiny run: sizes {QUICK_SIZES}, 3 repetitions")
    ap.add_argument("--out-dir", default=common.RESULTS_DIR)
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    sizes = [common.parse_size(s) for s in (args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)).split(",")]
    names, skipped = common.select_transports(args.transports)
    report: dict = {
        "benchmark": "handoff", "environment": common.environment(),
        "config": {"sizes": sizes, "layers": args.layers, "transports": names, "quick": args.quick,
                   "reps_scale": args.reps_scale, "transport_options": {n: common.TRANSPORT_OPTIONS[n][0] for n in names}},
        "timed_span": ("producer: just before send() -> consumer: just after wait() returned with every byte in "
                       "its buffer; pool send = put_layer x layers + finish(), pool wait = futex wait + copy of "
                       "every layer"),
        "outside_timed_span": "register() and prepare() (reported as prepare_s); pool created with prefault=True "
                              "and every child's mapping populated before timing",
        "skipped": skipped, "errors": {}, "memcpy_s": {}, "results": {},
    }
    print(f"handoff: {', '.join(names)}; sizes {', '.join(common.fmt_bytes(s) for s in sizes)}; "
          f"{args.layers} layers; outside the timed span: register(), prepare() (pool: block allocation "
          f"and channel open), pool creation (prefault=True) and page-table warm-up", flush=True)

    memcpy: dict[int, list[float]] = {s: [] for s in sizes}

    def measure_memcpy() -> None:
        for s in sizes:
            memcpy[s] += common.memcpy_times(s, max(5, reps_for(s, args.reps_scale, args.quick)[0] // 3))

    for name in names:  # memcpy before every transport and once at the end: same conditions, pooled
        measure_memcpy()
        total = sum(sum(reps_for(s, args.reps_scale, args.quick)) for s in sizes)
        t = time.monotonic()
        res = run_transport(name, sizes, args, total)
        print(f"  {name}: {time.monotonic() - t:.1f} s", file=sys.stderr, flush=True)
        if res["error"]:
            report["errors"][name] = res["error"]
            print(f"{name} failed:\n{res['error']}", file=sys.stderr)
        report["results"][name] = {common.fmt_bytes(s).replace(" ", ""): v for s, v in res["sizes"].items()}
    measure_memcpy()
    for s in sizes:
        report["memcpy_s"][common.fmt_bytes(s).replace(" ", "")] = common.summary(memcpy[s])

    # ratios, tables, targets
    label = {s: common.fmt_bytes(s).replace(" ", "") for s in sizes}
    med = {n: {s: (report["results"][n].get(label[s]) or {}).get("handoff_s", {}).get("median") for s in sizes}
           for n in names}
    mc = {s: report["memcpy_s"][label[s]]["median"] for s in sizes}
    for n in names:
        for s in sizes:
            r = report["results"][n].get(label[s])
            if r is not None:
                r["GBps"] = s / med[n][s] / 1e9 if med[n][s] else None
                r["vs_pool"] = common.ratio(med[n][s], med.get("pool", {}).get(s))
                r["vs_memcpy"] = common.ratio(med[n][s], mc[s])

    def cell(n: str, s: int) -> str:
        m = med[n][s]
        return "failed" if m is None else f"{common.fmt_time(m)} ({s / m / 1e9:.2f} GB/s)"

    cols = ["memcpy"] + names
    print("\nHandoff latency (median; send start -> consumer's wait returned with the data), two processes")
    rows = [[common.fmt_bytes(s), f"{common.fmt_time(mc[s])} ({s / mc[s] / 1e9:.1f} GB/s)"] + [cell(n, s) for n in names]
            for s in sizes]
    print(common.markdown_table(["size"] + cols, rows))
    print("\nRatios (transport time / reference time; > 1 = slower than the reference)")
    hdr = ["size"] + [f"{n} / pool" for n in names if n != "pool"] + [f"{n} / memcpy" for n in names]
    rows = []
    for s in sizes:
        r = [common.fmt_bytes(s)]
        r += [common.fmt_ratio(common.ratio(med[n][s], med.get("pool", {}).get(s))) for n in names if n != "pool"]
        r += [common.fmt_ratio(common.ratio(med[n][s], mc[s])) for n in names]
        rows.append(r)
    print(common.markdown_table(hdr, rows))
    print("\nOutside the timed span (median): prepare() / producer-side only: send start -> send returns")
    rows = []
    for s in sizes:
        r = [common.fmt_bytes(s)]
        for n in names:
            x = report["results"][n].get(label[s])
            r.append("-" if x is None else f"{common.fmt_time(x['prepare_s']['median'])} / "
                                           f"{common.fmt_time(x['send_return_s']['median'])}")
        rows.append(r)
    print(common.markdown_table(["size"] + names, rows))

    targets = []
    if "pool" in names:
        for s in sizes:
            if s <= 1 << 20:
                for n, want in (("nixl", 5.0), ("mooncake", 50.0)):
                    if n in names and med[n][s] and med["pool"][s]:
                        x = med[n][s] / med["pool"][s]
                        targets.append({"target": f"{label[s]}: pool >= {want:g}x faster than {n}",
                                        "measured": f"{x:.1f}x", "met": x >= want})
            if s == 256 << 20 and med["pool"][s]:
                x = med["pool"][s] / mc[s]
                targets.append({"target": "256MiB: pool within 10% of memcpy", "measured": f"{x:.2f}x memcpy",
                                "met": x <= 1.10})
                if "nixl" in names and med["nixl"][s]:
                    x = med["pool"][s] / med["nixl"][s]
                    targets.append({"target": "256MiB: pool no slower than nixl", "measured": f"{x:.2f}x nixl's time",
                                    "met": x <= 1.0})
    report["targets"] = targets
    if targets:
        print("\nTargets (issue 6)")
        print(common.markdown_table(["target", "measured", "met"],
                                    [[t["target"], t["measured"], "yes" if t["met"] else "NO"] for t in targets]))

    os.makedirs(args.out_dir, exist_ok=True)
    common.write_json(os.path.join(args.out_dir, "handoff.json"), report)
    if not args.no_plot:
        plot(os.path.join(args.out_dir, "handoff.png"), sizes, names, med, mc, report)
    return 1 if report["errors"] else 0


def plot(path: str, sizes: list[int], names: list[str], med: dict, mc: dict, report: dict) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    series = [("memcpy (1 thread)", mc, "k--")] + [(n, med[n], "o-") for n in names]
    for label, data, style in series:
        xs = [s for s in sizes if data.get(s)]
        ax1.loglog(xs, [data[s] * 1e6 for s in xs], style, label=label)
        ax2.semilogx(xs, [s / data[s] / 1e9 for s in xs], style, label=label)
    for ax in (ax1, ax2):
        ax.set_xticks(sizes, [common.fmt_bytes(s) for s in sizes], rotation=45)
        ax.minorticks_off()
        ax.set_xlabel("KV bytes per request")
        ax.grid(True, which="major", alpha=0.3)
    ax1.set_ylabel("handoff latency, median (us)")
    ax1.set_title("send start -> consumer has the bytes (2 processes)")
    ax2.set_ylabel("GB/s")
    ax2.set_title("throughput")
    ax1.legend()
    env = report["environment"]
    fig.suptitle(f"pykvshm handoff, {env.get('cpus')} CPUs, {env.get('host')}", fontsize=10)
    common.save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
