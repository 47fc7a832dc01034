"""Tests that import vLLM itself; they run inside the vLLM environment (pool_name and the
session chdir come from tests/conftest.py).

The main test session (which has no vLLM) does not collect them; tests/integrations/
test_vllm_scheduler.py runs this folder with the vLLM environment's pytest instead.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

collect_ignore_glob = [] if importlib.util.find_spec("vllm") else ["test_*.py"]


def pytest_configure(config: pytest.Config) -> None:
    # vLLM and torch warn about their own deprecations at import; those are not ours.
    # Later entries win: warnings raised from pykvshm's modules still fail the test.
    for line in ("ignore::DeprecationWarning", "ignore::PendingDeprecationWarning", "ignore::FutureWarning",
                 "ignore::UserWarning", "error:::pykvshm"):
        config.addinivalue_line("filterwarnings", line)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    import harness

    return harness.write_model_config(str(tmp_path_factory.mktemp("tiny-llama-config")))
