"""A Mooncake Store on loopback for tests and benchmarks: ``mooncake_master`` with its built-in
HTTP metadata service on free ports, optionally a ``mooncake_client`` storage process that
mounts the store's memory (so that the racks' own clients need mount none and a rack that dies
takes no stored object with it).

    with MooncakeCluster(workdir) as mc:
        url = mc.url()            # mooncake://127.0.0.1:P?metadata=http://127.0.0.1:M/metadata&...
        ...
        mc.kill_master(); mc.start_master()   # a master failure (objects are forgotten)

Needs the ``mooncake-transfer-engine-non-cuda`` wheel (``pip install 'pykvshm[tier]'``) and
Debian's ``libibverbs1``; :func:`mooncake_available` says why not where it is missing, and
:func:`require_mooncake` turns that into a test's skip (or its failure under ``PYKVSHM_REQUIRE_TIER=1``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def mooncake_available() -> tuple[bool, str]:
    """Whether the Mooncake Store client imports and its master binary is found; else (False, why)."""
    try:
        import mooncake.store  # noqa: F401
    except Exception as e:  # ImportError, or OSError for a missing libibverbs
        return False, f"mooncake.store cannot be imported ({type(e).__name__}: {e}); pip install 'pykvshm[tier]'"
    if _binary("mooncake_master") is None:
        return False, "the mooncake_master program (mooncake-transfer-engine-non-cuda) is not found"
    return True, ""


def require_mooncake() -> None:
    """For tests: skip (saying why) where Mooncake is missing, or fail when the environment
    demands the tier's tests run (``PYKVSHM_REQUIRE_TIER=1``, as CI sets it)."""
    import pytest

    ok, why = mooncake_available()
    if not ok:
        if os.environ.get("PYKVSHM_REQUIRE_TIER") == "1":
            pytest.fail(f"PYKVSHM_REQUIRE_TIER=1 but {why}", pytrace=False)
        pytest.skip(why)


def _binary(name: str) -> str | None:
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found:
        return found
    try:
        import mooncake

        p = Path(mooncake.__file__).parent / name
        return str(p) if p.exists() else None
    except Exception:
        return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    what = log.stem
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"the Mooncake {what} process exited ({proc.returncode}); log:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the Mooncake {what} process did not listen on 127.0.0.1:{port} within {timeout} s; "
                               f"log:\n{_tail(log)}")
        time.sleep(0.05)


def _tail(p: Path, n: int = 3000) -> str:
    try:
        return p.read_text(errors="replace")[-n:]
    except OSError:
        return ""


class MooncakeCluster:
    """``mooncake_master`` (+ HTTP metadata) and optionally one storage ``mooncake_client``, on loopback."""

    def __init__(self, workdir: Path | str, *, storage: str | None = "256MB", lease_ms: int = 5000) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.rpc_port = free_port()
        self.metadata_port = free_port()
        self.metrics_port = free_port()
        self.storage = storage
        self.lease_ms = lease_ms
        self.master: subprocess.Popen[bytes] | None = None
        self.client: subprocess.Popen[bytes] | None = None
        self._logs: list[Any] = []

    @property
    def metadata(self) -> str:
        return f"http://127.0.0.1:{self.metadata_port}/metadata"

    @property
    def master_address(self) -> str:
        return f"127.0.0.1:{self.rpc_port}"

    def url(self, segment: str = "0", buffer: str = "64MiB") -> str:
        """The tier URL for a client of this store (by default one that mounts no memory)."""
        return (f"mooncake://{self.master_address}?metadata={self.metadata}&protocol=tcp&segment={segment}"
                f"&buffer={buffer}&host=127.0.0.1")

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "ab")
        self._logs.append(log)
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                cwd=self.workdir, start_new_session=True)

    def start_master(self, timeout: float = 30.0) -> None:
        exe = _binary("mooncake_master")
        if exe is None:
            raise RuntimeError(mooncake_available()[1])
        self.master = self._spawn("master", [
            exe, f"--rpc_port={self.rpc_port}", "--rpc_address=127.0.0.1",
            "--enable_http_metadata_server=true", "--http_metadata_server_host=127.0.0.1",
            f"--http_metadata_server_port={self.metadata_port}", f"--metrics_port={self.metrics_port}",
            f"--default_kv_lease_ttl={self.lease_ms}", "--logtostderr=true"])
        _wait_port(self.rpc_port, self.master, timeout, self.workdir / "master.log")
        _wait_port(self.metadata_port, self.master, timeout, self.workdir / "master.log")

    def start_storage(self, timeout: float = 30.0) -> None:
        """A ``mooncake_client`` process that mounts ``storage`` bytes of store memory."""
        exe = _binary("mooncake_client")
        if exe is None:
            raise RuntimeError("the mooncake_client program is not found")
        self.client_port = free_port()
        self.client = self._spawn("storage", [
            exe, "--host=127.0.0.1", f"--port={self.client_port}", f"--global_segment_size={self.storage}",
            "--local_buffer_size=16MB", f"--master_server_address={self.master_address}",
            f"--metadata_server={self.metadata}", "--protocol=tcp", "--logtostderr=true"])
        _wait_port(self.client_port, self.client, timeout, self.workdir / "storage.log")

    def start(self) -> "MooncakeCluster":
        self.start_master()
        if self.storage:
            self.start_storage()
        return self

    def kill_master(self) -> None:
        if self.master is not None and self.master.poll() is None:
            os.kill(self.master.pid, signal.SIGKILL)
            self.master.wait(30)

    def close(self) -> None:
        for p in (self.client, self.master):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
        for f in self._logs:
            f.close()
        self._logs.clear()

    def log(self, name: str = "master") -> str:
        return _tail(self.workdir / f"{name}.log")

    def __enter__(self) -> "MooncakeCluster":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()
