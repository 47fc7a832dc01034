"""The README's usage example runs as written."""

from __future__ import annotations

import pathlib
import re

import pykvshm

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs() -> None:
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the README has no Python example"
    try:
        pykvshm.Pool.destroy("readme-pool")
    except pykvshm.errors.PoolNotFoundError:
        pass
    for code in blocks:
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    assert not pathlib.Path("/dev/shm/readme-pool").exists()
