"""Recovery of what dead members held, built deliberately: exact reclaim, exactly-once, takeover, pid reuse, leases."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import struct
import time

import numpy as np
import pytest

import pykvshm
from pykvshm import _core, errors
from pykvshm.testing import blocks_for_keys

CTX = mp.get_context("fork")
SLOT = _core.layout_info()["sizeof_member_slot"]
_REGIONS = _core.layout_info()["offsets"]["superblock.regions"]


def _members_off(f) -> int:
    """The member table's offset, from the superblock's region table (region 1)."""
    f.seek(_REGIONS + 16 * 1)
    return int(struct.unpack("<Q", f.read(8))[0])


def _member_word(path: str, slot: int, field_off: int) -> int:
    with open(path, "rb") as f:
        f.seek(_members_off(f) + slot * SLOT + field_off)
        return struct.unpack("<Q", f.read(8))[0]


def _set_member_word(path: str, slot: int, field_off: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(_members_off(f) + slot * SLOT + field_off)
        f.write(struct.pack("<Q", value))


def _hold_and_die(name: str, keys: list[bytes], n_alloc: int, ready, hang: bool) -> None:
    """Attach, take blocks, pins and an unfinished writer, then die without cleaning up."""
    pool = pykvshm.Pool.open(name)
    spec = pool.spec
    pool.alloc(n_alloc)
    lease = pool.acquire(keys[:2])
    w = pool.writer(keys[2:4])
    w.write_layer(0, np.ascontiguousarray(blocks_for_keys(keys[2:4], spec)[:, 0]))
    ready.send((pool._core.member_slot, len(lease), len(w)))
    if hang:
        time.sleep(60)
    os.kill(os.getpid(), signal.SIGKILL)


def _spawn_holder(name: str, keys: list[bytes], n_alloc: int = 5, hang: bool = False):
    parent, child = CTX.Pipe()
    p = CTX.Process(target=_hold_and_die, args=(name, keys, n_alloc, child, hang))
    p.start()
    slot, pinned, writing = parent.recv()
    return p, slot, pinned, writing


@pytest.fixture(params=["coherent", "noncoherent"])
def pool(pool_name: str, spec: pykvshm.KVSpec, request: pytest.FixtureRequest):
    """Every recovery test on both kinds of pool (the noncoherent one runs it under its lock)."""
    p = pykvshm.Pool.create(pool_name, spec=spec, capacity="8MiB", coherence=request.param)
    yield p
    p.close()


@pytest.fixture
def seeded(pool: pykvshm.Pool) -> tuple[pykvshm.Pool, list[bytes]]:
    keys = pykvshm.block_keys(np.arange(4 * pool.spec.block_tokens), pool.spec.block_tokens)
    pool.publish(keys[:2], blocks_for_keys(keys[:2], pool.spec))
    return pool, keys


def test_dead_member_is_reclaimed_exactly(seeded) -> None:
    pool, keys = seeded
    free0 = pool.stats()["free"]
    p, slot, pinned, writing = _spawn_holder(pool.name, keys)
    p.join(10)
    assert p.exitcode == -signal.SIGKILL
    s = pool.stats()
    assert s["pinned"] == 2 and s["writing"] == 5 + 2 and pool.match(keys) == 2
    assert [m["alive"] for m in pool.members() if m["slot"] == slot] == [False]
    with pytest.raises(errors.CorruptPoolError, match="dead process"):
        pool.check()  # a quiescent pool with a dead member's pins is not consistent until recovered
    r = pool.recover()
    assert r == {"members_recovered": 1, "blocks_freed": 7, "pins_dropped": 2}
    s = pool.stats()
    assert s["free"] == free0 and s["writing"] == 0 and s["pinned"] == 0 and s["sealed"] == 2
    assert s["recovered_members"] == 1
    assert len(pool.members()) == 1
    pool.check()
    # The half-written keys were withdrawn: they can be published again.
    assert pool.publish(keys, blocks_for_keys(keys, pool.spec)) == 2
    assert pool.recover() == {"members_recovered": 0, "blocks_freed": 0, "pins_dropped": 0}


def test_recovery_runs_on_attach(seeded) -> None:
    pool, keys = seeded
    p, *_ = _spawn_holder(pool.name, keys)
    p.join(10)
    with pykvshm.Pool.open(pool.name) as other:
        s = other.stats()
        assert s["writing"] == 0 and s["pinned"] == 0 and s["recovered_members"] == 1
    pool.check()


def _recover_race(name: str, go, out) -> None:
    # Attach without the automatic recovery on attach, so that the race is in recover():
    # the core recovers on attach too, which is the same code path and the same claim.
    p = pykvshm.Pool.open(name)
    go.wait()
    r = p.recover()
    out.send(r)
    p.close()


def test_exactly_one_recoverer_per_dead_member(seeded) -> None:
    pool, keys = seeded
    dead = []
    for _ in range(4):
        p, *_ = _spawn_holder(pool.name, keys[:2] + [os.urandom(16), os.urandom(16)], n_alloc=3)
        p.join(10)
        dead.append(p)
    go = CTX.Barrier(4)
    pipes, procs = [], []
    for _ in range(4):
        a, b = CTX.Pipe()
        pr = CTX.Process(target=_recover_race, args=(pool.name, go, b))
        pr.start()
        pipes.append(a)
        procs.append(pr)
    results = [a.recv() for a in pipes]
    for pr in procs:
        pr.join(10)
        assert pr.exitcode == 0
    s = pool.stats()
    # Attaching recovers too, so the work is spread over attach and recover(); in total
    # every dead member was recovered exactly once and every block exactly once.
    assert s["recovered_members"] == 4
    assert s["writing"] == 0 and s["pinned"] == 0
    assert sum(r["members_recovered"] for r in results) <= 4
    pool.check()


def test_takeover_from_a_dead_recoverer(seeded) -> None:
    """A recoverer that died mid-recovery leaves RECOVERING(by it); the next recoverer completes the job."""
    pool, keys = seeded
    p, slot, *_ = _spawn_holder(pool.name, keys)
    p.join(10)
    ctl = _member_word(pool.path, slot, 0)
    epoch = (ctl >> 32) & 0x3FFFFFFF
    dead_recoverer_slot = 77  # a free slot: its "process" is gone
    payload = (dead_recoverer_slot << 24) | 5
    _set_member_word(pool.path, slot, 0, (2 << 62) | (epoch << 32) | payload)
    # Simulate partial progress: the dead recoverer had already dropped the pins.
    assert [m["status"] for m in pool.members() if m["slot"] == slot] == ["recovering"]
    r = pool.recover()
    assert r["members_recovered"] == 1 and r["blocks_freed"] == 7
    s = pool.stats()
    assert s["writing"] == 0 and s["pinned"] == 0 and len(pool.members()) == 1
    pool.check()


def test_live_recoverer_is_not_overtaken(seeded) -> None:
    pool, keys = seeded
    p, slot, *_ = _spawn_holder(pool.name, keys)
    p.join(10)
    # Claim the slot as if *this* (live) process were recovering it.
    me = pool._core.member_slot
    my_epoch = next(m["epoch"] for m in pool.members() if m["self"])
    ctl = _member_word(pool.path, slot, 0)
    epoch = (ctl >> 32) & 0x3FFFFFFF
    _set_member_word(pool.path, slot, 0, (2 << 62) | (epoch << 32) | (me << 24) | (my_epoch & 0xFFFFFF))
    with pykvshm.Pool.open(pool.name) as other:
        assert other.recover()["members_recovered"] == 0  # the live recoverer keeps its claim
        assert other.stats()["writing"] == 7


def test_pid_reuse_is_not_mistaken_for_life(seeded) -> None:
    """A slot whose pid is alive but belongs to a process that started later is dead."""
    pool, keys = seeded
    p, slot, *_ = _spawn_holder(pool.name, keys, hang=True)
    try:
        assert pool.recover()["members_recovered"] == 0  # alive and well
        start = _member_word(pool.path, slot, 8)
        _set_member_word(pool.path, slot, 8, start + 12345)  # as if the pid had been reused
        r = pool.recover()
        assert r["members_recovered"] == 1 and r["blocks_freed"] == 7 and r["pins_dropped"] == 2
    finally:
        p.kill()
        p.join(10)
    pool.check()


def _remote_host_member(name: str, ready, stop) -> None:
    pool = pykvshm.Pool.open(name, host_id=0xABCDEF)
    pool.alloc(3)
    ready.send(pool._core.member_slot)
    stop.recv()  # stay alive, idle; the heartbeat timer keeps the lease fresh
    try:
        pool.alloc(1)
        ready.send("ok")
    except errors.MemberLostError:
        ready.send("lost")
    os._exit(0)


def test_other_host_member_lives_by_its_heartbeat(pool: pykvshm.Pool) -> None:
    """A member of another host cannot be checked by pid: it is alive while its heartbeat is
    fresher than the lease, and recovered once it stops beating."""
    a, b = CTX.Pipe()
    c, d = CTX.Pipe()
    p = CTX.Process(target=_remote_host_member, args=(pool.name, b, c))
    p.start()
    slot = a.recv()
    observer = pykvshm.Pool.open(pool.name, lease=1.0)
    try:
        time.sleep(1.6)  # idle for longer than the lease: the timer thread's beats keep it alive
        assert observer.recover()["members_recovered"] == 0
        os.kill(p.pid, signal.SIGSTOP)  # the whole "host" freezes
        time.sleep(1.6)
        r = observer.recover()
        assert r["members_recovered"] == 1 and r["blocks_freed"] == 3
        os.kill(p.pid, signal.SIGCONT)
        d.send("go")
        assert a.recv() == "lost"  # the frozen member learns it was declared dead
        p.join(10)
    finally:
        if p.is_alive():
            p.kill()
        observer.close()
    assert [m for m in pool.members() if not m["self"]] == []
    pool.check()
