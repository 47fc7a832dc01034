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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# the measurement itself is shared with the packaged suite (pykvshm bench)
from pykvshm.benchmarks.handoff import DEFAULT_SIZES, QUICK_SIZES, reps_for  # noqa: E402
from pykvshm.benchmarks.handoff import run_transport as _run_transport  # noqa: E402


def run_transport(name: str, sizes: list[int], args, bar_total: int) -> dict:
    bar = common.progress_bar(bar_total, f"handoff {name}", enabled=not args.no_progress)
    try:
        return _run_transport(name, sizes, layers=args.layers, reps_scale=args.reps_scale, quick=args.quick,
                              budget=args.budget, progress=bar.update)
    finally:
        bar.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transports", default=",".join(common.HANDOFF_TRANSPORTS))
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
