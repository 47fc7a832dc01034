"""SIGKILL at random moments (inside publish, acquire, alloc, attach and recovery), then exact accounting."""

from __future__ import annotations

import os

from pykvshm.testing import unique_name
from pykvshm.testing.torture import run_torture


def _assert_clean(rep, kills: int) -> None:
    assert rep.kills >= kills
    # Victims killed before they attached hold nothing; most had attached and were recovered.
    assert rep.members_recovered >= rep.kills // 2
    assert rep.check_failures == []
    assert rep.leaked_blocks == 0 and rep.leaked_pins == 0
    assert rep.wrong_reads == 0
    assert rep.verified_reads > 0


def test_torture_200_kills() -> None:
    kills = int(os.environ.get("PYKVSHM_TORTURE_KILLS", "200"))
    _assert_clean(run_torture(unique_name("torture"), kills=kills, procs=3, seed=1), kills)


def test_torture_noncoherent_kills() -> None:
    """The same on a noncoherent pool: victims die inside the pool lock too, and the next
    process of the host takes the lock over (fewer kills: the code paths are the same)."""
    kills = max(1, int(os.environ.get("PYKVSHM_TORTURE_KILLS", "200")) // 4)
    _assert_clean(run_torture(unique_name("torture-nc"), kills=kills, procs=3, seed=2, coherence="noncoherent"), kills)


def test_torture_noncoherent_lock_shards_kills() -> None:
    """4 workers hammer 4 block shards and the index lock at once (alloc, publish, acquire, transfers)
    and are SIGKILLed inside shard holds and all-lock holds (recover, attach); after every round the
    accounting is exact, check(strict) passes, no read was wrong and the survivor wrote nothing
    outside its lock."""
    kills = 20
    rep = run_torture(unique_name("torture-sh"), kills=kills, procs=4, seed=5, coherence="noncoherent",
                      capacity="8MiB", lock_shards=4)
    _assert_clean(rep, kills)
