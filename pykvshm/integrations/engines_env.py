"""Finding the Python environments that run SGLang and LMCache with pykvshm (standard
library only), made by scripts/setup_engines_env.sh.  Each framework gets its own
environment: SGLang 0.5.23 pins torch 2.14.1 and CUDA kernels, LMCache 0.5.6 pins
numpy<=2.2.6 and protobuf<7, and neither may disturb the main or the vLLM environment.
"""

from __future__ import annotations

import functools
import os
import subprocess

DEFAULT_ROOT = os.path.join(os.path.expanduser("~"), ".cache", "pykvshm")
ENGINES = {
    # name: (environment variable, default venv, import probe)
    "sglang": ("PYKVSHM_SGLANG_PYTHON", os.path.join(DEFAULT_ROOT, "sglang-venv"),
               "import pykvshm.integrations.sglang, sglang.srt.managers.cache_controller"),
    "lmcache": ("PYKVSHM_LMCACHE_PYTHON", os.path.join(DEFAULT_ROOT, "lmcache-venv"),
                "import pykvshm.integrations.lmcache, lmcache.v1.cache_engine"),
}


@functools.cache
def engine_python(name: str) -> str | None:
    """The interpreter that runs ``name`` ("sglang" or "lmcache") with pykvshm, or None."""
    var, venv, probe = ENGINES[name]
    exe = os.environ.get(var) or os.path.join(venv, "bin", "python")
    if not os.access(exe, os.X_OK):
        return None
    r = subprocess.run([exe, "-c", probe], capture_output=True, text=True, timeout=300, cwd=os.path.expanduser("~"))
    return exe if r.returncode == 0 else None


def missing_hint(name: str) -> str:
    var, venv, _ = ENGINES[name]
    return (f"no {name} environment found: run scripts/setup_engines_env.sh {name} (creates {venv}) "
            f"or point {var} at a Python that has {name} and pykvshm")
