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
    summary = tail.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, tail
