"""The main job, reduced: `pykvshm demo` on real vLLM engines, pool beside recompute."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pykvshm.testing import unique_name

pytestmark = pytest.mark.vllm


def test_demo_on_vllm_engines(vllm_python, tmp_path) -> None:
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "pykvshm", "demo", "--engine", "vllm", "--vllm-python", vllm_python,
           "--requests", "6", "--prompt-tokens", "160", "--shared-prefix", "96", "--shared-fraction", "0.7",
           "--new-tokens", "6", "--rate", "10", "--baselines", "recompute", "--capacity", "128MiB",
           "--pool", unique_name("vdemo"), "--out", str(out)]
    from pykvshm.integrations.vllm_env import shm_segments

    shm_before = shm_segments()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "every output token-identical to the single-engine run: yes" in r.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] is True and report["engine"] == "vllm"
    by = {s["transport"]: s for s in report["summaries"]}
    assert set(by) == {"pool", "recompute"}  # the baseline ran beside the pool
    for s in by.values():
        assert s["requests"] == 6 and s["tokens_identical"] == 6 and not s["error"]
    assert by["pool"]["shared_prefix_hit_tokens"] > 0  # requests sharing the system prompt hit a cache
    assert by["pool"]["decode_kv_tokens_from_transfer"] > 0  # the decode engine got its KV from the pool
    assert report["pool_load_ms"], "the decode engine's pool loads were timed"
    assert (out / "latency.png").stat().st_size > 1000
    # The engines' shared memory (vLLM's message queues, ~200 MiB each) went with them.
    assert shm_segments() - shm_before == set()
