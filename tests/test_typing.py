"""The package's type hints and the hand-written stubs of the extension hold together (mypy)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("mypy")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mypy_passes_on_the_package(tmp_path) -> None:
    # The sources of the repository (the installed copy sits in site-packages, which mypy
    # refuses to check by path); _core.pyi stands in for the extension.
    pkg = os.path.join(ROOT, "pykvshm")
    files = [os.path.join(pkg, f) for f in ("__init__.py", "pool.py", "spec.py", "keys.py", "errors.py", "cli.py", "exporter.py",
                                             "_arrays.py", os.path.join("transfer", "stream.py"),
                                             os.path.join("integrations", "vllm_env.py"),
                                             *(os.path.join("integrations", f) for f in (
                                                 "engine_keys.py", "engines_env.py", os.path.join("sglang", "storage.py"),
                                                 os.path.join("lmcache", "backend.py"))),
                                             *(os.path.join("integrations", "vllm", f) for f in (
                                                 "__init__.py", "config.py", "connector.py", "metadata.py",
                                                 "scheduler.py", "worker.py")),
                                             *(os.path.join("tier", f) for f in (
                                                 "__init__.py", "config.py", "format.py", "store.py", "tier.py")),
                                             os.path.join("testing", "mooncake.py"), os.path.join("testing", "tier_rack.py"),
                                             os.path.join("benchmarks", "tier.py"),
                                             *(os.path.join("vllm_demo", f) for f in (
                                                 "command.py", "driver.py", "engine.py", "engines.py")))]
    r = subprocess.run([sys.executable, "-m", "mypy", "--ignore-missing-imports", "--follow-imports=silent", "--no-incremental",
                        "--cache-dir", str(tmp_path), *files], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert os.path.exists(os.path.join(pkg, "py.typed")) and os.path.exists(os.path.join(pkg, "_core.pyi"))
