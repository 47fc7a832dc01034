"""The main job, reduced: prefill and decode workers on a real (tiny, seeded) transformer, through the
pool and through TCP and recompute baselines; tokens and KV must match, the shared prefix must hit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")


def test_demo_reduced(tmp_path) -> None:
    from pykvshm.testing import unique_name

    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "pykvshm.cli", "demo", "--requests", "6", "--prompt-tokens", "160",
           "--shared-prefix", "96", "--shared-fraction", "0.7", "--new-tokens", "6", "--layers", "2",
           "--hidden", "128", "--rate", "20", "--baselines", "tcp,recompute", "--engine", "transformers", "--pool", unique_name("demo"),
           "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "every output token-identical" in r.stdout and ": yes" in r.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] is True
    by = {s["transport"]: s for s in report["summaries"]}
    assert set(by) == {"pool", "tcp", "recompute"}  # the baselines ran beside the pool
    for s in by.values():
        assert s["requests"] == 6 and s["tokens_identical"] == 6 and s["kv_identical"] == 6 and not s["error"]
    assert by["pool"]["shared_prefix_hit_blocks"] > 0  # requests sharing the system prompt hit the pool
    assert by["recompute"]["prefix_hit_rate"] == 0.0
    assert (out / "latency.png").stat().st_size > 1000
