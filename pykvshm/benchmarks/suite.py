"""The benchmark suite behind ``pykvshm bench``: short versions of the scripts in bench/.

Each benchmark measures pykvshm and a baseline in the same run and reports their ratio as
"pykvshm vs baseline": the baseline's time over pykvshm's time (or pykvshm's rate over the
baseline's rate), so above 1 means pykvshm is faster. Ratios are reported, never checked: this
machine's load decides them as much as the code does. ``quick`` runs take a few seconds per
benchmark; the full scripts in bench/ run every size and draw plots.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import IO, Any

from . import common

# -- the benchmarks ---------------------------------------------------------------------------------
# Each returns {"baseline": str, "rows": [dict], "table": {"header": [...], "rows": [[str]]},
# "notes": [str]} and may add "skipped" (transport -> reason) and "transport_errors".


def _m(x: float) -> str:
    return f"{x / 1e6:.2f} M"


def bench_alloc(quick: bool) -> dict[str, Any]:
    from . import alloc

    seconds = 0.3 if quick else 1.5
    configs = [(1, 1), (1, 64), (2, 64)] if quick else [(1, 1), (1, 64), (2, 1), (2, 64)]
    rows: list[dict[str, Any]] = []
    table: list[list[str]] = []
    for procs, batch in configs:
        pool = alloc.measure("pool", procs, batch, seconds)
        local = alloc.measure("local", procs, batch, seconds)
        r = {"procs": procs, "batch": batch, "seconds": seconds, "pool_block_ops_per_s": pool["block_ops_per_s"],
             "baseline_block_ops_per_s": local["block_ops_per_s"],
             "pool_vs_baseline": common.ratio(pool["block_ops_per_s"], local["block_ops_per_s"])}
        rows.append(r)
        table.append([str(procs), str(batch), _m(r["pool_block_ops_per_s"]), _m(r["baseline_block_ops_per_s"]),
                      common.fmt_ratio(r["pool_vs_baseline"])])
    return {"baseline": "a process-private Python free list (list slice + extend), same harness",
            "rows": rows,
            "table": {"header": ["processes", "batch", "pool block ops/s", "private free list block ops/s",
                                 "pool vs baseline"], "rows": table},
            "notes": ["a block op is one allocation or one free; the pool's blocks are shared by every process, "
                      "the baseline's by none"]}


def bench_publish_acquire(quick: bool) -> dict[str, Any]:
    from .publish_acquire import bench_size

    sizes, reps = ([256 << 10, 4 << 20], 3) if quick else ([64 << 10, 1 << 20, 4 << 20, 64 << 20], 5)
    rows: list[dict[str, Any]] = []
    table: list[list[str]] = []
    for size in sizes:
        r = bench_size(size, reps)
        r["reps"] = reps
        rows.append(r)
        table.append([common.fmt_bytes(r["bytes"]), f"{r['geometry']}, {common.fmt_bytes(r['block_bytes'])} blocks",
                      f"{r['publish_gbps']:.2f}", f"{r['copy_to_gbps']:.2f}", f"{r['memcpy_gbps']:.2f}",
                      common.fmt_ratio(r["publish_vs_memcpy"]), common.fmt_ratio(r["copy_to_vs_memcpy"])])
    return {"baseline": "numpy.copyto of the same bytes between two pre-touched buffers, one thread",
            "rows": rows,
            "table": {"header": ["KV", "geometry", "publish GB/s", "copy_to GB/s", "memcpy GB/s",
                                 "publish vs memcpy", "copy_to vs memcpy"], "rows": table},
            "notes": [f"median of {reps}; the pool is prefaulted; publish writes fresh blocks each repetition"]}


def bench_match(quick: bool) -> dict[str, Any]:
    from .publish_acquire import baseline_latency, bench_latency

    reps, loops, sample_s = (5, 500, 0.02) if quick else (7, 2000, 0.2)
    pool = bench_latency(reps, loops, sample_s)
    base = baseline_latency(reps, loops, sample_s)
    ops = [("match (128 keys)", "match_128_keys_us", "match_128_keys_us"),
           ("match, keys pre-joined", "match_128_keys_prejoined_us", "match_128_keys_us"),
           ("acquire + release (128 blocks)", "acquire_release_128_us", "acquire_release_128_us"),
           ("block_keys (128 blocks of 16 tokens)", "block_keys_128_blocks_us", None)]
    rows: list[dict[str, Any]] = []
    table: list[list[str]] = []
    for label, pk, bk in ops:
        b = base[bk] if bk else None
        r: dict[str, Any] = {"operation": label, "pool_us": pool[pk], "baseline_us": b,
                             "pool_vs_baseline": common.ratio(b, pool[pk])}
        rows.append(r)
        table.append([label, f"{pool[pk]:.2f} us", "-" if b is None else f"{b:.2f} us",
                      common.fmt_ratio(r["pool_vs_baseline"])])
    return {"baseline": "a process-private Python dict from block key to block id (a single engine's prefix cache)",
            "rows": rows,
            "table": {"header": ["operation", "pool", "dict baseline", "pool vs baseline"], "rows": table},
            "notes": [f"median of {reps} samples of up to {loops} calls ({sample_s * 1e3:g} ms) from Python; "
                      "block_keys has no baseline (both sides need keys)"]}


def _transports() -> tuple[list[str], dict[str, str]]:
    """pool and tcp always; nixl and mooncake when they can run here."""
    names, skipped = ["pool", *common.POOL_MODES, "tcp"], {}
    for name in ("nixl", "mooncake"):
        reason = common.transport_status(name)
        if reason is None:
            names.append(name)
        else:
            skipped[name] = reason
    return names, skipped


def _with_skips_and_errors(out: dict[str, Any], skipped: Any, errors: dict[str, Any]) -> dict[str, Any]:
    """Note the transports that were not available; raise _PartialFailure (keeping ``out``) if any failed."""
    if skipped:
        out["notes"].append("not available here, skipped: " + ", ".join(sorted(skipped)))
    if errors:
        out["transport_errors"] = errors
        raise _PartialFailure(out, "; ".join(f"{n}: {_first_line_of_failure(e)}" for n, e in errors.items()))
    return out


def _first_line_of_failure(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "failed"


def bench_handoff(quick: bool) -> dict[str, Any]:
    from . import handoff

    sizes = [common.parse_size(s) for s in (handoff.QUICK_SIZES if quick else "16K,256K,4M,64M").split(",")]
    # bench/handoff.py's repetition counts scaled down (its --quick 3 repetitions are a smoke test,
    # too few for a median worth printing); at most 60 per pool (see handoff.reps_for)
    layers, scale, budget = 32, (0.2 if quick else 0.5), (60.0 if quick else 300.0)
    names, skipped = _transports()
    memcpy: dict[int, list[float]] = {s: [] for s in sizes}

    def measure_memcpy() -> None:
        for s in sizes:
            memcpy[s] += common.memcpy_times(s, max(5, handoff.reps_for(s, scale, False)[0] // 3))

    med: dict[str, dict[int, float | None]] = {}
    errors: dict[str, str] = {}
    for name in names:  # memcpy before every transport and once at the end: same conditions, pooled
        measure_memcpy()
        res = handoff.run_transport(name, sizes, layers=layers, reps_scale=scale, budget=budget)
        if res["error"]:
            errors[name] = res["error"]
        med[name] = {s: (res["sizes"].get(s) or {}).get("handoff_s", {}).get("median") for s in sizes}
    measure_memcpy()
    mc = {s: common.median(memcpy[s]) for s in sizes}
    others = ["memcpy"] + [n for n in names if n != "pool"]
    rows: list[dict[str, Any]] = []
    table: list[list[str]] = []
    for s in sizes:
        r: dict[str, Any] = {"bytes": s, "memcpy_s": mc[s]}
        for n in names:
            r[f"{n}_s"] = med[n][s]
        for o in others:
            r[f"pool_vs_{o}"] = common.ratio(r[f"{o}_s"], med["pool"][s])
        rows.append(r)
        table.append([common.fmt_bytes(s)] + [common.fmt_time(r[f"{n}_s"]) for n in ["memcpy"] + names]
                     + [common.fmt_ratio(r[f"pool_vs_{o}"]) for o in others])
    reps = {common.fmt_bytes(s): handoff.reps_for(s, scale, False)[0] for s in sizes}
    out: dict[str, Any] = {
        "baseline": "memcpy (numpy.copyto, one thread) and the other transports, measured in the same run",
        "rows": rows, "skipped": skipped, "transports": names,
        "table": {"header": ["size", "memcpy"] + names + [f"pool vs {o}" for o in others], "rows": table},
        "notes": [f"median time from send() start to the consumer's wait() returning with the bytes, two processes, "
                  f"{layers} layers; repetitions per size: " + ", ".join(f"{k} {v}" for k, v in reps.items())],
    }
    return _with_skips_and_errors(out, skipped, errors)


def bench_prefix_reuse(quick: bool) -> dict[str, Any]:
    from . import prefix_reuse as pr

    w = pr.Workload.quick() if quick else pr.Workload(requests=16, prompts=4, prefix_tokens=512,
                                                        suffix_tokens="32,128", layers=8)
    plan = pr.make_plan(w)
    names, skipped = _transports()
    summaries: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    for name in names:
        res = pr.run_transport(name, w, plan, budget=60.0 if quick else 300.0)
        if res["error"]:
            errors[name] = res["error"]
        summaries[name] = res["summary"]
    pool = summaries["pool"]
    rows: list[dict[str, Any]] = []
    table: list[list[str]] = []
    for name in names:
        s = summaries[name]
        med = s["handoff_s"]["median"]
        r = {"transport": name, "requests": s["requests"], "bytes_moved": s["bytes_moved"],
             "bytes_requested": s["bytes_requested"], "cached_blocks": s["cached_blocks"], "blocks": s["blocks"],
             "handoff_median_s": med, "send_return_repeat_median_s": s["send_return_repeat_s"]["median"],
             "pool_vs_this_time": common.ratio(med, pool["handoff_s"]["median"]),
             "pool_vs_this_bytes": common.ratio(s["bytes_moved"], pool["bytes_moved"])}
        rows.append(r)
        table.append([name, f"{common.fmt_bytes(s['bytes_moved'])} of {common.fmt_bytes(s['bytes_requested'])}",
                      f"{s['cached_blocks']} / {s['blocks']}", common.fmt_time(med),
                      common.fmt_time(r["send_return_repeat_median_s"]), common.fmt_ratio(r["pool_vs_this_time"]),
                      common.fmt_ratio(r["pool_vs_this_bytes"])])
    from pykvshm import KVSpec

    out: dict[str, Any] = {"baseline": "the other transports, which move every block of every request",
           "rows": rows, "skipped": skipped, "transports": names,
           "workload": dataclasses.asdict(w), "block_bytes": KVSpec(**w.spec).block_bytes,
           "table": {"header": ["transport", "bytes moved", "blocks from the pool's cache", "handoff (median)",
                                "repeats: producer's send", "pool vs this: time", "pool vs this: bytes"],
                     "rows": table},
           "notes": [f"{w.requests} requests over {w.prompts} prompts of {w.prefix_tokens} tokens plus "
                     f"{w.suffix_tokens.replace(',', '-')} unique tokens, {w.layers} layers, "
                     f"{common.fmt_bytes(KVSpec(**w.spec).block_bytes)} blocks; the pool's consumer still copies "
                     f"every block out of the pool"]}
    return _with_skips_and_errors(out, skipped, errors)


class _PartialFailure(Exception):
    """A benchmark that measured something but not everything: keep its figures, report the failure."""

    def __init__(self, result: dict[str, Any], message: str) -> None:
        super().__init__(message)
        self.result = result


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    script: str  # the full version in bench/
    fn: Callable[[bool], dict[str, Any]]


def bench_connector_load(quick: bool) -> dict[str, Any]:
    """The vLLM connector's load path, run in the vLLM environment (it needs vLLM importable)."""
    import json
    import subprocess
    import tempfile

    from pykvshm.integrations.vllm_env import vllm_python

    exe = vllm_python()
    if exe is None:
        return {"rows": [], "notes": ["not run: no vLLM environment (scripts/setup_vllm_env.sh makes one)"],
                "skipped": {"connector_load": "no vLLM environment"}}
    mib, runs, reps = (8, 3, 3) if quick else (32, 3, 7)
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.json")
        r = subprocess.run([exe, "-m", "pykvshm.benchmarks.connector_load", "--mib", str(mib), "--runs", str(runs),
                            "--reps", str(reps), "--json", out], capture_output=True, text=True, timeout=900,
                           cwd="/")
        if r.returncode != 0:
            raise RuntimeError((r.stderr.strip().splitlines() or ["connector_load failed"])[-1])
        with open(out) as f:
            res = json.load(f)
    modes = res["modes"]
    rows = [{"mode": m, "median_s": v["median_s"], "vs_memcpy": v["vs_memcpy"]} for m, v in modes.items()]
    table = [[m, common.fmt_time(v["median_s"]), f"{v['GBps']:.1f} GB/s", f"{v['vs_memcpy']:.2f}x"]
             for m, v in modes.items()]
    return {"baseline": "numpy.copyto of the same bytes, same run", "rows": rows,
            "table": {"header": ["mode", "time", "rate", "time vs one memcpy"], "rows": table},
            "notes": [f"{res['bytes'] >> 20} MiB prefix into vLLM CPU KV tensors ({res['geometry']}), median of "
                      f"{runs} runs; layerwise = the connector's default (one queued gather per layer)"]}


def bench_tier(quick: bool) -> dict[str, Any]:
    """The cluster tier: promote from Mooncake Store vs recomputing the prefix (a torch layer stack)."""
    from pykvshm.testing.mooncake import mooncake_available

    ok, why = mooncake_available()
    if not ok:
        return {"rows": [], "notes": [f"not run: {why}"], "skipped": {"tier": why}}
    from . import tier

    res = tier.measure([256, 1024] if quick else [256, 1024, 4096], 3)
    m = res["recompute_model"]
    return {"baseline": f"recomputing the prefix: prefill of a {m['layers']}-layer torch stack of the same KV "
                        f"geometry (hidden {m['hidden']}, float32, {m['torch_threads']} CPU thread)",
            "rows": res["rows"], "table": tier.table(res),
            "notes": [f"Mooncake Store on loopback (TCP); {common.fmt_bytes(res['spec']['block_bytes'])} blocks; "
                      f"median (min..max) of {res['runs']} runs, fresh keys each run"]}


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("alloc", "allocator: alloc + free block ops/s, 1 and 2 processes", "bench/alloc.py", bench_alloc),
    Benchmark("publish_acquire", "publish and copy_to GB/s against memcpy", "bench/publish_acquire.py",
              bench_publish_acquire),
    Benchmark("match", "match and acquire latency of a 128-block prompt", "bench/publish_acquire.py", bench_match),
    Benchmark("handoff", "request handoff between two processes: pool vs TCP (NIXL, Mooncake if installed)",
              "bench/handoff.py", bench_handoff),
    Benchmark("prefix_reuse", "shared-prefix requests: bytes moved and handoff time, pool vs TCP",
              "bench/prefix_reuse.py", bench_prefix_reuse),
    Benchmark("connector_load", "vLLM connector: a prefix loaded into vLLM's CPU KV tensors vs one memcpy",
              "python -m pykvshm.benchmarks.connector_load", bench_connector_load),
    Benchmark("tier", "cluster tier: a prefix promoted from Mooncake Store vs recomputed", "bench/tier.py",
              bench_tier),
)}


# -- running and reporting --------------------------------------------------------------------------
def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def run(names: list[str], *, quick: bool, progress: IO[str] | None = None) -> dict[str, Any]:
    """Run the named benchmarks in order; one progress line per benchmark on ``progress``.

    A benchmark that fails is reported under ``errors`` (the others still run). Every pool the
    suite created is gone when this returns, whether it returns or raises (^C included).
    """
    from pykvshm import __version__

    report: dict[str, Any] = {"pykvshm": __version__, "quick": quick, "environment": common.environment(),
                              "ratio": "pykvshm vs baseline = baseline time / pykvshm time (or pykvshm rate / "
                                       "baseline rate): above 1 means pykvshm is faster",
                              "benchmarks": {}, "errors": {}}
    try:
        for i, name in enumerate(names, 1):
            b = BENCHMARKS[name]
            if progress is not None:
                progress.write(f"pykvshm bench: [{i}/{len(names)}] {name}: {b.title} ... ")
                progress.flush()
            t = time.monotonic()
            error = None
            try:
                result = b.fn(quick)
            except _PartialFailure as e:
                result, error = e.result, str(e)
            except Exception as e:  # noqa: BLE001 - one benchmark failing must not stop the others
                result, error = {}, one_line(e)
            seconds = time.monotonic() - t
            if progress is not None:
                progress.write(f"{seconds:.1f} s\n" if error is None else f"failed after {seconds:.1f} s\n")
                progress.flush()
            report["benchmarks"][name] = {"name": name, "title": b.title, "full_script": b.script,
                                          "seconds": seconds, "error": error, **result}
            if error is not None:
                report["errors"][name] = error
    finally:
        common.destroy_scratch_pools()
    return report


def render(report: dict[str, Any]) -> str:
    """Human output: a markdown table per benchmark, its baseline and notes."""
    env = report["environment"]
    out = [f"pykvshm {report['pykvshm']} benchmarks ({'quick' if report['quick'] else 'standard'} run), "
           f"{env.get('cpus')} CPUs, Python {env.get('python')}, {env.get('time')}",
           "pykvshm vs baseline = baseline time / pykvshm time: above 1 means pykvshm is faster. "
           "Ratios come from one run on this machine; the full scripts are in bench/."]
    for name, r in report["benchmarks"].items():
        out.append("")
        out.append(f"## {name}: {r['title']}")
        if r.get("table"):
            out.append(common.markdown_table(r["table"]["header"], r["table"]["rows"]))
        if r.get("baseline"):
            out.append(f"baseline: {r['baseline']}")
        for note in r.get("notes", []):
            out.append(note)
        if r.get("error"):
            out.append(f"FAILED: {r['error']}")
    return "\n".join(out)


def listing() -> list[dict[str, str]]:
    return [{"name": b.name, "title": b.title, "full_script": b.script} for b in BENCHMARKS.values()]

