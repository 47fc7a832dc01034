"""PykvshmConnector under vLLM's real scheduler, without a model: tests/integrations/vllm_env/,
run by the vLLM environment's pytest (the main environment has no vLLM)."""

from __future__ import annotations

import os
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = pytest.mark.vllm


def test_scheduler_level_suite(vllm_python: str, tmp_path) -> None:
    # cwd is a scratch folder so the environment imports its installed pykvshm, not the checkout's.
    r = subprocess.run(
        [vllm_python, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(HERE, "vllm_env")],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )
    tail = (r.stdout + r.stderr)[-8000:]
    assert r.returncode == 0, tail
    # pytest's summary line ends stdout; the Mooncake client (tier tests) logs to stderr at exit.
    summary = r.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, tail


def test_connector_load_benchmark_is_bit_exact(vllm_python: str, tmp_path) -> None:
    """The load benchmark's load paths (layer-wise queued, synchronous, per-block, asynchronous) each put
    the published prefix into scattered engine blocks of vLLM-shaped CPU KV tensors, checked byte
    for byte inside the benchmark (a tiny size: correctness, not speed)."""
    out = tmp_path / "r.json"
    r = subprocess.run([vllm_python, "-m", "pykvshm.benchmarks.connector_load", "--mib", "4", "--runs", "1", "--reps",
                        "1", "--json", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    import json

    res = json.loads(out.read_text())
    assert res["blocks"] == 2 and set(res["modes"]) == {"layerwise", "sync", "per-block", "async-start",
                                                         "async-landed", "memcpy"}
    assert all(v["median_s"] > 0 for v in res["modes"].values())
