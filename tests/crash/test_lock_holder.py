"""A process that dies (or a host that freezes) inside the noncoherent pool lock does not wedge the pool."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

import pytest

import pykvshm

CTX = mp.get_context("fork")
OTHER_HOST = 0xABCDEF


@pytest.fixture
def nc_pool(pool_name: str, spec: pykvshm.KVSpec) -> Iterator[pykvshm.Pool]:
    with pykvshm.Pool.create(pool_name, spec=spec, capacity="4MiB", coherence="noncoherent") as p:
        yield p


def _hold_lock(name: str, host_id: int, ready) -> None:
    pool = pykvshm.Pool.open(name, host_id=host_id)
    pool.alloc(3)
    pool._core.debug_hold_lock()
    ready.send(pool._core.lock_stats()["host_line"])
    time.sleep(60)
    os._exit(0)


def _spawn_holder(name: str, host_id: int = 0) -> tuple[mp.process.BaseProcess, int]:
    a, b = CTX.Pipe()
    p = CTX.Process(target=_hold_lock, args=(name, host_id, b))
    p.start()
    line = a.recv()
    return p, line


def _finishes_within(fn: Callable[[], object], seconds: float) -> float:
    """Runs fn in a thread; fails the test if it is still blocked after `seconds`."""
    done: list[float] = []
    t0 = time.monotonic()
    t = threading.Thread(target=lambda: (fn(), done.append(time.monotonic() - t0)), daemon=True)
    t.start()
    t.join(seconds)
    assert done, f"the operation was still blocked on the pool lock after {seconds} s"
    return done[0]


def test_lock_holder_killed_is_taken_over_by_the_next_process(nc_pool: pykvshm.Pool) -> None:
    p, line = _spawn_holder(nc_pool.name)
    assert line == nc_pool._core.lock_stats()["host_line"]  # the same host: one line, tier 1 decides
    before = nc_pool._core.lock_stats()
    os.kill(p.pid, signal.SIGKILL)
    p.join(10)
    _finishes_within(lambda: nc_pool.alloc(1), 10.0)
    after = nc_pool._core.lock_stats()
    # The pool-wide lock or, with lock shards, the shard alloc() needed (the holder held them all).
    took = (after["takeovers"] + after["shard_takeovers"]) - (before["takeovers"] + before["shard_takeovers"])
    assert took >= 1
    r = nc_pool.recover()
    assert r["members_recovered"] == 1 and r["blocks_freed"] == 3
    nc_pool.check()
    # And the lock keeps working for everybody afterwards.
    with pykvshm.Pool.open(nc_pool.name) as other:
        other.free(other.alloc(2))
    assert nc_pool.stats()["writing"] == 1


def test_lock_held_by_a_frozen_host_is_passed_after_its_lease(pool_name: str, spec: pykvshm.KVSpec) -> None:
    with pykvshm.Pool.create(pool_name, spec=spec, capacity="4MiB", coherence="noncoherent") as creator:
        observer = pykvshm.Pool.open(pool_name, lease=1.0)
        p, line = _spawn_holder(pool_name, OTHER_HOST)
        try:
            assert line != observer._core.lock_stats()["host_line"]  # another host: another bakery line
            os.kill(p.pid, signal.SIGSTOP)  # the whole "host" freezes inside the lock
            waited = _finishes_within(lambda: observer.alloc(1), 15.0)
            assert waited >= 0.5  # it did wait for the lease, not barge in
            assert observer._core.lock_stats()["hosts_skipped"] >= 1
            r = observer.recover()  # the frozen member's own heartbeat is stale as well
            assert r["members_recovered"] == 1 and r["blocks_freed"] == 3
        finally:
            os.kill(p.pid, signal.SIGKILL)
            p.join(10)
            observer.close()
        creator.check()


def test_a_killed_host_leaves_its_line_to_a_new_host(pool_name: str, spec: pykvshm.KVSpec) -> None:
    """Host lines are claimed once per host; a host silent past the lease loses its line to a newcomer."""
    with pykvshm.Pool.create(pool_name, spec=spec, capacity="4MiB", coherence="noncoherent") as creator:
        lines = {creator._core.lock_stats()["host_line"]}
        handles = []
        try:
            for h in range(1, 16):  # 15 more emulated hosts fill the table of 16 lines
                handles.append(pykvshm.Pool.open(pool_name, host_id=0x1000 + h, lease=1.0))
                lines.add(handles[-1]._core.lock_stats()["host_line"])
            assert len(lines) == 16
            with pytest.raises(pykvshm.errors.MembersFullError, match="host lines"):
                pykvshm.Pool.open(pool_name, host_id=0x2000, lease=1.0)
            for h in handles:
                h.close()  # these hosts leave: their members go, their lines stay but stop beating
            handles = []
            time.sleep(1.3)  # longer than the newcomer's lease
            with pykvshm.Pool.open(pool_name, host_id=0x2000, lease=1.0) as newcomer:
                assert newcomer._core.lock_stats()["host_line"] != creator._core.lock_stats()["host_line"]
                newcomer.free(newcomer.alloc(1))
        finally:
            for h in handles:
                h.close()
        creator.check()
