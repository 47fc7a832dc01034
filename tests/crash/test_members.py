"""Hundreds of members: a member table sized at creation, pins that scale past 128 members, and
exact recovery of members killed in the middle of pin and unpin (recovery.md, "Pins")."""

from __future__ import annotations

import mmap
import os
import random
import signal
import time

import numpy as np
import pytest

import pykvshm
from pykvshm import errors
from pykvshm.testing import blocks_for_keys, count_wrong_blocks, prompt_keys

MEMBERS = 330     # forked members, far past the 127 the old pin masks allowed
SURVIVORS = 110   # every third member lives; the others are SIGKILLed while pinning and unpinning
HOT = 24          # keys every member pins and unpins


def _member(name: str, i: int, keys: list[bytes], spec: pykvshm.KVSpec, board: np.ndarray, ready_fd: int) -> None:
    """A forked member: hold a lease on 4 keys, churn pins on the hot keys until told to stop,
    then (survivors) check that the held lease still reads its keys' bytes, and leave."""
    code = 2
    try:
        pool = pykvshm.Pool.open(name)
        rng = random.Random(i)
        first = i % (HOT - 4)
        held_keys = keys[first:first + 4]
        held = pool.acquire(held_keys)
        assert len(held) == 4
        board[1 + i] = 1 + pool._core.member_slot  # slot + 1: attached
        os.write(ready_fd, b"r")
        while board[0] == 0:  # phase 0: everyone attaches (no churn to starve the late ones)
            time.sleep(0.005)
        while board[0] == 1:  # phase 1: pin and unpin (the kills land here)
            a = rng.randrange(HOT)
            with pool.acquire(keys[a:a + rng.randrange(1, 5)]):
                pass
        board[1 + MEMBERS + i] = 1  # quiet: no pin or unpin of ours is in flight
        while board[0] == 2:
            time.sleep(0.01)
        out = np.empty((4, *spec.block_shape), dtype=spec.np_dtype)
        wrong = count_wrong_blocks(held, held_keys, out)
        held.release()
        pool.close()
        code = 0 if wrong == 0 else 3
    except BaseException:  # noqa: BLE001 - reported through the board
        code = 4
    finally:
        board[1 + 2 * MEMBERS + i] = code + 10
        os._exit(0)


def test_hundreds_of_members_pin_and_die_and_recovery_is_exact(pool_name: str, spec: pykvshm.KVSpec) -> None:
    keys = prompt_keys(spec, 0, HOT + 4, b"members")
    pool = pykvshm.Pool.create(pool_name, spec=spec, capacity="16MiB")
    assert pool.max_members == 4096
    assert pool.publish(keys, blocks_for_keys(keys, spec)) == len(keys)
    # board: [phase, slot+1 per member, quiet per member, exit code + 10 per member]
    shm = mmap.mmap(-1, 8 * (1 + 3 * MEMBERS))
    board = np.frombuffer(shm, dtype=np.int64)
    rfd, wfd = os.pipe()
    pids = []
    try:
        for i in range(MEMBERS):
            pid = os.fork()
            if pid == 0:
                os.close(rfd)
                _member(pool_name, i, keys, spec, board, wfd)
            pids.append(pid)
        os.close(wfd)
        got = 0
        deadline = time.monotonic() + 120
        while got < MEMBERS and time.monotonic() < deadline:
            chunk = os.read(rfd, MEMBERS)
            if not chunk:
                break
            got += len(chunk)
        assert got == MEMBERS, f"only {got} of {MEMBERS} members attached"
        slots = board[1:1 + MEMBERS] - 1
        assert len(set(slots.tolist())) == MEMBERS and slots.max() >= 300
        assert pool.stats()["members"] == MEMBERS + 1

        # Kill two of every three members while they pin and unpin, one at a time.
        board[0] = 1
        time.sleep(0.2)
        victims = [pids[i] for i in range(MEMBERS) if i % 3 != 0]
        rng = random.Random(7)
        for pid in victims:
            time.sleep(rng.uniform(0, 0.002))
            os.kill(pid, signal.SIGKILL)
        for pid in victims:
            os.waitpid(pid, 0)

        report = pool.recover()
        assert report["members_recovered"] == len(victims)
        # Every victim held its 4-key lease, so at least that many pins were dropped.
        assert report["pins_dropped"] >= 4 * len(victims)
        assert pool.recover()["members_recovered"] == 0

        # Survivors stop churning; then the pool is quiet and must be exact.
        board[0] = 2
        deadline = time.monotonic() + 120
        survivors = [i for i in range(MEMBERS) if i % 3 == 0]
        assert len(survivors) == SURVIVORS
        while not all(board[1 + MEMBERS + i] for i in survivors) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert all(board[1 + MEMBERS + i] for i in survivors), "a survivor stopped answering"
        pool.check(strict=True)  # every count equals its records; no record of a dead member
        st = pool.stats()
        assert st["members"] == SURVIVORS + 1
        held_blocks = {(i % (HOT - 4)) + j for i in survivors for j in range(4)}
        assert st["pinned"] == len(held_blocks)
        # Eviction pressure: every unpinned block goes; the survivors' leased blocks must stay.
        free = st["free"] + st["sealed"] - len(held_blocks)
        handles = pool.alloc(free, evict=True)
        with pytest.raises(errors.PoolFullError):
            pool.alloc(1, evict=True)
        pool.free(handles)
        board[0] = 3
        for i in survivors:
            os.waitpid(pids[i], 0)
        codes = board[1 + 2 * MEMBERS:]
        assert [int(codes[i]) - 10 for i in survivors] == [0] * SURVIVORS, "a survivor's lease lost its bytes"
        st = pool.stats()
        assert st["pinned"] == 0 and st["members"] == 1
        pool.check(strict=True)
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        os.close(rfd)
        pool.close()


def test_member_table_is_sized_at_creation(pool_name: str, spec: pykvshm.KVSpec) -> None:
    with pykvshm.Pool.create(pool_name, spec=spec, capacity="8MiB", max_members=3) as pool:
        assert pool.max_members == 3
        second = pykvshm.Pool.open(pool_name)  # two handles attached: slots 0 and 1, slot 2 is the spare
        with pytest.raises(errors.MembersFullError, match="all 2 member slots"):
            pykvshm.Pool.open(pool_name)
        second.close()
        third = pykvshm.Pool.open(pool_name)
        with pykvshm.Pool.open(pool_name, read_only=True) as monitor:
            assert monitor.max_members == 3
        third.close()


@pytest.mark.parametrize("bad", [0, 1, 65536, -1, 2.5, "4096", True, None])
def test_max_members_is_validated(pool_name: str, spec: pykvshm.KVSpec, bad: object) -> None:
    with pytest.raises(ValueError, match="max_members must be an int between 2 and 65535"):
        pykvshm.Pool.create(pool_name, spec=spec, capacity="8MiB", max_members=bad)  # type: ignore[arg-type]
    with pytest.raises(errors.PoolNotFoundError):
        pykvshm.Pool.open(pool_name)
