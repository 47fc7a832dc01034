"""Fixtures for tests that run real vLLM engines; they skip when no vLLM environment exists.

pytest runs with --import-mode=importlib, which puts no test folder on sys.path, so this
conftest makes `import vllm_support` work for the test files beside it.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import vllm_support  # noqa: E402


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """The vLLM environment's interpreter (scripts/setup_vllm_env.sh); skips the test without it."""
    exe = vllm_support.vllm_python()
    if exe is None:
        from pykvshm.integrations.vllm_env import missing_hint

        if os.environ.get("PYKVSHM_REQUIRE_VLLM") == "1":
            pytest.fail(f"PYKVSHM_REQUIRE_VLLM=1 but {missing_hint()}", pytrace=False)
        pytest.skip(missing_hint())
    return exe


@pytest.fixture(scope="session")
def tiny_llama(vllm_python: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A seeded random Llama written once per session (config and weights, no tokenizer)."""
    return vllm_support.write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
