"""Several emulated hosts (PID + network namespaces) on one pool: distinct host ids, liveness by
heartbeat lease only, a whole host killed and recovered by the survivors, torture across hosts."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import pykvshm
from pykvshm.testing import unique_name
from pykvshm.testing.rig import Rig, namespaces_available, pid_namespace, run_rig_torture

_OK, _WHY = namespaces_available()
pytestmark = pytest.mark.skipif(not _OK, reason=_WHY)

LEASE = 1.5


@pytest.fixture
def rig(pool_name: str, spec: pykvshm.KVSpec, tmp_path: Path):
    pool = pykvshm.Pool.create(pool_name, spec=spec, capacity="8MiB", lease=LEASE)
    with Rig(pool_name, tmp_path, lease=LEASE) as r:
        yield pool, r
    pool.close()


def test_hosts_have_distinct_host_ids_and_live_by_heartbeat(rig) -> None:
    pool, r = rig
    a = r.start("a", "hold", "--members", "2", "--prompt-base", "0")
    b = r.start("b", "hold", "--members", "1", "--prompt-base", "10")
    sa = a.wait_status(2)
    sb = b.wait_status(1)
    # Each host is its own PID namespace; its members share one host id, hosts differ.
    assert a.pid_ns != b.pid_ns != pid_namespace() != a.pid_ns
    assert {s["pid_ns"] for s in sa} == {a.pid_ns} and sb[0]["pid_ns"] == b.pid_ns
    assert sa[0]["pid"] == 1  # the namespace init: pid 1 there, our own init here
    me = pool._core.host_id
    ids = {s["host_id"] for s in sa}, {s["host_id"] for s in sb}
    assert len(ids[0]) == 1 and len(ids[1]) == 1 and ids[0] != ids[1] and me not in ids[0] | ids[1]
    members = {m["slot"]: m for m in pool.members()}
    assert {members[s["slot"]]["host_id"] for s in sa + sb} == ids[0] | ids[1]
    assert len({m["host_id"] for m in members.values()}) == 3
    # Their pids are pids of their namespaces: here the same numbers name other processes, or none.
    for s in sa + sb:
        host_ns = a.pid_ns if s["host"] == "a" else b.pid_ns
        try:
            assert pid_namespace(s["pid"]) != host_ns
        except OSError:  # no such process here, or a kernel thread
            pass
    # Idle for more than two leases: the heartbeat timer keeps them alive.
    beats = {m["slot"]: m["heartbeat_ns"] for m in pool.members()}
    time.sleep(2 * LEASE + 0.5)
    assert pool.recover() == {"members_recovered": 0, "blocks_freed": 0, "pins_dropped": 0}
    assert all(m["alive"] for m in pool.members())
    assert all(m["heartbeat_ns"] > beats[m["slot"]] for m in pool.members() if not m["self"])
    s = pool.stats()
    assert s["writing"] == sum(x["writing"] for x in sa + sb) and s["pinned"] == sum(x["pinned"] for x in sa + sb)
    pool.check(strict=True)
    assert a.stop() == 0 and b.stop() == 0
    assert [m["self"] for m in pool.members()] == [True]
    s = pool.stats()
    assert s["writing"] == 0 and s["pinned"] == 0 and s["free"] + s["sealed"] == s["total"]


def test_killed_host_is_recovered_by_survivors_after_the_lease(rig) -> None:
    pool, r = rig
    free0 = pool.stats()["free"]
    a = r.start("a", "hold", "--members", "3", "--alloc", "4", "--pins", "2", "--reserve", "3",
                "--prompt-base", "0")
    b = r.start("b", "hold", "--members", "1", "--alloc", "2", "--pins", "1", "--reserve", "1",
                "--prompt-base", "10", "--recover-every", "0.1")
    sa = a.wait_status(3)
    sb = b.wait_status(1)[0]
    a_procs = a.processes()
    assert len(a_procs) == 3
    a.kill()  # SIGKILL to the namespace init: the kernel kills the whole host
    assert a.processes() == [] and all(not os.path.exists(f"/proc/{p}") for p in a_procs)
    killed_at = time.monotonic()
    # Within the lease the dead host's members still count as alive: no pid can tell otherwise.
    early = pool.recover()
    if time.monotonic() - killed_at < LEASE - 0.5:  # (on a badly overloaded machine the lease may be over)
        assert early == {"members_recovered": 0, "blocks_freed": 0, "pins_dropped": 0}
        assert len(pool.members()) == 1 + 3 + 1
    want = {"members_recovered": 3, "blocks_freed": sum(s["writing"] for s in sa),
            "pins_dropped": sum(s["pinned"] for s in sa)}
    assert want == {"members_recovered": 3, "blocks_freed": 3 * 7, "pins_dropped": 3 * 2}
    # The survivor host reclaims them once the lease has run out.
    b_want = {k: want[k] - early[k] for k in want}  # all of it, unless the lease ran out before our call
    sb = b.wait_status(1, timeout=20, until=lambda st: st[0]["recovered"]["members_recovered"] >=
                       b_want["members_recovered"])[0]
    assert time.monotonic() - killed_at >= LEASE - 0.3
    assert sb["recovered"] == b_want
    assert {m["slot"] for m in pool.members()} == {pool._core.member_slot, sb["slot"]}
    s = pool.stats()
    assert s["writing"] == sb["writing"] and s["pinned"] == sb["pinned"] and s["evicting"] == 0
    pool.check(strict=True)
    # The dead host's half-written keys can be written again; its sealed keys are still cached.
    from pykvshm.testing import blocks_for_keys, prompt_keys

    for s_ in sa:
        keys = prompt_keys(pool.spec, s_["member"], 5, salt=b"rig")
        assert pool.match(keys) == 2
        assert pool.publish(keys, blocks_for_keys(keys, pool.spec)) == 3
    assert b.stop() == 0
    s = pool.stats()
    assert s["writing"] == 0 and s["pinned"] == 0 and s["free"] + s["sealed"] == s["total"] == free0
    assert [m["self"] for m in pool.members()] == [True]
    pool.check(strict=True)


@pytest.mark.parametrize("coherence, seconds", [("coherent", 12), ("noncoherent", 8)])
def test_torture_across_hosts_with_host_kills(tmp_path: Path, coherence: str, seconds: float) -> None:
    """Noncoherent is the mode for CXL 2.0 memory shared by hosts; on one machine its flushes are
    functionally no-ops, but its code paths run under host kills."""
    seconds = float(os.environ.get("PYKVSHM_RIG_SECONDS", seconds))
    rep = run_rig_torture(unique_name("rig"), tmp_path, hosts=3, procs=2, seconds=seconds, lease=LEASE, seed=3,
                          coherence=coherence, min_host_kills=3)
    assert rep["host_kills"] >= 3
    # Every namespace is a host of its own.  The kernel reuses the inode number of a dead PID
    # namespace, so a host started after a killed one may get the dead host's id: never while
    # that host has a process left, and its dead members then fail the pid + start-time check.
    ids = rep["host_ids"]
    assert len(ids) == rep["hosts_started"]
    assert all((a[0] == b[0]) == (a[1] == b[1]) for a in ids for b in ids)
    assert len({i[0] for i in ids[-3:]}) == 3  # the hosts alive at the end
    assert rep["check_failures"] == []
    assert rep["leaked_blocks"] == 0 and rep["leaked_pins"] == 0
    assert rep["wrong_reads"] == 0
    assert rep["verified_reads"] > 0
    assert rep["worker_errors"] == 0
    # Whole hosts died with members attached; somebody recovered them by lease.
    assert rep["members_recovered"] >= rep["host_kills"]
