"""The package's type hints and the hand-written stubs of the extension hold together (mypy)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import pykvshm

pytest.importorskip("mypy")


def test_mypy_passes_on_the_package(tmp_path) -> None:
    pkg = os.path.dirname(pykvshm.__file__)
    files = [os.path.join(pkg, f) for f in ("__init__.py", "pool.py", "spec.py", "keys.py", "errors.py", "cli.py",
                                             "_arrays.py", os.path.join("transfer", "stream.py"))]
    r = subprocess.run([sys.executable, "-m", "mypy", "--ignore-missing-imports", "--no-incremental",
                        "--cache-dir", str(tmp_path), *files], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert os.path.exists(os.path.join(pkg, "py.typed")) and os.path.exists(os.path.join(pkg, "_core.pyi"))
