"""Several hosts on one machine: each emulated host is a process tree in its own PID and network
namespace (``unshare --pid --net --fork --mount-proc``), and all of them map one pool.

Why it emulates hosts faithfully enough for pykvshm: a member's host id is derived from the boot
id and the PID namespace (``local_host_id``), so every namespace is a host of its own, and a pid
recorded by a member of another namespace means nothing to the others.  Liveness across hosts
therefore goes through the heartbeat lease only, exactly as between two machines sharing CXL
memory.  Killing a namespace's init (SIGKILL) kills every process in it at once: a whole host
dies.  What it does not emulate: separate kernels, caches or clocks (all hosts share one
coherent memory and one ``CLOCK_REALTIME``).

The test process drives hosts through files in a work directory: each member writes its status
as JSON (``<host>.<member>.json``), a host stops cleanly when ``<host>.stop`` appears, and every
host's stdout and stderr go to ``<host>.log``.

Host programs (run as ``python -m pykvshm.testing.rig <task> ...`` inside the namespaces):

* ``hold``: ``--members`` processes each attach, allocate blocks, pin published keys and leave a
  writer half-written, report, then idle (the heartbeat timer keeps them alive), optionally
  calling ``recover()`` every ``--recover-every`` seconds and reporting what it reclaimed.
* ``torture``: keeps ``--procs`` torture workers (:mod:`pykvshm.testing.torture`) running, kills
  one of its own at random now and then, and counts wrong reads in a shared counters file.

Used by tests/crash/test_multihost.py; :func:`run_rig_torture` is the multi-host torture run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

UNSHARE_ARGS = ["--pid", "--net", "--fork", "--mount-proc", "--kill-child"]
MAX_HOST_SECONDS = 180.0  # a host whose driver vanished exits by itself after this long
_COUNTER_SLOTS = 1 << 16  # per row of the torture counters file
_SLOTS_PER_HOST = 4096


_USERNS_ARGS = ["--user", "--map-root-user"]  # for a process that is not root: an unprivileged user namespace
_ARGS_CACHE: list[str] | None = None


def namespaces_available() -> tuple[bool, str]:
    """Whether this process can create PID + network namespaces; otherwise (False, why).
    Not root, it tries an unprivileged user namespace as well."""
    global _ARGS_CACHE
    exe = shutil.which("unshare")
    if exe is None:
        return False, "the unshare command (util-linux) is not installed"
    tries = [UNSHARE_ARGS] + ([_USERNS_ARGS + UNSHARE_ARGS] if os.geteuid() != 0 else [])
    why = ""
    for args in tries:
        try:
            r = subprocess.run([exe, *args, "true"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            why = f"`unshare {' '.join(args)} true` failed: {e}"
            continue
        if r.returncode == 0:
            _ARGS_CACHE = args
            return True, ""
        why = f"`unshare {' '.join(args)} true`: {r.stderr.strip() or f'exit status {r.returncode}'}"
    return False, (f"cannot create PID and network namespaces ({why}); the multi-host rig needs root or "
                   "unprivileged user namespaces")


def _unshare_args() -> list[str]:
    if _ARGS_CACHE is None:
        ok, why = namespaces_available()
        if not ok:
            raise RuntimeError(why)
    assert _ARGS_CACHE is not None
    return _ARGS_CACHE


def pid_namespace(pid: int | str = "self") -> str:
    """The PID namespace of a process, as ``pid:[inode]``."""
    return os.readlink(f"/proc/{pid}/ns/pid")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


class Host:
    """One emulated host: an ``unshare`` process whose child is the init of a new PID namespace."""

    def __init__(self, name: str, workdir: Path, proc: subprocess.Popen[bytes], log: Any) -> None:
        self.name = name
        self.workdir = workdir
        self.proc = proc
        self._log = log
        self._init_pid: int | None = None
        self._ns: str | None = None

    @property
    def init_pid(self) -> int:
        """The namespace init's pid as this (outer) namespace sees it."""
        if self._init_pid is None:
            deadline = time.monotonic() + 15
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            while True:
                try:
                    kids = children.read_text().split()
                except OSError:
                    kids = []
                if kids:
                    self._init_pid = int(kids[0])
                    self._ns = pid_namespace(self._init_pid)
                    break
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"host {self.name}: namespace init did not start; log:\n{self.log_tail()}")
                time.sleep(0.01)
        return self._init_pid

    @property
    def pid_ns(self) -> str:
        self.init_pid
        assert self._ns is not None
        return self._ns

    def processes(self) -> list[int]:
        """Pids (outer view) of every process still in this host's PID namespace."""
        out = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    if os.readlink(d / "ns" / "pid") == self.pid_ns:
                        out.append(int(d.name))
                except OSError:
                    pass
        return out

    def status(self, member: int = 0) -> dict[str, Any] | None:
        try:
            return dict(json.loads((self.workdir / f"{self.name}.{member}.json").read_text()))
        except (OSError, ValueError):
            return None

    def wait_status(self, members: int = 1, timeout: float = 30.0, until: Any = None) -> list[dict[str, Any]]:
        """Wait until members 0..members-1 have reported (and ``until(statuses)`` holds)."""
        deadline = time.monotonic() + timeout
        while True:
            st = [self.status(i) for i in range(members)]
            if all(s is not None for s in st):
                ready = [s for s in st if s is not None]
                if until is None or until(ready):
                    return ready
            if self.proc.poll() is not None:
                raise RuntimeError(f"host {self.name} exited ({self.proc.returncode}); log:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"host {self.name}: no (matching) status after {timeout} s: {st}; log:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the namespace init: the kernel then kills every process of the host."""
        os.kill(self.init_pid, signal.SIGKILL)
        self.proc.wait(30)
        self._log.close()

    def stop(self, timeout: float = 60.0) -> int:
        """Ask the host to leave cleanly; returns the exit status of its init (killed on timeout)."""
        (self.workdir / f"{self.name}.stop").touch()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"host {self.name} did not stop within {timeout} s; log:\n{self.log_tail()}")
        self._log.close()
        return int(self.proc.returncode)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return (self.workdir / f"{self.name}.log").read_text()[-n:]
        except OSError:
            return ""


class Rig:
    """Starts hosts on pool ``pool`` with work files in ``workdir``; kills what is left on exit."""

    def __init__(self, pool: str, workdir: Path | str, lease: float = 1.0) -> None:
        self.pool = pool
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.lease = lease
        self.hosts: list[Host] = []

    def start(self, name: str, task: str, *args: str) -> Host:
        exe = shutil.which("unshare") or "unshare"
        log = open(self.workdir / f"{name}.log", "wb")
        cmd = [exe, *_unshare_args(), sys.executable, "-m", "pykvshm.testing.rig", task, "--pool", self.pool,
               "--workdir", str(self.workdir), "--name", name, "--lease", str(self.lease), *args]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        host = Host(name, self.workdir, proc, log)
        self.hosts.append(host)
        return host

    def close(self) -> None:
        for h in self.hosts:
            if h.proc.poll() is None:
                try:
                    h.kill()
                except (ProcessLookupError, RuntimeError, subprocess.TimeoutExpired):
                    h.proc.kill()  # unshare --kill-child takes the namespace init with it
                    h.proc.wait(30)
            h._log.close()

    def __enter__(self) -> "Rig":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# The multi-host torture run (driver side)


def run_rig_torture(
    name: str,
    workdir: Path | str,
    *,
    hosts: int = 3,
    procs: int = 2,
    seconds: float = 12.0,
    host_kill_every: tuple[float, float] = (1.5, 3.0),
    lease: float = 1.5,
    capacity: str = "6MiB",
    seed: int = 0,
    coherence: str = "coherent",
    min_host_kills: int = 0,
) -> dict[str, Any]:
    """Create pool ``name``; ``hosts`` hosts run torture workers; host 0 is killed whole (and a new
    host 0, in a new namespace, started) every few seconds, for ``seconds`` and at least
    ``min_host_kills`` times (a loaded machine starts hosts slowly, and a run that killed too few
    tested less than it claims).  Then every host stops, the lease passes, and this process
    recovers and checks exactly (see torture.py).  Destroys the pool."""
    from ..pool import Pool
    from ..spec import KVSpec
    from .torture import TortureReport, _check_round

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    spec = KVSpec(2, 2, 32, 16, "float16")
    prompts, blocks = 24, 8
    counters_path = workdir / "counters.bin"
    counters_path.write_bytes(bytes(3 * _COUNTER_SLOTS * 8))
    rep = TortureReport()
    # host_ids: (host id, PID namespace, killed) of every host started, in order.
    extra: dict[str, Any] = {"host_kills": 0, "hosts_started": 0, "worker_errors": 0, "host_ids": []}
    t0 = time.monotonic()
    pool = Pool.create(name, spec=spec, capacity=capacity, lease=lease, coherence=coherence)
    try:
        with Rig(name, workdir, lease=lease) as rig:
            generation = 0

            def start(i: int) -> Host:
                nonlocal generation
                h = rig.start(f"h{i}g{generation}", "torture", "--procs", str(procs), "--seed",
                              str(rng.randrange(1 << 30)), "--counters", str(counters_path),
                              "--host-index", str(generation % (_COUNTER_SLOTS // _SLOTS_PER_HOST)),
                              "--prompts", str(prompts), "--blocks", str(blocks))
                generation += 1
                extra["hosts_started"] += 1
                return h

            live = [start(i) for i in range(hosts)]
            end = time.monotonic() + seconds
            while time.monotonic() < end or extra["host_kills"] < min_host_kills:
                time.sleep(rng.uniform(*host_kill_every))
                victim = live[0]
                victim.wait_status(1, timeout=30)  # it got going (its driver reported its host id)
                st = victim.status(0) or {}
                extra["host_ids"].append((st.get("host_id"), st.get("pid_ns"), True))
                victim.kill()
                extra["host_kills"] += 1
                live[0] = start(0)
            for h in live:
                h.wait_status(1, timeout=30)
                if h.stop() != 0:
                    rep.check_failures.append(f"host {h.name} stopped with status {h.proc.returncode}: {h.log_tail()}")
                st = h.status(0) or {}
                extra["host_ids"].append((st.get("host_id"), st.get("pid_ns"), False))
                rep.kills += int(st.get("worker_kills", 0))
        # Members of killed hosts are only dead once their lease has run out.
        time.sleep(lease * 1.5 + 0.2)
        _check_round(pool, spec, prompts, blocks, rep)
        rep.rounds = 1
    finally:
        counters = np.fromfile(counters_path, dtype=np.int64).reshape(3, _COUNTER_SLOTS)
        rep.wrong_reads = int(counters[0].sum())
        rep.verified_reads = int(counters[1].sum())
        extra["worker_errors"] = int(counters[2].sum())
        rep.seconds = time.monotonic() - t0
        try:
            pool.close()
        finally:
            Pool.destroy(name)
    out = rep.as_dict()
    out.update(extra)
    return out


# ---------------------------------------------------------------------------------------------
# Host programs (namespace side)


def _stopped(args: argparse.Namespace) -> bool:
    return (Path(args.workdir) / f"{args.name}.stop").exists()


def _hold_member(args: argparse.Namespace, member: int) -> None:
    from ..pool import Pool
    from .content import blocks_for_keys, prompt_keys

    status_path = Path(args.workdir) / f"{args.name}.{member}.json"
    pool = Pool.open(args.pool, lease=args.lease)
    spec = pool.spec
    keys = prompt_keys(spec, args.prompt_base + member, args.pins + args.reserve, salt=b"rig")
    allocated = pool.alloc(args.alloc)
    pool.publish(keys[: args.pins], blocks_for_keys(keys[: args.pins], spec))
    lease = pool.acquire(keys[: args.pins])
    writer = pool.writer(keys[args.pins:])
    writer.write_layer(0, np.ascontiguousarray(blocks_for_keys(keys[args.pins:], spec)[:, 0]))
    recovered = {"members_recovered": 0, "blocks_freed": 0, "pins_dropped": 0}
    status: dict[str, Any] = {
        "host": args.name, "member": member, "pid": os.getpid(), "pid_ns": pid_namespace(),
        "slot": pool._core.member_slot, "host_id": pool._core.host_id, "allocated": len(allocated),
        "pinned": len(lease), "writing": len(allocated) + len(writer), "recovered": recovered, "closed": False,
    }
    _write_json(status_path, status)
    deadline = time.monotonic() + MAX_HOST_SECONDS
    next_recover = time.monotonic() + (args.recover_every or 0)
    while not _stopped(args) and time.monotonic() < deadline:
        time.sleep(0.05)
        if args.recover_every and time.monotonic() >= next_recover:
            next_recover = time.monotonic() + args.recover_every
            r = pool.recover()
            if any(r.values()):
                for k in recovered:
                    recovered[k] += int(r[k])
                _write_json(status_path, status)
    lease.release()
    writer.abort()
    pool.free(allocated)
    pool.close()
    status["closed"] = True
    _write_json(status_path, status)


def _task_hold(args: argparse.Namespace) -> int:
    children = []
    for member in range(1, args.members):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _hold_member(args, member)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children.append(pid)
    _hold_member(args, 0)
    code = 0
    for pid in children:
        _, st = os.waitpid(pid, 0)
        code |= int(os.waitstatus_to_exitcode(st) != 0)
    return code


def _task_torture(args: argparse.Namespace) -> int:
    from ..pool import Pool
    from .torture import _worker

    counters = np.memmap(args.counters, dtype=np.int64, mode="r+", shape=(3, _COUNTER_SLOTS))
    wrong, reads, errors = counters[0], counters[1], counters[2]
    rng = random.Random(args.seed)
    me = os.getpid()
    workers: set[int] = set()
    killed: set[int] = set()
    started = 0
    kills = 0
    status_path = Path(args.workdir) / f"{args.name}.0.json"
    probe = Pool.open(args.pool, lease=args.lease)
    status: dict[str, Any] = {"host": args.name, "pid_ns": pid_namespace(), "host_id": probe._core.host_id,
                              "worker_kills": 0}
    probe.close()
    _write_json(status_path, status)

    def spawn() -> None:
        nonlocal started
        slot = args.host_index * _SLOTS_PER_HOST + started % _SLOTS_PER_HOST
        seed = rng.randrange(1 << 30)
        started += 1
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                _worker(args.pool, slot, seed, args.prompts, args.blocks, wrong, reads, me, lease=args.lease)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stderr.flush()
                os._exit(code)
        workers.add(pid)

    def reap(block: bool) -> None:
        while workers:
            pid, st = os.waitpid(-1, 0 if block else os.WNOHANG)
            if pid == 0:
                return
            workers.discard(pid)
            if pid in killed:
                killed.discard(pid)
            elif os.waitstatus_to_exitcode(st) != 0:
                errors[args.host_index] += 1

    deadline = time.monotonic() + MAX_HOST_SECONDS
    while not _stopped(args) and time.monotonic() < deadline:
        reap(False)
        while len(workers) < args.procs:
            spawn()
        time.sleep(rng.uniform(0.005, 0.04))
        if args.kill_chance and rng.random() < args.kill_chance:
            victim = rng.choice(sorted(workers))
            killed.add(victim)
            os.kill(victim, signal.SIGKILL)
            kills += 1
    for pid in workers:
        killed.add(pid)
        os.kill(pid, signal.SIGKILL)
        kills += 1
    reap(True)
    # Same host, same PID namespace: the killed workers are dead by pid, without waiting a lease.
    with Pool.open(args.pool, lease=args.lease) as pool:
        status["recovered"] = pool.recover()
    status["worker_kills"] = kills
    _write_json(status_path, status)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pykvshm.testing.rig", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="task", required=True)
    for task in ("hold", "torture"):
        s = sub.add_parser(task)
        s.add_argument("--pool", required=True)
        s.add_argument("--workdir", required=True)
        s.add_argument("--name", required=True)
        s.add_argument("--lease", type=float, default=1.0)
        if task == "hold":
            s.add_argument("--members", type=int, default=1)
            s.add_argument("--alloc", type=int, default=3)
            s.add_argument("--pins", type=int, default=2)
            s.add_argument("--reserve", type=int, default=2)
            s.add_argument("--prompt-base", type=int, default=0)
            s.add_argument("--recover-every", type=float, default=0.0)
        else:
            s.add_argument("--procs", type=int, default=2)
            s.add_argument("--seed", type=int, default=0)
            s.add_argument("--counters", required=True)
            s.add_argument("--host-index", type=int, default=0)
            s.add_argument("--prompts", type=int, default=24)
            s.add_argument("--blocks", type=int, default=8)
            s.add_argument("--kill-chance", type=float, default=0.02)
    args = p.parse_args(argv)
    return _task_hold(args) if args.task == "hold" else _task_torture(args)


if __name__ == "__main__":
    sys.exit(main())
