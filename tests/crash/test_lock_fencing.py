"""Noncoherent pools: a stopped lock holder is taken over and fenced; corrupt lock words bound every wait.

Issue 15, items 5 and 6.  A holder stopped (SIGSTOP) inside an operation for longer than the lease
loses the lock to the next waiter, of its host or another one, even while other processes of its
host keep that host's line beating; when it resumes, its next access to shared metadata finds it
lost the lock and raises MemberLostError instead of writing.  Lock words are untrusted: a holder
token naming a live process that never renews its hold (pid 1), a phantom host line with a
heartbeat in the future, a stuck `choosing` flag or a claim of the join line from the future each
delay the others by at most a lease or two, never forever.
"""

from __future__ import annotations

import mmap
import multiprocessing as mp
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

import pykvshm
from pykvshm import _core

CTX = mp.get_context("fork")
HOST_B = 0xB0B0B0
LAYOUT = _core.layout_info()
OFF = LAYOUT["offsets"]
REGIONS_AT = OFF["superblock.regions"]
JOIN_AT = OFF["control.join"]
HOSTS_AT = OFF["control.hosts"]
HOST_LINE = LAYOUT["sizeof_host_line"]
F = {k.split(".", 1)[1]: v for k, v in OFF.items() if k.startswith("host_line.")}
J = {k.split(".", 1)[1]: v for k, v in OFF.items() if k.startswith("join_line.")}


def _probe(conn, name: str, host_id: int, op: str) -> None:
    try:
        t0 = time.monotonic()
        with pykvshm.Pool.open(name, host_id=host_id, lease=1.0) as p:
            if op == "alloc":
                handles = p.alloc(1)
                waited = time.monotonic() - t0
                stats = p._core.lock_stats()
                p.free(handles)
            else:
                p.free(p.alloc(1))
                waited = time.monotonic() - t0
                stats = p._core.lock_stats()
        conn.send(("ok", waited, stats))
    except Exception as e:  # noqa: BLE001 - reported to the test
        conn.send((type(e).__name__, str(e), {}))
    os._exit(0)


def _finishes_within(name: str, seconds: float, host_id: int = 0, op: str = "alloc") -> tuple[float, dict[str, int]]:
    """Opens the pool in a new process (lease 1 s) and allocates and frees a block there; fails the test if
    that is still blocked on the pool lock after `seconds` (the process is then killed, so a hang fails the
    test instead of wedging it).  Returns the seconds it took and the probe's lock statistics."""
    a, b = CTX.Pipe()
    p = CTX.Process(target=_probe, args=(b, name, host_id, op))
    p.start()
    try:
        assert a.poll(seconds), f"the operation was still blocked on the pool lock after {seconds} s"
        kind, waited, stats = a.recv()
        assert kind == "ok", (kind, waited)
        return waited, stats
    finally:
        if p.is_alive():
            p.join(5)
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
            p.join(10)


@contextmanager
def _control(name: str) -> Iterator[tuple[mmap.mmap, int]]:
    """The pool's bytes (read-write, shared) and the offset of its control page."""
    fd = os.open(f"/dev/shm/{name}", os.O_RDWR)
    try:
        m = mmap.mmap(fd, 0)
    finally:
        os.close(fd)
    try:
        ctl = struct.unpack_from("<Q", m, REGIONS_AT + 16 * LAYOUT["regions"]["control"])[0]
        yield m, ctl
    finally:
        m.close()


def _put(m: mmap.mmap, at: int, value: int) -> None:
    struct.pack_into("<Q", m, at, value & (2**64 - 1))


def _get(m: mmap.mmap, at: int) -> int:
    return int(struct.unpack_from("<Q", m, at)[0])


def _holder(name: str, host_id: int, conn) -> None:
    """Opens the pool, allocates 3 blocks, takes the lock and keeps it (as if stopped inside an
    operation); when told to go on, tries to free its blocks and reports what happened."""
    pool = pykvshm.Pool.open(name, host_id=host_id, lease=1.0)
    handles = pool.alloc(3)
    pool._core.debug_hold_lock()
    conn.send("held")
    conn.recv()  # the parent SIGSTOPs us here, lets another process take the lock, and resumes us
    try:
        pool.free(handles)
        conn.send(("freed", ""))
    except Exception as e:  # noqa: BLE001 - the parent checks the class and the message
        conn.send((type(e).__name__, str(e)))
    os._exit(0)


def _companion(name: str, host_id: int, conn) -> None:
    """A second, idle process of the holder's host: its heartbeat timer keeps the host line fresh."""
    pool = pykvshm.Pool.open(name, host_id=host_id, lease=1.0)
    conn.send("open")
    conn.recv()
    pool.close()
    os._exit(0)


def _spawn(target, *args) -> tuple[mp.process.BaseProcess, object]:
    a, b = CTX.Pipe()
    p = CTX.Process(target=target, args=(*args, b))
    p.start()
    assert a.poll(30), "the child did not start"
    a.recv()
    return p, a


def _reap(*procs: mp.process.BaseProcess) -> None:
    for p in procs:
        if p.is_alive():
            try:
                os.kill(p.pid, signal.SIGCONT)
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.join(10)


@pytest.fixture
def nc_pool(pool_name: str, spec: pykvshm.KVSpec) -> Iterator[pykvshm.Pool]:
    with pykvshm.Pool.create(pool_name, spec=spec, capacity="4MiB", coherence="noncoherent", lease=1.0) as p:
        yield p


def test_stopped_holder_of_this_host_is_taken_over_and_fenced(nc_pool: pykvshm.Pool) -> None:
    holder, conn = _spawn(_holder, nc_pool.name, 0)
    try:
        os.kill(holder.pid, signal.SIGSTOP)  # alive by its pid, silent past the lease
        waited, stats = _finishes_within(nc_pool.name, 20.0)
        assert waited >= 0.5  # it waited for the holder's lease, it did not barge in
        assert stats["takeovers"] == 1
        writing = nc_pool.stats()["writing"]
        assert writing == 3
        os.kill(holder.pid, signal.SIGCONT)
        conn.send("go")
        assert conn.poll(20), "the resumed holder did not report"
        kind, msg = conn.recv()
        # It resumed inside the lock it no longer holds: its free must not have been written.
        assert kind == "MemberLostError", (kind, msg)
        assert "lock" in msg and "open the pool again" in msg
        assert nc_pool.stats()["writing"] == writing
        holder.join(10)
        r = nc_pool.recover()
        assert r["members_recovered"] == 1 and r["blocks_freed"] == 3
        nc_pool.check()
        with pykvshm.Pool.open(nc_pool.name, lease=1.0) as other:  # the lock works for everyone afterwards
            other.free(other.alloc(2))
    finally:
        _reap(holder)


def test_stopped_holder_of_a_beating_host_is_passed_and_fenced(nc_pool: pykvshm.Pool) -> None:
    """Another process of the stopped holder's host keeps the host line beating: the holder's own
    hold, not its host's heartbeat, decides."""
    companion, cconn = _spawn(_companion, nc_pool.name, HOST_B)
    holder, conn = _spawn(_holder, nc_pool.name, HOST_B)
    try:
        os.kill(holder.pid, signal.SIGSTOP)
        waited, stats = _finishes_within(nc_pool.name, 20.0)
        assert waited >= 0.5
        assert stats["hosts_skipped"] >= 1
        writing = nc_pool.stats()["writing"]
        os.kill(holder.pid, signal.SIGCONT)
        conn.send("go")
        assert conn.poll(20), "the resumed holder did not report"
        kind, msg = conn.recv()
        assert kind == "MemberLostError", (kind, msg)
        assert nc_pool.stats()["writing"] == writing
        cconn.send("close")
        companion.join(10)
        holder.join(10)
        time.sleep(1.2)  # the holder's host is silent now: its member is recovered after the lease
        nc_pool.recover()
        assert nc_pool.stats()["writing"] == 0
        nc_pool.check()
    finally:
        _reap(holder, companion)


def test_lock_word_naming_a_live_process_that_never_renews_is_taken_over(nc_pool: pykvshm.Pool) -> None:
    line = nc_pool._core.lock_stats()["host_line"]
    with _control(nc_pool.name) as (m, ctl):
        at = ctl + HOSTS_AT + line * HOST_LINE + F["local"]
        _put(m, at, (1 << 32) | 0x5EED)  # "held by pid 1"
        try:
            _finishes_within(nc_pool.name, 15.0)
        finally:
            if _get(m, at) == (1 << 32) | 0x5EED:  # still there (not taken over): let the fixture close
                _put(m, at, 0)
    nc_pool.check()


PHANTOMS = {
    # a line whose heartbeat lies an hour in the future, holding a ticket
    "future heartbeat": lambda now: {"heartbeat_ns": now + 3600 * 10**9, "ticket": 1, "hold_ns": now + 3600 * 10**9},
    # a line stuck in the bakery's doorway, heartbeat fresh, its hold never renewed
    "stuck choosing": lambda now: {"heartbeat_ns": now + 3600 * 10**9, "choosing": 1},
    # a ticket that would overflow the next one taken (max + 1 = 0 means "not competing")
    "maximal ticket": lambda now: {"heartbeat_ns": now, "ticket": 2**64 - 1, "hold_ns": now},
}


def _plant(m: mmap.mmap, ctl: int, line: int, kind: str) -> None:
    at = ctl + HOSTS_AT + line * HOST_LINE
    _put(m, at + F["host_id"], 0xFA7703)
    for field, value in PHANTOMS[kind](time.time_ns()).items():
        if field == "choosing":
            struct.pack_into("<I", m, at + F[field], value)
        else:
            _put(m, at + F[field], value)
    _put(m, ctl + JOIN_AT + J["lines_used"], line + 1)


@pytest.mark.parametrize("kind", sorted(PHANTOMS))
def test_phantom_host_line_delays_at_most_a_lease(nc_pool: pykvshm.Pool, kind: str) -> None:
    with _control(nc_pool.name) as (m, ctl):
        used = _get(m, ctl + JOIN_AT + J["lines_used"])
        at = ctl + HOSTS_AT + used * HOST_LINE
        try:
            _plant(m, ctl, used, kind)
            _finishes_within(nc_pool.name, 10.0)
            # the CLI (default lease 10 s) is bounded as well
            _plant(m, ctl, used, kind)
            r = subprocess.run([sys.executable, "-m", "pykvshm", "check", nc_pool.name], capture_output=True,
                               text=True, timeout=60)
            assert r.returncode == 0, r.stdout + r.stderr
        finally:
            m[at:at + HOST_LINE] = bytes(HOST_LINE)  # the fixture's close must not depend on the fix
            _put(m, ctl + JOIN_AT + J["lines_used"], used)


def test_join_claim_from_the_future_does_not_block_a_new_host(nc_pool: pykvshm.Pool) -> None:
    with _control(nc_pool.name) as (m, ctl):
        _put(m, ctl + JOIN_AT + J["owner"], 0x1234_5678_9ABC)
        _put(m, ctl + JOIN_AT + J["since_ns"], time.time_ns() + 3600 * 10**9)
        _put(m, ctl + JOIN_AT + J["host_id"], 0x7777)
        _put(m, ctl + JOIN_AT + J["pid"], 1)

    _finishes_within(nc_pool.name, 15.0, host_id=HOST_B)
    nc_pool.check()
