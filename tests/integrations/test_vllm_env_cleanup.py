"""vllm_support's clean-up after each engine (pykvshm.integrations.vllm_env) must never unlink
a shared memory segment or semaphore a live process still maps, nor one its own processes did
not hold: on a machine where several test sessions run vLLM engines, one session's clean-up runs
while another's engine is starting, and an unlinked message-queue segment or ``sem.mp-*``
semaphore kills that engine ("WorkerProc initialization failed ... FileNotFoundError", or
``FileNotFoundError`` in ``SemLock._rebuild`` as a spawned child opens its parent's semaphore).
Every test here removes only what it created itself."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import textwrap
import uuid

import pytest

from pykvshm.integrations.vllm_env import (
    SHM_DIR,
    _in_use,
    _stat_key,
    group_segments,
    remove_leaked_segments,
    shm_segments,
    stop_group,
)

pytestmark = pytest.mark.skipif(not os.path.isdir(SHM_DIR), reason=f"no {SHM_DIR}")


@pytest.fixture
def mapped_segments():
    """Three psm_ segments mapped by this process with their descriptors closed (as a process
    that opened, mapped and closed them holds them), unlinked afterwards."""
    tag = uuid.uuid4().hex[:8]
    names = [f"psm_issue17vllm_{tag}_{i}" for i in range(3)]
    maps = []
    for n in names:
        fd = os.open(os.path.join(SHM_DIR, n), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, mmap.PAGESIZE)
            maps.append(mmap.mmap(fd, mmap.PAGESIZE))
        finally:
            os.close(fd)
    yield names, maps
    for m in maps:
        m.close()
    for n in names:
        try:
            os.unlink(os.path.join(SHM_DIR, n))
        except FileNotFoundError:
            pass


def test_every_mapped_segment_counts_as_in_use(mapped_segments):
    names, _ = mapped_segments
    paths = {os.path.join(SHM_DIR, n) for n in names}
    assert _in_use(paths) == paths


def test_clean_up_keeps_mapped_segments_and_removes_unmapped_ones(mapped_segments):
    names, maps = mapped_segments
    before = shm_segments() - set(names)         # only this test's segments are new
    owned = {n: _stat_key(os.path.join(SHM_DIR, n)) for n in names}
    assert remove_leaked_segments(before, owned) == []
    assert set(names) <= shm_segments()
    maps[1].close()                               # nobody maps this one any more
    assert remove_leaked_segments(before, owned) == [os.path.join(SHM_DIR, names[1])]
    assert set(shm_segments()) & set(names) == {names[0], names[2]}


def test_clean_up_leaves_what_it_does_not_own(mapped_segments):
    """A new, unmapped segment the caller's processes never held (another session's leak, or one
    another session's engine is about to open by name) is not the caller's to remove."""
    names, maps = mapped_segments
    before = shm_segments() - set(names)
    maps[1].close()
    assert remove_leaked_segments(before, {}) == []
    owned = {names[0]: _stat_key(os.path.join(SHM_DIR, names[0]))}
    assert remove_leaked_segments(before, owned) == []   # names[0] is still mapped
    assert set(names) <= shm_segments()


# A process that creates a named semaphore the way vLLM's engines do (multiprocessing, spawn: the
# child opens it by name) and a shared memory segment, prints their /dev/shm names, and waits.
_HOLDER = textwrap.dedent("""
    import multiprocessing as mp, sys
    from multiprocessing import shared_memory

    def use(lock):
        with lock:
            pass

    if __name__ == "__main__":
        ctx = mp.get_context("spawn")
        lock = ctx.Lock()
        shm = shared_memory.SharedMemory(create=True, size=4096)
        print("sem." + lock._semlock.name.lstrip("/"), shm.name.lstrip("/"), flush=True)
        sys.stdin.readline()                     # until told to spawn a child that uses the lock
        p = ctx.Process(target=use, args=(lock,))
        p.start()
        p.join()
        print(p.exitcode, flush=True)
        shm.close()
        shm.unlink()
""")


def _holder(tmp_path) -> tuple[subprocess.Popen, list[str]]:
    script = tmp_path / "holder.py"
    script.write_text(_HOLDER)
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, start_new_session=True, cwd=tmp_path)
    names = proc.stdout.readline().split()
    assert len(names) == 2 and names[0].startswith("sem.mp-") and names[1].startswith("psm_"), names
    return proc, names


def test_a_live_named_semaphore_counts_as_in_use(tmp_path):
    """glibc maps a named semaphore under its temporary name (``sem.XXXXXX (deleted)``) and closes
    its descriptor, so only its inode shows it is in use."""
    proc, names = _holder(tmp_path)
    try:
        paths = {os.path.join(SHM_DIR, n) for n in names}
        assert _in_use(paths) == paths
    finally:
        proc.communicate("go\n", timeout=60)


def test_stopping_a_group_removes_its_leaks_and_not_a_starting_engines_semaphore(tmp_path):
    """Two sessions at once: ours kills a group (its semaphore and segment leak, as a killed vLLM
    engine's do) and cleans up while the other holds a semaphore its spawned child has yet to open
    by name. Ours removes exactly its own two leaks; the other's child still opens its semaphore."""
    before = shm_segments()
    ours, our_names = _holder(tmp_path)
    other, other_names = _holder(tmp_path)
    try:
        held = group_segments(ours.pid)
        assert set(our_names) <= set(held) and not set(other_names) & set(held)
        removed = stop_group(ours.pid, before)
        ours.communicate(timeout=10)
        assert sorted(removed) == sorted(os.path.join(SHM_DIR, n) for n in our_names)
        assert not set(our_names) & shm_segments() and set(other_names) <= shm_segments()
        out, _ = other.communicate("go\n", timeout=60)
        assert out.strip() == "0"                 # the other's child rebuilt the lock by name
    finally:
        for p in (ours, other):
            if p.poll() is None:
                p.kill()
            p.communicate(timeout=10)
        for n in our_names:                       # only our own, if the test failed before removing them
            try:
                os.unlink(os.path.join(SHM_DIR, n))
            except FileNotFoundError:
                pass
