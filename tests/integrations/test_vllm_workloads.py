"""`pykvshm demo --workload multiturn|rag` reduced: two real vLLM servers behind the round-robin router,
the pool beside recompute, and `examples/vllm_disagg/serve_local.sh` on real servers.

Each workload test starts 2 + 2 servers with the tiny model shape (~2.5 min each on this shared
2-core machine; the serve_local pair, ~1.5-2 min each, is opt-in: PYKVSHM_VLLM_SERVE=1); outputs must equal the recompute run's token for token, and the pool must have served
prompt tokens to the servers from a cache (vLLM's own counters: `vllm:prompt_tokens_cached`, and
`vllm:external_prefix_cache_hits` for what the connector loaded).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pykvshm.testing import unique_name

pytestmark = pytest.mark.vllm

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REDUCED = {
    "multiturn": ["--conversations", "4", "--turns", "3", "--system-words", "64", "--user-words", "48", "--rate", "4"],
    "rag": ["--requests", "8", "--documents", "2", "--document-tokens", "128", "--question-tokens", "16", "--rate", "4"],
}


@pytest.mark.parametrize("workload", sorted(REDUCED))
def test_workload_reduced_pool_beside_recompute(vllm_python, tmp_path, workload) -> None:
    from pykvshm.integrations.vllm_env import shm_segments

    out = tmp_path / "out"
    pool = unique_name(f"wl-{workload}")
    cmd = [sys.executable, "-m", "pykvshm", "demo", "--workload", workload, "--vllm-python", vllm_python,
           "--model-shape", "tiny", "--new-tokens", "6", "--alternatives", "recompute", "--capacity", "256MiB",
           "--kv-cache-gib", "1", "--pool", pool, "--out", str(out), *REDUCED[workload]]
    shm_before = shm_segments()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "every output identical to the recompute run: yes" in r.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] is True and report["workload"] == workload and report["failed"] == {}
    by = {s["alternative"]: s for s in report["summaries"]}
    assert set(by) == {"pool", "recompute"}
    n = 12 if workload == "multiturn" else 8
    for s in by.values():
        assert s["requests"] == s["completed"] == s["tokens_identical"] == n
        assert s["ttft_ms_p50"] > 0 and s["output_throughput"] > 0
    assert by["recompute"]["cached_share"] == 0.0  # no cache at all: the reference
    assert by["pool"]["cached_share"] > 0.2  # shared system prompt / documents and histories came from a cache
    assert by["pool"]["external_hit_tokens"] > 0  # ... some of them loaded from the pool by the connector
    assert by["pool"]["served"] == [n // 2, n // 2]  # round robin over two servers
    if workload == "multiturn":
        assert by["pool"]["moved_share"] > 0  # some follow-up turns landed on the other server
    assert (out / "workload.png").stat().st_size > 1000
    assert not os.path.exists(f"/dev/shm/{pool}")  # the pool was destroyed
    assert shm_segments() - shm_before == set()  # and the servers' shared memory went with them


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PYKVSHM_VLLM_SERVE") != "1",
                    reason="two vllm serve pairs take ~1.5-2 min each here; set PYKVSHM_VLLM_SERVE=1 (the fail-fast "
                           "cases from both places run in tests/test_router_example.py)")
@pytest.mark.parametrize("where", ["repo-root", "elsewhere"])
def test_serve_local_runs_from_the_repository_root_and_elsewhere(vllm_python, tmp_path, where) -> None:
    """From the repository root the source tree (no compiled _core) must not shadow the installed
    package; the request through the router gets its prompt's full blocks from the pool."""
    model = tmp_path / "model"
    subprocess.run([vllm_python, "-m", "pykvshm.vllm_demo.model", str(model), "2", "0", "tiny"], check=True,
                   capture_output=True, cwd=str(tmp_path), timeout=300)
    cwd = REPO if where == "repo-root" else str(tmp_path / "cwd")
    os.makedirs(cwd, exist_ok=True)
    before = set(os.listdir(cwd))
    env = dict(os.environ, MODEL=str(model), PYTHON=vllm_python, POOL=unique_name("serve-local"), CAPACITY="256MiB",
               LOG_DIR=str(tmp_path / "logs"), VLLM_CPU_KVCACHE_SPACE="1",
               EXTRA_SERVER_ARGS="--dtype float32 --block-size 32 --enforce-eager --max-model-len 1024",
               PROMPT=json.dumps(" ".join(["ba", "be", "bi", "bo"] * 25)))  # 100 tokens: 3 full blocks
    r = subprocess.run(["bash", os.path.join(REPO, "examples", "vllm_disagg", "serve_local.sh")], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    reply = json.loads(r.stdout.strip().splitlines()[0])
    assert reply["usage"]["prompt_tokens"] == 100
    assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] == 96  # 3 blocks loaded from the pool
    assert set(os.listdir(cwd)) == before  # nothing written where it was started
