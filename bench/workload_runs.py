"""Per-run table and median [min..max] over runs of `pykvshm demo --workload multiturn|rag`.

Each run's ratios against a reference alternative (default ``prefix``: vLLM's own prefix cache per
server) are formed inside the run (same machine state, same load), then summarised over runs.

    for i in 1 2 3; do pykvshm demo --workload rag --out /tmp/rag$i; done
    python bench/workload_runs.py /tmp/rag1/report.json /tmp/rag2/report.json /tmp/rag3/report.json

Prints Markdown: one row per run and alternative, then the ratios (reference / pool for TTFT, pool /
reference for throughput: above 1 means the pool is better) with their median and spread.
"""

from __future__ import annotations

import argparse
import json
import statistics


def spread(xs: list[float], fmt: str = "{:.2f}") -> str:
    if not xs:
        return "-"
    return f"{fmt.format(statistics.median(xs))} [{fmt.format(min(xs))}..{fmt.format(max(xs))}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", nargs="+")
    ap.add_argument("--reference", default="prefix")
    a = ap.parse_args()
    runs = []
    for path in a.reports:
        with open(path) as f:
            runs.append(json.load(f))
    print("| run | alternative | tokens = | cached | computed prompt tokens | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 "
          "| req/s | output tok/s | load avg after (1/5/15 min) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    ratios: dict[str, list[float]] = {"ttft_p50": [], "ttft_p99": [], "tpot_p99": [], "throughput": []}
    for k, r in enumerate(runs, 1):
        for s in r["summaries"]:
            la = "/".join(f"{x:.1f}" for x in s["loadavg"][3:])
            print(f"| {k} | {s['alternative']} | {s['tokens_identical']}/{s['requests']} | {100 * s['cached_share']:.0f}% "
                  f"| {s.get('computed_prompt_tokens', s['prompt_tokens'] * (1 - s['cached_share'])):.0f} "
                  f"| {s['ttft_ms_p50']:.0f} ms | {s['ttft_ms_p99']:.0f} ms | {s['tpot_ms_p50']:.0f} ms "
                  f"| {s['tpot_ms_p99']:.0f} ms | {s['request_throughput']:.3f} | {s['output_throughput']:.2f} | {la} |")
        for alt, why in r.get("failed", {}).items():
            print(f"| {k} | {alt} | could not run: {why.split('; end of ')[0]} |||||||||")
        for s in r["summaries"]:
            if s.get("fell_behind"):
                print(f"| {k} | {s['alternative']} | fell behind the arrivals: {s['duration_s']:.0f} s for "
                      f"~{s['arrivals_span_s']:.0f} s of arrivals |||||||||")
        by = {s["alternative"]: s for s in r["summaries"]}
        if "pool" in by and a.reference in by:
            p, ref = by["pool"], by[a.reference]
            ratios["ttft_p50"].append(ref["ttft_ms_p50"] / p["ttft_ms_p50"])
            ratios["ttft_p99"].append(ref["ttft_ms_p99"] / p["ttft_ms_p99"])
            ratios["tpot_p99"].append(ref["tpot_ms_p99"] / p["tpot_ms_p99"])
            ratios["throughput"].append(p["output_throughput"] / ref["output_throughput"])
    print()
    n = len(ratios["ttft_p50"])
    print(f"Pool against `{a.reference}`, median [min..max] over {n} runs (ratios formed within each run; above 1: "
          "the pool is better):")
    print()
    print("| TTFT p50 lower by | TTFT p99 lower by | TPOT p99 lower by | output throughput higher by |")
    print("|---|---|---|---|")
    print(f"| {spread(ratios['ttft_p50'])}x | {spread(ratios['ttft_p99'])}x | {spread(ratios['tpot_p99'])}x "
          f"| {spread(ratios['throughput'])}x |")
    print()
    print("per run: " + "; ".join(f"{k}: " + ", ".join(f"{v[i]:.2f}" for v in ratios.values())
                                   for i, k in enumerate(range(1, n + 1))))


if __name__ == "__main__":
    main()
