"""Median and spread over several runs of bench/handoff.py or bench/streaming.py.

Each run's figure is that run's median; a ratio (transport / reference) is formed inside each run
(same machine state), and the table shows the median over runs and [min..max] across runs.

    for i in 1 2 3; do python bench/handoff.py --out-dir /tmp/h$i; done
    python bench/runs.py /tmp/h1/handoff.json /tmp/h2/handoff.json /tmp/h3/handoff.json
    python bench/runs.py /tmp/s*/streaming.json
"""

from __future__ import annotations

import json
import statistics
import sys


def spread(xs: list[float], fmt: str) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    return f"{fmt.format(statistics.median(xs))} [{fmt.format(min(xs))}..{fmt.format(max(xs))}]"


def ms(x: float) -> str:
    return f"{x * 1e6:.0f} us" if x < 1e-3 else f"{x * 1e3:.2f} ms"


def handoff(reports: list[dict]) -> str:
    names = list(reports[0]["results"])
    sizes = list(reports[0]["memcpy_s"])
    ref = [n for n in ("nixl", "tcp") if n in names]
    out = [f"handoff, {len(reports)} runs: median of the runs' medians [min..max over runs]; ratios formed within "
           "each run", ""]
    hdr = ["size", "memcpy"] + names + [f"{n} / memcpy" for n in names if n != "nixl"]
    hdr += [f"nixl / {n}" for n in names if n.startswith("pool")] if ref and ref[0] == "nixl" else []
    out.append("| " + " | ".join(hdr) + " |")
    out.append("|" + "---|" * len(hdr))

    def med(r: dict, n: str, s: str) -> float | None:
        v = (r["results"].get(n) or {}).get(s)
        return v["handoff_s"]["median"] if v else None

    for s in sizes:
        row = [s, spread([r["memcpy_s"][s]["median"] for r in reports], "{:.6f}")]
        row[1] = spread([r["memcpy_s"][s]["median"] * 1e3 for r in reports], "{:.3f}") + " ms"
        for n in names:
            row.append(spread([(med(r, n, s) or 0) * 1e3 for r in reports], "{:.3f}") + " ms")
        for n in names:
            if n != "nixl":
                row.append(spread([med(r, n, s) / r["memcpy_s"][s]["median"] for r in reports
                                   if med(r, n, s)], "{:.2f}x"))
        if ref and ref[0] == "nixl":
            for n in names:
                if n.startswith("pool"):
                    row.append(spread([med(r, "nixl", s) / med(r, n, s) for r in reports
                                       if med(r, n, s) and med(r, "nixl", s)], "{:.2f}x"))
        out.append("| " + " | ".join(row) + " |")
    return "\n".join(out)


def streaming(reports: list[dict]) -> str:
    names = list(reports[0]["results"])
    out = [f"streaming, {len(reports)} runs: median of the runs' medians [min..max over runs]", "",
           "| transport | schedule | total | prefill | prefill stretch vs own no-overlap | all layers after prefill ends |",
           "|---|---|---|---|---|---|"]
    for n in names:
        for mode in ("overlap", "no-overlap"):
            rs = [r["results"][n].get(mode) for r in reports if r["results"].get(n)]
            rs = [x for x in rs if x]
            if not rs:
                continue
            stretch = [r["results"][n]["overlap"]["prefill_s"]["median"] /
                       r["results"][n]["no-overlap"]["prefill_s"]["median"] - 1 for r in reports
                       if mode == "overlap" and r["results"].get(n)]
            out.append(f"| {n} | {mode} | {spread([x['total_s']['median'] * 1e3 for x in rs], '{:.1f}')} ms | "
                       f"{spread([x['prefill_s']['median'] * 1e3 for x in rs], '{:.1f}')} ms | "
                       f"{spread([v * 100 for v in stretch], '{:+.1f}') + ' %' if stretch else ''} | "
                       f"{spread([x['after_prefill_s']['median'] * 1e3 for x in rs], '{:.2f}')} ms |")
    return "\n".join(out)


def main(paths: list[str]) -> int:
    reports = [json.load(open(p)) for p in paths]
    kinds = {r["benchmark"] for r in reports}
    if len(kinds) != 1:
        print(f"mixed reports: {sorted(kinds)}", file=sys.stderr)
        return 2
    print(handoff(reports) if kinds == {"handoff"} else streaming(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
