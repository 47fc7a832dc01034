"""vllm_support's clean-up after each engine (pykvshm.integrations.vllm_env) must never unlink
a shared memory segment a live process still maps: on a machine where several test sessions
run vLLM engines, one session's clean-up runs while another's engine is starting, and an
unlinked message-queue segment kills that engine ("WorkerProc initialization failed ...
FileNotFoundError")."""

from __future__ import annotations

import mmap
import os
import uuid

import pytest

from pykvshm.integrations.vllm_env import SHM_DIR, _in_use, remove_leaked_segments, shm_segments

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
    assert remove_leaked_segments(before) == []
    assert set(names) <= shm_segments()
    maps[1].close()                               # nobody maps this one any more
    assert remove_leaked_segments(before) == [os.path.join(SHM_DIR, names[1])]
    assert set(shm_segments()) & set(names) == {names[0], names[2]}
