"""The transport benchmarks run end to end in a tiny configuration (pool and TCP only).

Each script runs as its own process (``--quick``), as a user would run it, so that the spawned
benchmark children and any baseline libraries never touch the test process. NIXL and Mooncake
are left out on purpose: CI does not install them. Checks the exit status and the JSON keys.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_bench(script: str, out_dir: Path) -> dict:
    cmd = [sys.executable, str(BENCH / script), "--quick", "--transports", "pool,tcp", "--out-dir", str(out_dir),
           "--no-progress", "--budget", "60"]
    env = dict(os.environ, MPLBACKEND="Agg")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return json.loads((out_dir / script.replace(".py", ".json")).read_text())


def check_common(report: dict, name: str) -> None:
    for key in ("benchmark", "environment", "config", "skipped", "errors", "results"):
        assert key in report, key
    assert report["benchmark"] == name
    assert report["errors"] == {}
    assert report["skipped"] == {}
    assert set(report["results"]) == {"pool", "tcp"}


def test_handoff_quick(tmp_path: Path) -> None:
    report = run_bench("handoff.py", tmp_path)
    check_common(report, "handoff")
    assert set(report["memcpy_s"]) == {"16KiB", "1MiB"}
    for name in ("pool", "tcp"):
        for size in ("16KiB", "1MiB"):
            r = report["results"][name][size]
            for key in ("handoff_s", "send_return_s", "prepare_s", "GBps", "vs_pool", "vs_memcpy"):
                assert key in r, (name, size, key)
            assert r["handoff_s"]["n"] >= 3
            assert r["handoff_s"]["median"] > 0
    assert report["results"]["pool"]["1MiB"]["vs_pool"] == pytest.approx(1.0)


def test_streaming_quick(tmp_path: Path) -> None:
    report = run_bench("streaming.py", tmp_path)
    check_common(report, "streaming")
    for name in ("pool", "tcp"):
        for mode in ("overlap", "no-overlap"):
            r = report["results"][name][mode]
            for key in ("total_s", "after_prefill_s", "prefill_s", "first_layer_s", "median_layer_timeline_ms",
                        "vs_pool_overlap"):
                assert key in r, (name, mode, key)
            assert r["total_s"]["n"] >= 3
            assert len(r["median_layer_timeline_ms"]["arrived"]) == report["config"]["layers"]
    assert "targets" in report


def test_prefix_reuse_quick(tmp_path: Path) -> None:
    report = run_bench("prefix_reuse.py", tmp_path)
    check_common(report, "prefix_reuse")
    pool, tcp = report["results"]["pool"]["summary"], report["results"]["tcp"]["summary"]
    for s in (pool, tcp):
        for key in ("requests", "bytes_moved", "bytes_requested", "cached_blocks", "handoff_s",
                    "handoff_first_of_prompt_s", "handoff_repeat_s", "prepare_s"):
            assert key in s, key
        assert s["requests"] == report["config"]["requests"]
    # the pool serves repeated prefixes from the pool; tcp moves everything
    assert pool["cached_blocks"] > 0
    assert pool["bytes_moved"] < tcp["bytes_moved"] == tcp["bytes_requested"]
    assert len(report["results"]["pool"]["requests"]) == report["config"]["requests"]


def test_coherence_quick(tmp_path: Path) -> None:
    out = tmp_path / "coherence.json"
    proc = subprocess.run([sys.executable, str(BENCH / "coherence.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    report = json.loads(out.read_text())
    assert report["benchmark"] == "coherence"
    for mode in ("coherent", "noncoherent"):
        r = report["throughput"]["256KiB"][mode]
        assert r["publish_gbps"] > 0 and r["acquire_copy_gbps"] > 0
        assert report["latency"][mode]["match_128_keys_us"] > 0
        assert report["alloc"][mode]["1proc_batch64_block_ops_per_s"] > 0
    # the coherent pool writes nothing back; the noncoherent one writes back at least its bytes
    assert report["throughput"]["256KiB"]["coherent"]["bytes_written_back_per_byte"] == 0
    assert report["throughput"]["256KiB"]["noncoherent"]["bytes_written_back_per_byte"] >= 1
