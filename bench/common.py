"""Helpers for the full benchmark scripts in bench/ (handoff, streaming, prefix_reuse, ...).

The plumbing they share with the packaged suite (``pykvshm bench``) lives in
:mod:`pykvshm.benchmarks.common` and is re-exported here, so the scripts keep writing
``common.run_pair``, ``common.summary``, ...: transports and ``make_side``, the two-process runner
``run_pair``, scratch pools, timing, statistics and formatting. What only the scripts need stays
here: the results folder, tqdm progress bars, JSON files and plots.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from pykvshm.benchmarks.common import (
    ALL_TRANSPORTS,
    HANDOFF_TRANSPORTS,
    POOL_MODES,
    is_pool,
    TRANSPORT_OPTIONS,
    Link,
    close_after_peer,
    destroy_scratch_pools,
    environment,
    fmt_bytes,
    fmt_ratio,
    fmt_time,
    make_side,
    markdown_table,
    median,
    memcpy_times,
    now,
    parse_size,
    pool_capacity,
    ratio,
    run_pair,
    scratch_pool,
    select_transports,
    summary,
    transport_status,
    unique_pool_name,
    warm_pool_in_turn,
    warm_pool_mapping,
)

__all__ = [
    "ALL_TRANSPORTS",
    "HANDOFF_TRANSPORTS",
    "POOL_MODES",
    "is_pool",
    "Link",
    "RESULTS_DIR",
    "TRANSPORT_OPTIONS",
    "close_after_peer",
    "destroy_scratch_pools",
    "environment",
    "fmt_bytes",
    "fmt_ratio",
    "fmt_time",
    "make_side",
    "markdown_table",
    "median",
    "memcpy_times",
    "now",
    "parse_size",
    "pool_capacity",
    "progress_bar",
    "pyplot",
    "ratio",
    "run_pair",
    "save_figure",
    "scratch_pool",
    "select_transports",
    "summary",
    "transport_status",
    "unique_pool_name",
    "warm_pool_in_turn",
    "warm_pool_mapping",
    "write_json",
]

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# -- progress bars ----------------------------------------------------------------------------------
class _NoBar:
    def __init__(self, **_: Any) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool = True):
    """A tqdm bar on stderr (a silent stand-in when tqdm is missing or ``enabled`` is false)."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="rep", leave=False, file=sys.stderr, dynamic_ncols=True)


# -- reporting --------------------------------------------------------------------------------------
def write_json(path: str, report: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        report.setdefault("environment", {})["loadavg_at_end"] = os.getloadavg()
    except OSError:
        pass
    with open(path, "w") as f:
        json.dump(report, f, indent=2, default=float)
        f.write("\n")
    print(f"wrote {path}")


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None (with a printed reason) when missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"no plot: matplotlib is missing ({e}); pip install 'pykvshm[bench]'", file=sys.stderr)
        return None
    return plt


def save_figure(fig, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"wrote {path}")
