"""kill -9 torture: workers publish, acquire, allocate and recover in loops and are killed at random.

Used by tests/crash/test_torture.py (a few hundred kills in CI) and bench/torture.py
(thousands).  After every round all workers are dead; a survivor recovers and then
checks, exactly:

* no block leaked: nothing is WRITING or EVICTING, nothing is pinned, free + sealed == total;
* ``check(strict=True)`` passes (index and states agree, no key stored twice);
* every cached block has the content its key implies, and no worker ever read a
  block whose bytes were not its key's (workers count wrong reads in shared memory
  with no lock, so a killed worker cannot wedge the count).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from ..errors import PoolError, PoolFullError
from ..pool import Pool
from ..spec import KVSpec
from .content import blocks_for_keys, count_wrong_blocks, prompt_keys, write_layer_by_layer

_CTX = mp.get_context("fork")
_MAX_WORKERS = 1 << 16


@dataclass
class TortureReport:
    kills: int = 0
    rounds: int = 0
    workers_started: int = 0
    members_recovered: int = 0
    blocks_reclaimed: int = 0  # by the end-of-round survivor
    pins_dropped: int = 0  # by the end-of-round survivor
    leaked_blocks: int = 0
    leaked_pins: int = 0
    wrong_reads: int = 0
    verified_reads: int = 0
    check_failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def ok(self) -> bool:
        return self.leaked_blocks == 0 and self.leaked_pins == 0 and self.wrong_reads == 0 and not self.check_failures

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _prompt_keys(spec: KVSpec, prompt: int, blocks: int) -> list[bytes]:
    return prompt_keys(spec, prompt, blocks, salt=b"torture")


def _worker(name: str, slot: int, seed: int, prompts: int, blocks: int, wrong, reads, parent: int,
            lease: float = 10.0) -> None:
    """Loops until killed.  Never takes a lock shared with other processes.  ``lease`` is the
    heartbeat lease after which this worker judges a silent member of another host dead."""
    rng = random.Random(seed)
    try:
        pool = Pool.open(name, lease=lease)
    except PoolError:
        os._exit(3)
    spec = pool.spec
    out = np.empty((blocks, *spec.block_shape), dtype=spec.np_dtype)
    held: list[int] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and os.getppid() == parent:
        op = rng.random()
        try:
            if op < 0.40:
                keys = _prompt_keys(spec, rng.randrange(prompts), blocks)
                upto = rng.randint(1, blocks)
                how = rng.random()
                if how < 0.35:
                    pool.publish(keys[:upto], blocks_for_keys(keys[:upto], spec))
                elif how < 0.65:
                    with pool.writer(keys[:upto]) as w:
                        write_layer_by_layer(w, keys[:upto], spec)
                else:
                    # A layer-wise transfer whose copies are queued on the copy engine (a kill
                    # lands with copies in flight), some layers written in place.
                    from ..transfer import TransferProducer

                    data = blocks_for_keys(keys[:upto], spec)
                    with TransferProducer(pool, f"torture-{slot}-{rng.random()}", keys[:upto]) as tx:
                        for layer in range(spec.num_layers):
                            if rng.random() < 0.3:
                                views = tx.layer_views(layer)
                                for j, v in enumerate(views):
                                    if v is not None:
                                        v[...] = data[j, layer]
                                del views
                                tx.put_layer(layer)
                            else:
                                tx.put_layer(layer, np.ascontiguousarray(data[:, layer]))
            elif op < 0.80:
                keys = _prompt_keys(spec, rng.randrange(prompts), blocks)
                with pool.acquire(keys) as lease:
                    n = len(lease)
                    if rng.random() < 0.3 and n:
                        # The batched gather, queued on the copy engine (release waits for it).
                        fut = lease.read_spans(out, np.arange(n), 0, np.arange(n) * spec.block_bytes,
                                               spec.block_bytes, wait=False)
                        fut.wait()
                        want = blocks_for_keys(keys[:n], spec)
                        bad = int(sum(out[j].tobytes() != want[j].tobytes() for j in range(n)))  # NaN-safe
                    else:
                        bad = count_wrong_blocks(lease, keys, None if rng.random() < 0.5 else out)
                if bad:
                    wrong[slot] += bad
                reads[slot] += n
            elif op < 0.92:
                if held and rng.random() < 0.5:
                    pool.free(np.array(held, dtype=np.uint64))
                    held = []
                else:
                    held.extend(pool.alloc(rng.randint(1, 8)).tolist())
            else:
                pool.recover()
        except PoolFullError:
            if held:
                pool.free(np.array(held, dtype=np.uint64))
                held = []
    os._exit(0)


def run_torture(
    name: str,
    *,
    kills: int,
    procs: int = 3,
    spec: KVSpec | None = None,
    capacity: str | int = "3MiB",
    prompts: int = 24,
    blocks: int = 8,
    kills_per_round: int = 10,
    seed: int = 0,
    coherence: str = "coherent",
    progress: Callable[[TortureReport], None] | None = None,
    lock_shards: int | None = None,
) -> TortureReport:
    """Create pool ``name``, torture it until ``kills`` workers were SIGKILLed, destroy it, report."""
    spec = spec or KVSpec(2, 2, 32, 16, "float16")  # 8 KiB blocks
    rng = random.Random(seed)
    rep = TortureReport()
    t0 = time.monotonic()
    wrong = _CTX.RawArray("q", _MAX_WORKERS)
    reads = _CTX.RawArray("q", _MAX_WORKERS)
    pool = Pool.create(name, spec=spec, capacity=capacity, coherence=coherence, lock_shards=lock_shards)
    try:
        live: list[mp.process.BaseProcess] = []

        def start() -> None:
            slot = rep.workers_started % _MAX_WORKERS
            p = _CTX.Process(target=_worker, args=(name, slot, rng.randrange(1 << 30), prompts, blocks, wrong, reads,
                                                   os.getpid()), daemon=True)
            p.start()
            rep.workers_started += 1
            live.append(p)

        while rep.kills < kills:
            for _ in range(procs):
                start()
            for _ in range(kills_per_round):
                if rep.kills >= kills:
                    break
                time.sleep(rng.uniform(0.002, 0.03))
                victim = live.pop(rng.randrange(len(live)))
                _kill(victim, rep)
                start()  # the replacement recovers the victim on attach, and may itself be killed doing so
            # End of round: kill the rest, then recover and check from the survivor (this process).
            for p in live:
                _kill(p, rep)
            live.clear()
            rep.rounds += 1
            _check_round(pool, spec, prompts, blocks, rep)
            if progress:
                progress(rep)
    finally:
        rep.wrong_reads = int(sum(wrong))
        rep.verified_reads = int(sum(reads))
        rep.seconds = time.monotonic() - t0
        try:
            pool.close()
        finally:
            Pool.destroy(name)
    return rep


def _kill(p: mp.process.BaseProcess, rep: TortureReport) -> None:
    try:
        os.kill(p.pid, signal.SIGKILL)  # type: ignore[arg-type]
    except ProcessLookupError:
        pass
    p.join(10)
    if p.exitcode == -signal.SIGKILL:
        rep.kills += 1
    else:
        rep.check_failures.append(f"worker {p.pid} ended by itself with exit code {p.exitcode} (an error in the worker)")


def _check_round(pool: Pool, spec: KVSpec, prompts: int, blocks: int, rep: TortureReport) -> None:
    r = pool.recover()
    rep.blocks_reclaimed += r["blocks_freed"]
    rep.pins_dropped += r["pins_dropped"]
    members = pool.members()
    if len(members) != 1:
        rep.check_failures.append(f"round {rep.rounds}: {len(members) - 1} dead members left after recover()")
    s = pool.stats()
    rep.members_recovered = s["recovered_members"]  # by any process: replacements recover on attach
    leaked = s["writing"] + s["evicting"]
    if s["free"] + s["sealed"] + leaked != s["total"]:
        rep.check_failures.append(f"round {rep.rounds}: accounting does not add up: {s}")
    rep.leaked_blocks += leaked
    rep.leaked_pins += s["pinned"]
    try:
        pool.check(strict=True)
    except PoolError as e:
        rep.check_failures.append(f"round {rep.rounds}: {e}")
    unguarded = pool._core.lock_stats().get("unguarded_writes", 0)
    if unguarded:
        rep.check_failures.append(f"round {rep.rounds}: {unguarded} metadata writes outside their lock")
    for prompt in range(prompts):
        keys = _prompt_keys(spec, prompt, blocks)
        with pool.acquire(keys) as lease:
            bad = count_wrong_blocks(lease, keys)
        if bad:
            rep.check_failures.append(f"round {rep.rounds}: {bad} cached blocks of prompt {prompt} hold wrong bytes")
