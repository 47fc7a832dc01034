"""Request handoff between two processes: the pool against the baseline transports.

One request's KV (layer-major, ``layers`` layers) crosses from a producer process to a consumer
process per repetition. The figure is the time from just before the producer's ``send`` to just
after the consumer's ``wait`` returned with every byte in its own buffer (CLOCK_MONOTONIC, shared
by both processes), so it includes the notification the decode worker waits for. Buffer
registration and per-request ``prepare`` (the pool: block allocation and channel open) are
outside the timed span; ``prepare`` is reported. Every byte is checked on the first warm-up and
the first and last timed repetition.

Used by ``pykvshm bench`` (quick sizes) and by ``bench/handoff.py`` (every size, plots).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from . import common

DEFAULT_SIZES = "16K,64K,256K,1M,4M,16M,64M,256M"
QUICK_SIZES = "16K,1M"
HEAD_DIM = 128
ITEMSIZE = 2  # float16


def spec_args(size: int, layers: int) -> dict[str, Any]:
    """A KVSpec (as kwargs) whose blocks tile ``size`` bytes: 1-8 KV heads, up to 16 tokens/block."""
    per_head_token = layers * 2 * HEAD_DIM * ITEMSIZE  # one token of one KV head, every layer
    if size % per_head_token:
        raise ValueError(f"{size} bytes is not a whole number of tokens for {layers} layers "
                         f"(multiples of {per_head_token} bytes)")
    kv_heads = 1
    while kv_heads < 8 and size % (per_head_token * kv_heads * 2) == 0:
        kv_heads *= 2
    tokens = size // (per_head_token * kv_heads)
    block_tokens = 1
    while block_tokens < 16 and tokens % (block_tokens * 2) == 0:
        block_tokens *= 2
    return {"num_layers": layers, "num_kv_heads": kv_heads, "head_dim": HEAD_DIM,
            "block_tokens": block_tokens, "dtype": "float16"}


def reps_for(size: int, scale: float, quick: bool) -> tuple[int, int]:
    """(timed repetitions, warm-up repetitions) for a size: more for small sizes."""
    if quick:
        return 3, 1
    if size <= 1 << 20:
        reps, warm = 50, 5
    elif size <= 16 << 20:
        reps, warm = 15, 3
    elif size <= 64 << 20:
        reps, warm = 7, 2
    else:
        reps, warm = 5, 2
    # the pool keeps a finished transfer channel for 2 s and has 64: stay under 64 per pool
    return min(60 - warm, max(3, int(round(reps * scale)))), warm


def payload(size: int) -> np.ndarray:
    return np.frombuffer(np.random.default_rng(size).bytes(size), dtype=np.uint8).copy()


# -- the two processes --------------------------------------------------------------------------------
def _side(role: str, link: common.Link, *, transport: str, plan: list[dict], token: str) -> dict:
    """Both children run this; returns per size the timestamps of every repetition."""
    from pykvshm import KVSpec

    out: dict[int, list] = {}
    shared = None
    if not common.is_pool(transport):  # one connection for the whole run, as an engine keeps it
        shared = common.make_side(transport, role)
        link.send(("meta", shared.metadata()))
        shared.connect(link.expect("meta"), timeout=60)
    for item in plan:
        size, reps, warm, layers = item["size"], item["reps"], item["warmup"], item["spec"]["num_layers"]
        if common.is_pool(transport):
            side = common.make_side(transport, role, pool=item["pool"], spec=KVSpec(**item["spec"]))
            link.send(("meta", side.metadata()))
            side.connect(link.expect("meta"), timeout=60)
            common.warm_pool_in_turn(side, role, link)  # map every page before timing
        else:
            side = shared
        buf = payload(size) if role == "producer" else np.zeros(size, np.uint8)
        expect = payload(size) if role == "consumer" else None
        check_at = {0, warm, warm + reps - 1}
        rows: list[Any] = []
        for rep in range(warm + reps):
            rid = f"handoff-{token}-{size}-{rep}"
            if role == "consumer":
                if rep in check_at:
                    buf.fill(0)
                side.register(rid, buf, layers)
                link.send(("ready", rep))
                side.wait(rid, timeout=120)
                t1 = common.now()
                assert expect is not None
                if rep in check_at and getattr(side, "consumer_in_place", False):
                    side.check_in_place(rid)  # read the views into buf, after the timed span
                if rep in check_at and not np.array_equal(buf, expect):
                    bad = int(np.flatnonzero(buf != expect)[0])
                    raise AssertionError(f"{transport}: corrupt data at {size} bytes, rep {rep}, first bad byte {bad}")
                side.release(rid)
                rows.append(t1)
                link.progress()
            else:
                side.register(rid, buf, layers)
                got = link.expect("ready")
                if got != rep:
                    raise RuntimeError(f"consumer is at repetition {got}, producer at {rep}")
                tp = common.now()
                side.prepare(rid, timeout=60)  # per-request setup, outside the timed span
                t0 = common.now()
                side.send(rid, timeout=120)
                t2 = common.now()
                side.release(rid)
                rows.append((tp, t0, t2))
        out[size] = rows
        if common.is_pool(transport):
            side.close()
    common.close_after_peer(shared, role, link)
    return out


# -- the parent ---------------------------------------------------------------------------------------
def run_transport(name: str, sizes: list[int], *, layers: int = 32, reps_scale: float = 1.0, quick: bool = False,
                  budget: float = 900.0, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Hand over one request per repetition through transport ``name`` at each size.

    Returns ``{"error": text or None, "sizes": {size: {"handoff_s": summary, ...}}}``. For the pool,
    one prefaulted pool per size is created here and destroyed before returning.
    """
    from pykvshm import KVSpec

    plan = []
    with contextlib.ExitStack() as pools:
        for size in sizes:
            reps, warm = reps_for(size, reps_scale, quick)
            sa = spec_args(size, layers)
            item: dict[str, Any] = {"size": size, "reps": reps, "warmup": warm, "spec": sa, "pool": None}
            if common.is_pool(name):
                spec = KVSpec(**sa)
                n = size // spec.block_bytes
                pool = pools.enter_context(common.scratch_pool("handoff", spec, common.pool_capacity(spec, n),
                                                               prefault=True))
                item["pool"] = pool.name
            plan.append(item)
        res = common.run_pair(_side, {"transport": name, "plan": plan, "token": uuid.uuid4().hex[:8]},
                              env=common.TRANSPORT_OPTIONS[name][1], budget=budget, progress=progress)
    out: dict[str, Any] = {"error": res["error"], "sizes": {}}
    prod, cons = res["producer"] or {}, res["consumer"] or {}
    for item in plan:
        size, warm = item["size"], item["warmup"]
        if size not in prod or size not in cons:
            continue
        p, c = prod[size], cons[size]
        handoff = [(t1 - t0) / 1e9 for (_, t0, _), t1 in zip(p, c)]
        send = [(t2 - t0) / 1e9 for _, t0, t2 in p]
        prep = [(t0 - tp) / 1e9 for tp, t0, _ in p]
        out["sizes"][size] = {
            "reps": item["reps"], "warmup": warm, "spec": item["spec"],
            "handoff_s": common.summary(handoff[warm:]), "send_return_s": common.summary(send[warm:]),
            "prepare_s": common.summary(prep[warm:]), "first_rep_handoff_s": handoff[0],
            "samples_s": handoff[warm:],
        }
    return out
