"""Read-only attach (``Pool.open(name, read_only=True)``): a monitor that a user with read permission
only can open. It validates the pool like any attach, takes no member slot, writes nothing to the pool,
sees live counters move, and refuses every change with ReadOnlyPoolError (in the Python layer and in
the core beneath it). ``pykvshm info/stat/check`` use it, so a non-root user can watch a root's pool.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import pykvshm
from pykvshm import cli
from pykvshm.errors import (
    CorruptPoolError,
    GeometryMismatchError,
    PoolError,
    PoolNotFoundError,
    ReadOnlyPoolError,
)

NOBODY = 65534


def blocks(spec: pykvshm.KVSpec, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *spec.block_shape)).astype(np.float16)


def run_as_user(uid: int, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a forked child that has dropped to ``uid`` (and its group) for good; returns what
    it returned, or re-raises ``(type name, message)`` of what it raised as an AssertionError."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            out: Any = ("ok", fn())
        except BaseException as e:  # noqa: BLE001 - every failure goes back to the parent
            out = ("raised", f"{type(e).__name__}: {e}")
        with os.fdopen(w, "w") as f:
            f.write(json.dumps(out))
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status
    kind, value = json.loads(text)
    if kind == "raised":
        raise AssertionError(value)
    return value


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a root-owned pool and drop to another uid")
def test_user_with_read_permission_only_can_watch_a_root_pool(pool_name: str, spec: pykvshm.KVSpec) -> None:
    keys = pykvshm.block_keys(np.arange(24), spec.block_tokens, salt=b"ro")
    with pykvshm.Pool.create(pool_name, spec=spec, capacity="8MiB", mode=0o644) as owner:
        owner.publish(keys, blocks(spec, len(keys)))
        st = os.stat(owner.path)
        assert st.st_uid == 0 and st.st_mode & 0o777 == 0o644
        want = owner.stats()

        def as_nobody() -> dict[str, Any]:
            assert os.geteuid() == NOBODY
            out: dict[str, Any] = {}
            with pytest.raises(PoolError, match="Permission denied.*read_only=True"):
                pykvshm.Pool.open(pool_name)  # a writable attach needs write permission
            with pykvshm.Pool.open(pool_name, spec=spec, read_only=True) as ro:
                out["stats"] = ro.stats()
                out["members"] = [m["pid"] for m in ro.members()]
                ro.check()
                with pytest.raises(ReadOnlyPoolError):
                    ro.publish(pykvshm.block_keys(np.arange(8), spec.block_tokens), blocks(spec, 2))
                with pytest.raises(ReadOnlyPoolError):
                    ro.acquire(keys)
            # the command, as that user would run it
            for command in (["stat", "--json"], ["info", "--json"], ["check", "--json"]):
                buf = io.StringIO()
                with contextlib.redirect_stdout(buf):
                    assert cli.main([command[0], pool_name, *command[1:]]) == 0
                out[command[0]] = json.loads(buf.getvalue())
            return out

        got = run_as_user(NOBODY, as_nobody)
        assert got["stats"] == want == got["stat"]
        assert got["members"] == [os.getpid()]
        assert got["info"]["uuid"] == owner.uuid and got["check"]["ok"] is True
        assert owner.stats() == want  # nothing the monitor did changed the pool


@pytest.mark.parametrize("coherence", ["coherent", "noncoherent"])
def test_monitor_sees_a_live_pool_move(pool_name: str, spec: pykvshm.KVSpec, coherence: str) -> None:
    """A writer in another process publishes, hits and leaves; the monitor's counters follow each step."""
    pykvshm.Pool.create(pool_name, spec=spec, capacity="8MiB", coherence=coherence).close()
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, numpy as np, pykvshm
        spec = pykvshm.KVSpec(2, 2, 8, 4)
        pool = pykvshm.Pool.open({pool_name!r}, spec=spec)
        keys = pykvshm.block_keys(np.arange(40), 4, salt=b"live")
        data = np.ones((len(keys), *spec.block_shape), np.float16)
        def step(text):
            print(text, flush=True)
            assert sys.stdin.readline().strip() == "next"
        step("attached")
        pool.publish(keys[:6], data[:6]); step("published 6")
        lease = pool.acquire(keys); step("acquired")
        lease.release(); pool.publish(keys, data); step("published all")
        pool.close(); step("closed")
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert writer.stdin is not None and writer.stdout is not None

    def step() -> dict[str, int]:
        line = writer.stdout.readline().strip()
        assert line, "the writer died"
        s = ro.stats()
        writer.stdin.write("next\n")
        writer.stdin.flush()
        return s

    with writer, pykvshm.Pool.open(pool_name, read_only=True) as ro:
        assert ro.read_only and ro.coherence == coherence
        s = step()  # attached
        assert s["members"] == 1 and s["sealed"] == 0 and [m["pid"] for m in ro.members()] == [writer.pid]
        s = step()  # published 6
        assert s["sealed"] == s["published"] == 6 and s["bytes_in"] == 6 * spec.block_bytes
        s = step()  # acquired: 6 hits, 4 misses (10 keys asked), 6 pinned
        assert (s["hits"], s["misses"], s["pinned"]) == (6, 4, 6)
        s = step()  # published all: 4 more, 6 duplicates
        assert (s["sealed"], s["published"], s["duplicates"], s["pinned"]) == (10, 10, 6, 0)
        s = step()  # closed: no member, its counters kept (retired into the pool's totals)
        assert s["members"] == 0 and ro.members() == []
        assert (s["sealed"], s["published"], s["hits"], s["misses"]) == (10, 10, 6, 4)
        ro.check()
    assert writer.returncode == 0


def test_monitor_writes_nothing_and_takes_no_slot(pool_path: str, spec: pykvshm.KVSpec) -> None:
    """Every byte of the pool file is the same before and after a monitor's whole life."""
    with pykvshm.Pool.create(pool_path, spec=spec, capacity="8MiB") as owner:
        owner.publish(pykvshm.block_keys(np.arange(16), spec.block_tokens), blocks(spec, 4))
        before_members = owner.members()
        before = Path(pool_path).read_bytes()
        ro = pykvshm.Pool.open(pool_path, read_only=True)
        ro.stats(), ro.members(), ro.check(), ro.check(strict=False), ro.placement
        for call in (lambda: ro.alloc(1), ro.recover, lambda: ro.match([b"k" * 16])):
            with pytest.raises(ReadOnlyPoolError):
                call()
        assert owner.members() == before_members  # no member slot taken
        ro.close()
        assert Path(pool_path).read_bytes() == before


def test_every_change_is_refused(pool_name: str, spec: pykvshm.KVSpec) -> None:
    """Through the Python API and straight into the core beneath it (no guard above)."""
    keys = pykvshm.block_keys(np.arange(8), spec.block_tokens)
    with pykvshm.Pool.create(pool_name, spec=spec, capacity="8MiB") as owner:
        owner.publish(keys, blocks(spec, 2))
        lease = owner.acquire(keys)
        handle = int(lease.handles[0])
        ro = pykvshm.Pool.open(pool_name, read_only=True)
        refused: list[Callable[[], Any]] = [
            lambda: ro.alloc(1), lambda: ro.free([handle]), lambda: ro.block_view(handle),
            lambda: ro.match(keys), lambda: ro.publish(keys, blocks(spec, 2)), lambda: ro.acquire(keys),
            lambda: ro.writer(keys), ro.recover,
        ]
        core = ro._core
        h = np.array([handle], np.uint64)
        kb = pykvshm.keys.keys_buffer(keys)
        refused += [
            lambda: core.alloc(1, True), lambda: core.free(h), lambda: core.block_buffer(handle, True, None),
            lambda: core.block_buffer(handle, False, None), lambda: core.match(kb), lambda: core.acquire(kb),
            lambda: core.release(h), lambda: core.copy_out(h, 0, spec.block_bytes), lambda: core.reserve(kb),
            lambda: core.commit(h), lambda: core.abort(h), core.recover,
            lambda: core.transfer_open(b"r" * 16, kb), lambda: core.transfer_attach(b"r" * 16, None, 0, 0.01),
            lambda: core.transfer_wait(0, 1, 0, 0.01), lambda: core.transfer_copy_layer(0, 1, 0, 0, 64),
            lambda: core.transfer_put_layer(0, 1, 0, 0, 64), lambda: core.transfer_finish(0, 1),
            lambda: core.transfer_abort(0, 1),
        ]
        for i, call in enumerate(refused):
            with pytest.raises(ReadOnlyPoolError):
                call()
            assert not ro.closed, i
        core.heartbeat()  # a no-op for a monitor, never a write
        assert ro.stats()["pinned"] == 2  # the owner's pins are untouched
        ro.close()
        ro.close()  # idempotent
        lease.release()
        owner.check()


def test_read_only_attach_validates_like_any_attach(pool_name: str, spec: pykvshm.KVSpec, tmp_path: Path) -> None:
    with pytest.raises(PoolNotFoundError):
        pykvshm.Pool.open(pool_name, read_only=True)
    foreign = tmp_path / "foreign.kv"
    foreign.write_bytes(os.urandom(1 << 16))
    with pytest.raises(CorruptPoolError):
        pykvshm.Pool.open(str(foreign), read_only=True)
    pykvshm.Pool.create(pool_name, spec=spec, capacity="8MiB").close()
    other = pykvshm.KVSpec(num_layers=3, num_kv_heads=2, head_dim=8, block_tokens=4)
    with pytest.raises(GeometryMismatchError):
        pykvshm.Pool.open(pool_name, spec=other, read_only=True)
    with pytest.raises(ValueError, match="placement"):
        pykvshm.Pool.open(pool_name, read_only=True, prefault=True)
    with pytest.raises(ValueError, match="placement"):
        pykvshm.Pool.open(pool_name, read_only=True, numa_node=0)


def test_monitor_reports_a_dead_member_and_leaves_recovery_to_writers(pool_name: str, spec: pykvshm.KVSpec) -> None:
    """A monitor sees a killed writer as dead and a strict check fails until a member recovers it:
    attaching read-only recovers nothing (it may not write)."""
    pykvshm.Pool.create(pool_name, spec=spec, capacity="8MiB").close()
    child = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import os, numpy as np, pykvshm
        pool = pykvshm.Pool.open({pool_name!r})
        w = pool.writer(pykvshm.block_keys(np.arange(8), 4))   # two blocks being written
        os._exit(0)                                           # dies holding them
    """)], timeout=60)
    assert child.returncode == 0
    with pykvshm.Pool.open(pool_name, read_only=True) as ro:
        assert [m["alive"] for m in ro.members()] == [False]
        assert ro.stats()["writing"] == 2
        with pytest.raises(CorruptPoolError, match="dead process"):
            ro.check()
        ro.check(strict=False)
        with pykvshm.Pool.open(pool_name):  # a writable attach recovers the dead member
            pass
        assert ro.members() == [] and ro.stats()["writing"] == 0
        ro.check()
