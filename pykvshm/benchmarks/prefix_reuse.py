"""Prefix reuse: requests that share long prefixes, handed from prefill to decode.

A workload of requests over a few system prompts, each request with a unique suffix (whole
blocks), prompts taken round robin. Each block's content is a function of its key (its prefix),
so two requests sharing a prefix share those blocks' bytes, and the consumer checks every byte
of every request.

* The pool: the producer opens the transfer with the request's chained block keys; blocks
  already in the pool (``pool.match``; the transfer pins them) are not written again, so a
  repeated prefix crosses nothing. The consumer still copies every block out of the pool.
* The baselines (tcp, nixl, mooncake) move every block of every request.

Used by ``pykvshm bench`` (a small workload) and by ``bench/prefix_reuse.py`` (the full one, plots).
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from . import common

SALT = b"pykvshm-bench-prefix-reuse"


@dataclasses.dataclass
class Workload:
    """The requests and the KV geometry; the defaults are bench/prefix_reuse.py's full run."""

    requests: int = 32
    prompts: int = 4  # distinct system prompts (shared prefixes)
    prefix_tokens: int = 2048
    suffix_tokens: str = "64,512"  # min,max unique tokens per request
    layers: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    block_tokens: int = 16
    seed: int = 0
    verify: bool = True

    @classmethod
    def quick(cls) -> "Workload":
        """6 requests, 2 prompts of 64 tokens, 4 layers: a few seconds per transport."""
        return cls(requests=6, prompts=2, prefix_tokens=64, suffix_tokens="16,48", layers=4, kv_heads=2)

    @property
    def spec(self) -> dict[str, Any]:
        return {"num_layers": self.layers, "num_kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "block_tokens": self.block_tokens, "dtype": "float16"}


def make_plan(w: Workload) -> list[dict]:
    """The requests: prompt index, suffix token count and seeds, deterministic."""
    rng = np.random.default_rng(w.seed)
    lo, hi = (int(x) for x in w.suffix_tokens.split(","))
    bt = w.block_tokens
    plan = []
    for i in range(w.requests):
        suffix = int(rng.integers(lo // bt, hi // bt + 1)) * bt
        plan.append({"index": i, "prompt": i % w.prompts, "suffix_tokens": suffix,
                     "blocks": (w.prefix_tokens + suffix) // bt})
    return plan


def request_tokens(item: dict, prefix_tokens: int, seed: int) -> np.ndarray:
    prompt = np.random.default_rng([seed, 1, item["prompt"]]).integers(0, 128_000, prefix_tokens, dtype=np.int64)
    suffix = np.random.default_rng([seed, 2, item["index"]]).integers(0, 128_000, item["suffix_tokens"], dtype=np.int64)
    return np.concatenate([prompt, suffix])


def fill_request(buf: np.ndarray, keys, layers: int) -> None:
    """Layer-major request buffer; block j's bytes are a function of keys[j] only."""
    n = len(keys)
    words = buf.view(np.uint64).reshape(layers, n, -1)
    seeds = np.array([int.from_bytes(bytes(k)[:8], "little") for k in keys], dtype=np.uint64)
    base = np.arange(layers * words.shape[2], dtype=np.uint64).reshape(layers, 1, -1)
    np.add(base, seeds.reshape(1, n, 1), out=words)


def _side(role: str, link: common.Link, *, transport: str, pool: str | None, spec: dict, plan: list[dict],
          prefix_tokens: int, seed: int, token: str, verify: bool) -> list[dict]:
    import pykvshm
    from pykvshm import KVSpec

    ks = KVSpec(**spec)
    layers, bt = ks.num_layers, ks.block_tokens
    side = common.make_side(transport, role, **({"pool": pool, "spec": ks} if transport == "pool" else {}))
    link.send(("meta", side.metadata()))
    side.connect(link.expect("meta"), timeout=60)
    if transport == "pool":
        common.warm_pool_in_turn(side, role, link)
    big = np.zeros(max(p["blocks"] for p in plan) * ks.block_bytes, np.uint8)
    big.fill(0)  # fault the pages in
    expect = np.zeros_like(big) if role == "consumer" and verify else None
    rows: list[dict[str, Any]] = []
    for item in plan:
        rid = f"prefix-{token}-{item['index']}"
        keys = pykvshm.block_keys(request_tokens(item, prefix_tokens, seed), bt, salt=SALT)
        n = len(keys)
        assert n == item["blocks"]
        buf = big[: n * ks.block_bytes]
        if role == "consumer":
            if verify:
                buf.fill(0)
            side.register(rid, buf, layers)
            link.send(("ready", item["index"]))
            side.wait(rid, timeout=300)
            t1 = common.now()
            if expect is not None:
                want = expect[: buf.nbytes]
                fill_request(want, keys, layers)
                if not np.array_equal(buf, want):
                    raise AssertionError(f"{transport}: request {item['index']} arrived corrupt")
            side.release(rid)
            rows.append({"t1": t1})
            link.progress()
        else:
            fill_request(buf, keys, layers)
            if transport == "pool":
                side.register(rid, buf, layers, keys=keys)
            else:
                side.register(rid, buf, layers)
            if link.expect("ready") != item["index"]:
                raise RuntimeError("producer and consumer disagree on the request")
            cached = side.pool.match(keys) if transport == "pool" else 0
            before = side.pool.stats()["bytes_in"] if transport == "pool" else 0
            tp = common.now()
            side.prepare(rid, timeout=60)  # pool: pins the cached prefix, allocates the rest
            t0 = common.now()
            side.send(rid, timeout=300)
            t2 = common.now()
            side.release(rid)
            # the pool's bytes_in counter also counts the cached blocks put_layer skips (reported
            # as found), so bytes moved = the blocks that were not cached
            counter = side.pool.stats()["bytes_in"] - before if transport == "pool" else None
            rows.append({"tp": tp, "t0": t0, "t2": t2, "blocks": n, "cached": cached,
                         "bytes_sent": (n - cached) * ks.block_bytes, "bytes_in_counter": counter})
    common.close_after_peer(side, role, link)
    return rows


def run_transport(name: str, w: Workload, plan: list[dict], *, budget: float = 900.0,
                  progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run the workload through transport ``name``; per-request figures and a summary.

    For the pool, one prefaulted pool large enough for every unique block is created here and
    destroyed before returning (its final counters are in ``pool_stats``).
    """
    from pykvshm import KVSpec

    spec = w.spec
    ks = KVSpec(**spec)
    with _workload_pool(name, w, ks, plan) as pool:
        res = common.run_pair(_side, {"transport": name, "pool": pool.name if pool is not None else None,
                                      "spec": spec, "plan": plan, "prefix_tokens": w.prefix_tokens, "seed": w.seed,
                                      "token": uuid.uuid4().hex[:8], "verify": w.verify},
                              env=common.TRANSPORT_OPTIONS[name][1], budget=budget, progress=progress)
        stats = pool.stats() if pool is not None else None
    out: dict[str, Any] = {"error": res["error"], "requests": [], "pool_stats": stats}
    prod, cons = res["producer"] or [], res["consumer"] or []
    for item, p, c in zip(plan, prod, cons):
        out["requests"].append({
            "index": item["index"], "prompt": item["prompt"], "blocks": p["blocks"], "cached_blocks": p["cached"],
            "bytes_moved": p["bytes_sent"], "pool_bytes_in_counter": p["bytes_in_counter"],
            "bytes_to_decode_buffer": p["blocks"] * ks.block_bytes,
            "handoff_s": (c["t1"] - p["t0"]) / 1e9, "send_return_s": (p["t2"] - p["t0"]) / 1e9,
            "prepare_s": (p["t0"] - p["tp"]) / 1e9,
        })
    reqs = out["requests"]
    firsts = [r for r in reqs if r["index"] < w.prompts]
    repeats = [r for r in reqs if r["index"] >= w.prompts]
    out["summary"] = {
        "requests": len(reqs),
        "bytes_moved": sum(r["bytes_moved"] for r in reqs),
        "bytes_requested": sum(r["bytes_to_decode_buffer"] for r in reqs),
        "cached_blocks": sum(r["cached_blocks"] for r in reqs),
        "blocks": sum(r["blocks"] for r in reqs),
        "handoff_s": common.summary(r["handoff_s"] for r in reqs),
        "handoff_first_of_prompt_s": common.summary(r["handoff_s"] for r in firsts),
        "handoff_repeat_s": common.summary(r["handoff_s"] for r in repeats),
        "handoff_total_s": sum(r["handoff_s"] for r in reqs),
        "prepare_s": common.summary(r["prepare_s"] for r in reqs),
        "send_return_first_of_prompt_s": common.summary(r["send_return_s"] for r in firsts),
        "send_return_repeat_s": common.summary(r["send_return_s"] for r in repeats),
        "bytes_moved_per_request_median": float(np.median([r["bytes_moved"] for r in reqs])) if reqs else None,
    }
    return out


def _workload_pool(name: str, w: Workload, ks: Any, plan: list[dict]):
    """The pool the workload runs through (transport "pool"), else a context that yields None."""
    if name != "pool":
        return contextlib.nullcontext()
    unique = w.prompts * (w.prefix_tokens // w.block_tokens) + sum(p["suffix_tokens"] // w.block_tokens for p in plan)
    capacity = common.pool_capacity(ks, max(p["blocks"] for p in plan), at_least=unique + 16)
    return common.scratch_pool("prefix", ks, capacity, prefault=True)
