"""bench/tier.py runs end to end in a tiny configuration and reports what docs/benchmarks.md quotes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .conftest import need_mooncake

BENCH = Path(__file__).resolve().parents[2] / "bench" / "tier.py"


def test_tier_benchmark_quick(tmp_path: Path) -> None:
    need_mooncake()
    cmd = [sys.executable, str(BENCH), "--tokens", "32,64", "--runs", "3", "--layers", "2", "--out-dir", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "tier.json").read_text())
    assert report["benchmark"] == "tier" and report["runs"] == 3
    assert [row["tokens"] for row in report["rows"]] == [32, 64]
    for row in report["rows"]:
        assert row["blocks"] == row["tokens"] // 16
        for k in ("promote_s", "recompute_s"):
            assert 0 < row[k]["min"] <= row[k]["median"] <= row[k]["max"]
        assert row["promote_bytes_per_s"] > 0 and row["recompute_vs_promote"] > 0
