"""Handoff smoke benchmark of the baseline transports: two processes, DRAM to DRAM.

For each transport and size, a producer process sends a whole request (``send``) and a consumer
process waits for it (``wait``); the figure is the time from just before ``send`` to just after
``wait`` returns (both read CLOCK_MONOTONIC, shared by the processes), so it includes the
notification the consumer actually waits for. Registration happens outside the timed region, as
engines register their KV memory once. Every byte is checked after the first and last repetition.
A one-thread ``numpy.copyto`` of the same size, measured in the same run, is the reference.

    python bench/transports_smoke.py                      # all available, 4 KiB / 1 MiB / 64 MiB
    python bench/transports_smoke.py --transports tcp,nixl --reps 5 --json bench/results/smoke.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# name -> (registry name, options for both sides, environment for the children)
VARIANTS = {
    "tcp": ("tcp", {}, {}),
    # UCX picks CMA for the data and tcp/lo for the notification (error handling "peer")
    "nixl": ("nixl", {"ucx_net_devices": "lo"}, {}),
    # error handling off: the notification goes through SysV shared memory instead
    "nixl-errnone": ("nixl", {"ucx_net_devices": "lo",
                              "backend_params": {"ucx_error_handling_mode": "none"}}, {}),
    "nixl-sm": ("nixl", {"ucx_net_devices": "lo", "ucx_tls": "sm",
                         "backend_params": {"ucx_error_handling_mode": "none"}}, {}),
    "nixl-tcp": ("nixl", {"ucx_net_devices": "lo", "ucx_tls": "tcp"}, {}),
    "nixl-progthread": ("nixl", {"ucx_net_devices": "lo", "progress_thread": True}, {}),
    "mooncake": ("mooncake", {}, {"GLOG_minloglevel": "2"}),
}
SIZES = {"4KiB": 4 << 10, "1MiB": 1 << 20, "64MiB": 64 << 20}


def _side(role: str, name: str, options: dict, env: dict, conn, sizes: list[int], reps: int,
          warmup: int) -> None:
    os.environ.update(env)
    try:
        from pykvshm.transfer.baselines import get_transport

        cls = get_transport(name)
        side = cls.producer(**options) if role == "producer" else cls.consumer(**options)
        conn.send(side.metadata())
        side.connect(conn.recv(), timeout=30)
        for size in sizes:
            buf = (np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
                   if role == "producer" else np.zeros(size, np.uint8))
            buf[:] = buf  # fault the pages in before timing
            times = []
            for rep in range(warmup + reps):
                rid = f"{size}-{rep}"
                if role == "consumer":
                    buf[:] = 0
                    side.register(rid, buf, 1)
                    conn.send("ready")
                    side.wait(rid, timeout=60)
                    t1 = time.perf_counter_ns()
                    t0, t_sent = conn.recv()
                    if rep in (0, warmup + reps - 1):
                        expect = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
                        if not np.array_equal(buf, expect):
                            raise AssertionError(f"{name}: corrupt data at {size} bytes, rep {rep}")
                    if rep >= warmup:
                        times.append(((t1 - t0) / 1e9, (t_sent - t0) / 1e9))
                else:
                    side.register(rid, buf, 1)
                    assert conn.recv() == "ready"
                    side.prepare(rid, timeout=30)  # per-request setup, outside the timed span
                    t0 = time.perf_counter_ns()
                    side.send(rid, timeout=60)
                    conn.send((t0, time.perf_counter_ns()))
                side.release(rid)
            if role == "consumer":
                conn.send(("times", size, times))
        if role == "consumer":
            conn.send(("done", None, None))
    except BaseException:  # noqa: BLE001
        try:
            conn.send(("error", role, traceback.format_exc()))
        except Exception:  # noqa: BLE001
            pass
    os._exit(0)  # NIXL 1.5.1 may segfault at interpreter shutdown after transfers


def run_variant(variant: str, sizes: list[int], reps: int, warmup: int, budget: float) -> dict:
    name, options, env = VARIANTS[variant]
    ctx = mp.get_context("spawn")
    # Each child has a pipe to this process, which relays between them (metadata, "ready", t0)
    # and keeps what is addressed to it (timings, errors); the relay is outside the timed span.
    p_parent, p_child = ctx.Pipe()
    c_parent, c_child = ctx.Pipe()
    procs = [ctx.Process(target=_side, args=("producer", name, options, env, p_child, sizes, reps, warmup)),
             ctx.Process(target=_side, args=("consumer", name, options, env, c_child, sizes, reps, warmup))]
    for p in procs:
        p.start()
    p_child.close()  # so that a dead child reads as EOF here
    c_child.close()
    results: dict[int, list[tuple[float, float]]] = {}
    error = None
    deadline = time.monotonic() + budget
    pending = {p_parent: c_parent, c_parent: p_parent}
    try:
        while time.monotonic() < deadline and pending:
            ready = mp.connection.wait(list(pending), timeout=0.5)
            for conn in ready:
                try:
                    msg = conn.recv()
                except (EOFError, OSError):  # a child finished (or died): judged by results below
                    pending.pop(conn, None)
                    continue
                if isinstance(msg, tuple) and len(msg) == 3 and msg[0] in ("times", "error", "done"):
                    if msg[0] == "times":
                        results[msg[1]] = msg[2]
                    elif msg[0] == "error":
                        error = (error + "\n" if error else "") + f"{variant} {msg[1]}:\n{msg[2]}"
                        deadline = min(deadline, time.monotonic() + 2)  # collect the peer's too
                    else:
                        deadline = 0  # all sizes done
                    continue
                if pending.get(conn) in pending:
                    pending[conn].send(msg)  # relay metadata, "ready" and t0
        if error is None and len(results) < len(sizes):
            error = f"{variant}: incomplete (a child died or the {budget:g} s budget ran out)"
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(5)
    return {"results": results, "error": error}


def _fmt(seconds: float, size: int) -> str:
    lat = f"{seconds * 1e6:.0f} us" if seconds < 1e-2 else f"{seconds * 1e3:.1f} ms"
    return f"{lat} ({size / seconds / 1e9:.2f} GB/s)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transports", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    ap.add_argument("--sizes", default=",".join(SIZES), help="comma list of " + ", ".join(SIZES))
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per size (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--budget", type=float, default=180.0, help="seconds per transport before giving up")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)
    sizes = [SIZES[s] for s in args.sizes.split(",")]
    report: dict = {"machine": os.uname().nodename, "cpus": os.cpu_count(), "reps": args.reps,
                    "python": sys.version.split()[0], "median_s": {}, "errors": {}}

    rows = {"memcpy (1 thread, same process)": {s: statistics.median(common.memcpy_times(s, max(args.reps, 5)))
                                               for s in sizes}}
    send_rows: dict[str, dict[int, float]] = {}
    for variant in args.transports.split(","):
        name = VARIANTS[variant][0]
        from pykvshm.transfer.baselines import get_transport

        if not get_transport(name).available():
            report["errors"][variant] = "not installed"
            print(f"{variant}: not installed, skipped", file=sys.stderr)
            continue
        out = run_variant(variant, sizes, args.reps, args.warmup, args.budget)
        if out["error"]:
            report["errors"][variant] = out["error"]
            print(out["error"], file=sys.stderr)
        rows[variant] = {s: statistics.median(h for h, _ in t) for s, t in out["results"].items() if t}
        send_rows[variant] = {s: statistics.median(x for _, x in t) for s, t in out["results"].items() if t}

    names = {v: k for k, v in SIZES.items()}
    for title, table, key in (
            ("handoff: send start -> consumer's wait returns", rows, "median_s"),
            ("producer side only: send start -> send returns", send_rows, "send_median_s")):
        print(f"\n{title}; median of {args.reps}, two processes")
        print("| transport | " + " | ".join(names[s] for s in sizes) + " |")
        print("|---|" + "---|" * len(sizes))
        report.setdefault(key, {})
        for variant, med in table.items():
            cells = [(_fmt(med[s], s) if s in med else "failed") for s in sizes]
            print(f"| {variant} | " + " | ".join(cells) + " |")
            report[key][variant] = {names[s]: med.get(s) for s in sizes}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 1 if report["errors"] and any(e != "not installed" for e in report["errors"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
