"""Benchmark plumbing shared by the packaged suite (``pykvshm bench``) and the scripts in bench/.

* which transports exist here, and how to build one side of each (``make_side``);
* a two-process runner (``run_pair``): a producer and a consumer child, spawned, talking through
  the parent, which relays their messages, collects results and progress, and enforces a
  wall-clock budget; children leave with ``os._exit`` (NIXL 1.5.1 can segfault at interpreter
  shutdown after transfers) and are killed if they overstay;
* scratch pools that are destroyed however a run ends (``scratch_pool``, ``destroy_scratch_pools``);
* timing (``now``: CLOCK_MONOTONIC, shared by the processes of one host), statistics, formatting.

Timestamps taken in two processes are comparable because both read CLOCK_MONOTONIC
(``time.monotonic_ns``). Across hosts they would not be: time a round trip instead.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import platform
import statistics
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

ALL_TRANSPORTS = ("pool", "tcp", "nixl", "mooncake")
# The pool as engines use it in place (the handoff benchmark): the producer's KV is already in the
# pool's blocks ("pool-inplace"), and also the consumer reads the blocks where they are ("pool-zerocopy").
POOL_MODES = ("pool-inplace", "pool-zerocopy")
HANDOFF_TRANSPORTS = ("pool", *POOL_MODES, "tcp", "nixl", "mooncake")

# transport -> (options for both sides, environment for the children)
TRANSPORT_OPTIONS: dict[str, tuple[dict[str, Any], dict[str, str]]] = {
    "pool": ({}, {}),
    "pool-inplace": ({"producer_in_place": True}, {}),
    "pool-zerocopy": ({"producer_in_place": True, "consumer_in_place": True}, {}),
    "tcp": ({}, {}),
    # UCX picks CMA (process_vm_writev) for the data and tcp/lo for the notification here
    "nixl": ({"ucx_net_devices": "lo"}, {}),
    "mooncake": ({}, {"GLOG_minloglevel": "2"}),
}



# -- time and statistics --------------------------------------------------------------------------
def now() -> int:
    """Nanoseconds of CLOCK_MONOTONIC: comparable between processes of one host."""
    return time.monotonic_ns()


def median(xs: Iterable[float]) -> float | None:
    xs = list(xs)
    return statistics.median(xs) if xs else None


def summary(xs: Iterable[float]) -> dict[str, Any]:
    """Median, quartiles, min, max and count of a list of seconds (None when empty)."""
    xs = sorted(xs)
    if not xs:
        return {"n": 0, "median": None, "p25": None, "p75": None, "min": None, "max": None}
    q = np.percentile(xs, [25, 50, 75])
    return {"n": len(xs), "median": float(q[1]), "p25": float(q[0]), "p75": float(q[2]),
            "min": float(xs[0]), "max": float(xs[-1])}


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            v = n / scale
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{int(n)} B"


def fmt_ratio(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 10:
        return f"{x:.1f}x"
    return f"{x:.2f}x" if x >= 0.1 else f"{x:.3f}x"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    for suffix, scale in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)):
        if t.endswith(suffix):
            return int(float(t[:-1]) * scale)
    return int(t)


def warm_pool_in_turn(side: Any, role: str, link: Any) -> None:
    """Populate each process's page tables for the pool (what Pool.open(prefault=True) would do),
    consumer first, then producer: each allocates every free block while it warms."""
    if role == "consumer":
        link.expect("warmed")
    warm_pool_mapping(side.pool)
    link.send(("warmed", role))
    if role == "producer":
        link.expect("warmed")


def memcpy_times(nbytes: int, reps: int) -> list[float]:
    """``numpy.copyto`` of ``nbytes`` between two warm buffers, one thread, ``reps`` times (s)."""
    src = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
    dst = np.zeros_like(src)
    np.copyto(dst, src)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        np.copyto(dst, src)
        out.append((time.perf_counter_ns() - t0) / 1e9)
    return out


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# -- transports -------------------------------------------------------------------------------------
def transport_status(name: str) -> str | None:
    """None when ``name`` can run here, else the reason it cannot (printed when skipped)."""
    if name not in TRANSPORT_OPTIONS:
        return f"unknown transport (known: {', '.join(ALL_TRANSPORTS)})"
    if name in ("pool", "pool-inplace", "pool-zerocopy", "tcp"):
        return None
    from pykvshm.transfer.baselines import get_transport

    cls = get_transport(name)
    if cls.available():
        return None
    module = sys.modules.get(cls.__module__)
    install = getattr(module, "INSTALL", "")
    try:  # the import error itself says why (package missing, libibverbs missing, ...)
        cls.producer()
    except ImportError as e:
        return f"not available: {e}"
    except Exception:  # noqa: BLE001
        pass
    return f"not available; install with: {install}"


def select_transports(text: str) -> tuple[list[str], dict[str, str]]:
    """The transports of a comma list that can run here, and the skipped ones with reasons."""
    run, skipped = [], {}
    for name in [t.strip() for t in text.split(",") if t.strip()]:
        reason = transport_status(name)
        if reason is None:
            run.append(name)
        else:
            skipped[name] = reason
            print(f"skipping {name}: {reason}", file=sys.stderr)
    return run, skipped


def is_pool(name: str) -> bool:
    """The pool transport, in any of its modes."""
    return name == "pool" or name.startswith("pool-")


def make_side(name: str, role: str, **pool_options: Any):
    """One side (``role`` = producer / consumer) of transport ``name``.

    For the pool, ``pool_options`` are ``pool=<name>, spec=<KVSpec>`` (the parent created it).
    """
    from pykvshm.transfer.baselines import get_transport

    options = dict(TRANSPORT_OPTIONS[name][0])
    options.update(pool_options)
    cls = get_transport("pool" if is_pool(name) else name)
    return cls.producer(**options) if role == "producer" else cls.consumer(**options)


# Names handed out by unique_pool_name in this process: destroy_scratch_pools removes whichever of
# them still exist, so a run that is interrupted between creating a pool and its own clean-up
# leaves nothing in /dev/shm.
_SCRATCH_NAMES: set[str] = set()


def unique_pool_name(tag: str) -> str:
    """A pool name no other process uses; remembered for :func:`destroy_scratch_pools`."""
    name = f"pykvshm-bench-{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    _SCRATCH_NAMES.add(name)
    return name


def destroy_scratch_pools() -> list[str]:
    """Destroy the pools named by :func:`unique_pool_name` here that still exist; returns their names."""
    from pykvshm import Pool
    from pykvshm.errors import PoolNotFoundError

    removed = []
    for name in sorted(_SCRATCH_NAMES):
        try:
            Pool.destroy(name)
            removed.append(name)
        except PoolNotFoundError:
            pass
        _SCRATCH_NAMES.discard(name)
    return removed


@contextlib.contextmanager
def scratch_pool(tag: str, spec: Any, capacity: int | str, **options: Any) -> Iterator[Any]:
    """A fresh pool for one measurement, closed and destroyed when the block ends, however it ends."""
    from pykvshm import Pool
    from pykvshm.errors import PoolNotFoundError

    name = unique_pool_name(tag)
    pool = Pool.create(name, spec=spec, capacity=capacity, **options)
    try:
        yield pool
    finally:
        try:
            pool.close()
        finally:
            try:
                Pool.destroy(name)
            except PoolNotFoundError:
                pass
            _SCRATCH_NAMES.discard(name)


def pool_capacity(spec, request_blocks: int, at_least: int = 0) -> int:
    """Bytes for a pool that takes requests of ``request_blocks`` blocks and keeps a few.

    One transfer may cover at most a quarter of a pool (at least 64 blocks), so a pool for
    requests of n blocks needs 4n blocks; plus room for the header and channel table.
    """
    blocks = max(4 * request_blocks + 16, at_least, 16)
    return blocks * spec.block_bytes + (16 << 20)


def warm_pool_mapping(pool) -> int:
    """Populate this process's page tables for every block of ``pool``; returns blocks touched.

    What ``Pool.open(prefault=True)`` does, for a pool opened by ``PoolTransport`` (which does
    not forward ``prefault`` when it opens an existing pool). An engine maps its pool once at
    start-up; without this a freshly attached benchmark process pays a minor page fault per
    4 KiB page the first time it touches each block, inside the timed span. Allocates every free
    block, writes one byte per page, frees them: run it before any transfer, one process at a
    time.
    """
    free = int(pool.stats()["free"])
    if not free:
        return 0
    handles = pool.alloc(free, evict=False)
    try:
        for h in handles:
            v = pool.block_view(int(h))
            flat = v.reshape(-1).view(np.uint8)
            flat[::4096] = 0
            del v, flat
    finally:
        pool.free(handles)
    return free


def close_after_peer(side, role: str, link: "Link", timeout: float = 120.0) -> None:
    """Close ``side`` once the consumer is done with the connection.

    A producer whose last ``send`` returned may still have bytes in flight (TCP) or the
    consumer may not yet have seen the last notice; closing at once would make the consumer's
    wait fail with "connection lost". The consumer says "finished" after its last wait.
    """
    if role == "consumer":
        link.send(("finished", None))
    else:
        link.expect("finished", timeout)
    if side is not None:
        side.close()


# -- two-process runner -----------------------------------------------------------------------------
class Link:
    """A child's end of its pipe to the parent; messages the parent does not keep go to the peer."""

    def __init__(self, conn) -> None:
        self._conn = conn

    def send(self, msg: Any) -> None:
        self._conn.send(msg)

    def recv(self, timeout: float = 120.0) -> Any:
        if not self._conn.poll(timeout):
            raise TimeoutError(f"no message from the peer within {timeout:g} s")
        return self._conn.recv()

    def expect(self, what: str, timeout: float = 120.0) -> Any:
        """Receive a ``(what, value)`` message and return ``value``."""
        msg = self.recv(timeout)
        if not (isinstance(msg, tuple) and msg and msg[0] == what):
            raise RuntimeError(f"expected {what!r} from the peer, got {msg!r}")
        return msg[1] if len(msg) == 2 else msg[1:]

    def progress(self, n: int = 1) -> None:
        self._conn.send(("__progress__", n))

    def result(self, role: str, payload: Any) -> None:
        self._conn.send(("__result__", role, payload))


def _child_main(fn: Callable[..., Any], role: str, conn, env: dict[str, str], kwargs: dict[str, Any]) -> None:
    os.environ.update(env)
    link = Link(conn)
    try:
        payload = fn(role, link, **kwargs)
        link.result(role, payload)
    except BaseException:  # noqa: BLE001 - report everything to the parent
        try:
            conn.send(("__error__", role, traceback.format_exc()))
        except Exception:  # noqa: BLE001
            pass
    try:
        conn.close()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # NIXL 1.5.1 may segfault at interpreter shutdown after transfers


def run_pair(fn: Callable[..., Any], kwargs: dict[str, Any], *, env: dict[str, str] | None = None,
             budget: float = 600.0, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run ``fn(role, link, **kwargs)`` in a producer and a consumer child (spawned).

    Returns ``{"producer": payload, "consumer": payload, "error": text or None}``. Messages a
    child sends that are not its result, error or progress are relayed to the other child.
    ``budget`` bounds the whole run; children still alive 5 s after it are killed.
    """
    ctx = mp.get_context("spawn")
    pipes = {role: ctx.Pipe() for role in ("producer", "consumer")}
    procs = {role: ctx.Process(target=_child_main, args=(fn, role, pipes[role][1], env or {}, kwargs),
                               name=f"bench-{role}", daemon=True)
             for role in pipes}
    for p in procs.values():
        p.start()
    for _, child_end in pipes.values():
        child_end.close()  # so that a dead child reads as EOF here
    parent: dict[str, Any] = {role: pipes[role][0] for role in pipes}
    role_of: dict[Any, str] = {conn: role for role, conn in parent.items()}
    peer = {"producer": "consumer", "consumer": "producer"}
    out: dict[str, Any] = {"producer": None, "consumer": None, "error": None}
    errors: list[str] = []
    done: set[str] = set()
    open_conns = set(parent.values())
    deadline = time.monotonic() + budget
    try:
        while open_conns and len(done) < 2 and time.monotonic() < deadline:
            ready: list[Any] = mpc.wait(list(open_conns), timeout=0.5)
            for conn in ready:
                role = role_of[conn]
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    open_conns.discard(conn)
                    if role not in done:
                        errors.append(f"{role} exited without a result (exit code {procs[role].exitcode})")
                        done.add(role)
                        deadline = min(deadline, time.monotonic() + 3)
                    continue
                kind = msg[0] if isinstance(msg, tuple) and msg else None
                if kind == "__progress__":
                    if progress is not None:
                        progress(msg[1])
                elif kind == "__result__":
                    out[role] = msg[2]
                    done.add(role)
                elif kind == "__error__":
                    errors.append(f"{role} failed:\n{msg[2]}")
                    done.add(role)
                    deadline = min(deadline, time.monotonic() + 3)  # let the peer report its error too
                else:
                    other = parent[peer[role]]
                    if other in open_conns:
                        try:
                            other.send(msg)
                        except OSError:
                            pass
        if len(done) < 2 and not errors:
            errors.append(f"ran past its {budget:g} s budget")
    finally:
        for role, p in procs.items():
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(5)
        for conn in parent.values():
            conn.close()
    out["error"] = "\n".join(errors) or None
    return out


# -- reporting --------------------------------------------------------------------------------------
def environment() -> dict[str, Any]:
    """Where the figures came from."""
    info: dict[str, Any] = {
        "host": platform.node(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
        "platform": platform.platform(), "numpy": np.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    from importlib import metadata

    for dist in ("pykvshm", "nixl", "nixl-cu12", "mooncake-transfer-engine-non-cuda"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return info
