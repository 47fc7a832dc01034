"""The scheduler half: how many leading tokens of a prompt the pool holds, and each step's plan.

It only reads the pool's index (`Pool.match`, side-effect free); pins, copies and
writes are the worker half's.  A hit found here can be gone by the time the worker
loads it (another engine's save evicted it); the worker then reports those engine
blocks as load errors and vLLM recomputes them (`kv_load_failure_policy="recompute"`).

Loads of at least ``async_load_bytes`` are asynchronous: `get_num_new_matched_tokens` says so,
vLLM parks the request in WAITING_FOR_REMOTE_KVS with its blocks allocated, the load travels
in that step's `async_loads`, and the request is scheduled once every worker has reported it
finished (`get_finished`), so a long load never holds up the batch's forward passes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .config import ConnectorConfig, request_keys
from .metadata import BlockTransfer, PykvshmMetadata
from .stats import TIER_COUNTERS, PykvshmStats


@dataclass
class _Tracked:
    request: Any
    block_ids: list[int] = field(default_factory=list)
    keys: list[list[bytes]] = field(default_factory=list)  # per tensor-parallel rank, per block


class SchedulerSide:
    def __init__(self, cfg: ConnectorConfig, pool: Any) -> None:
        self.cfg = cfg
        self.pool = pool
        # The cluster tier (kv_connector_extra_config["tier"]): its demoter runs in this process; a
        # miss promotes from the store (pykvshm.tier, docs/design/tiering.md).
        self.tier = pool.tier(cfg.tier) if cfg.tier else None
        self._reqs: dict[str, _Tracked] = {}
        self._pending_loads: dict[str, int] = {}  # req id -> external tokens granted this step
        self._tier_deadline: dict[str, float] = {}  # req id -> until when it may wait for a promotion
        self._tier_asked: dict[str, int] = {}  # req id -> blocks its promotion was started for
        self._asked: dict[str, int] = {}          # req id -> tokens computed locally when it was matched
        self._async_blocks: dict[str, list[int]] = {}  # req id -> engine blocks allocated for a pending load
        self.stats = PykvshmStats()
        self._tier_reported: dict[str, int] = {}  # the tier's counts at the last stats report

    # ---- keys ----
    def _keys(self, t: _Tracked) -> list[list[bytes]]:
        """Every rank's keys of the request's full blocks so far.  vLLM appends a block hash each
        time a block fills up, during decode too, so the lists grow with the request."""
        hashes = t.request.block_hashes
        have = len(t.keys[0]) if t.keys else 0
        if len(hashes) // self.cfg.hash_stride > have:
            hashes = list(hashes)
            new = [request_keys(self.cfg, hashes, len(hashes), rank=r, start=have) for r in range(self.cfg.tp_size)]
            if not t.keys:
                t.keys = new
            else:
                for old, more in zip(t.keys, new):
                    old.extend(more)
        return t.keys or [[] for _ in range(self.cfg.tp_size)]

    def _transfer(self, req_id: str, t: _Tracked, idx: list[int]) -> BlockTransfer:
        keys = [[k[i] for i in idx] for k in t.keys]
        return BlockTransfer(req_id, [t.block_ids[i] for i in idx], keys[0], tuple(keys[1:]))

    def _track(self, request: Any) -> _Tracked:
        t = self._reqs.get(request.request_id)
        if t is None or t.request is not request:
            t = self._reqs[request.request_id] = _Tracked(request)
        return t

    # ---- KVConnectorBase_V1, scheduler role ----
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        if not self.cfg.load:
            return 0, False
        bs = self.cfg.block_size
        keys = self._keys(self._track(request))
        # Leave at least one token to compute: vLLM needs a forward pass to sample from.
        limit = min(len(keys[0]), (request.num_tokens - 1) // bs)
        if limit * bs <= num_computed_tokens:
            return 0, False
        # A block is present only when every tensor-parallel rank's shard is.
        hit = limit
        for rank_keys in keys:
            hit = min(hit, self.pool.match(rank_keys[:hit]))
            if hit * bs <= num_computed_tokens and self.tier is None:
                return 0, False
        rid = request.request_id
        if self.tier is not None and hit < limit:
            tier_keys = [k[:limit] for k in keys]
            if self._tier_asked.get(rid, 0) < limit:
                # One promotion per request (and again only if it grew, e.g. preempted after decoding):
                # once it has landed, the pool match above sees what it brought.  Starting another at
                # every ask would keep a prefix the store covers only in part "in flight", and the
                # request held back, until tier_wait ran out.
                self._tier_asked[rid] = limit
                hit = self.tier.extend_hit(tier_keys, hit, 0.0)  # starts a promotion of what the store has
            if hit < limit and self.cfg.tier_wait > 0 and self.tier.promoting(tier_keys):
                # Hold the request back (vLLM asks again next step) rather than block the scheduler,
                # for at most tier_wait seconds from the first time it was asked.
                deadline = self._tier_deadline.setdefault(rid, time.monotonic() + self.cfg.tier_wait)
                if time.monotonic() < deadline:
                    return None, False
        self._tier_deadline.pop(rid, None)
        if hit * bs <= num_computed_tokens:
            return 0, False
        self._asked[rid] = num_computed_tokens
        ext = hit * bs - num_computed_tokens
        threshold = self.cfg.async_load_bytes
        load_async = threshold is not None and -(-ext // bs) * self.cfg.spec.block_bytes >= threshold
        return ext, load_async

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        self._track(request)
        if self.cfg.load:
            self.stats.add("lookups", 1)
            if num_external_tokens > 0:
                self.stats.add("hit_tokens", num_external_tokens)
                self.stats.add("hit_blocks", num_external_tokens // self.cfg.block_size)
        rid = request.request_id
        if num_external_tokens > 0:
            self._pending_loads[rid] = num_external_tokens
            # If vLLM parks the request for an asynchronous load, it never shows up in this step's
            # scheduled requests; the blocks it was given are only known here.
            self._async_blocks[rid] = list(blocks.get_block_ids()[0])
        else:
            self._pending_loads.pop(rid, None)

    def build_connector_meta(self, so: Any) -> PykvshmMetadata:
        meta = PykvshmMetadata()
        for new in so.scheduled_new_reqs:
            t = self._reqs.get(new.req_id)
            if t is None:
                continue  # not seen through update_state_after_alloc: nothing to load or save
            t.block_ids = list(new.block_ids[0])
            self._plan(meta, new.req_id, t, new.num_computed_tokens, so.num_scheduled_tokens.get(new.req_id, 0), True)
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            t = self._reqs.get(req_id)
            if t is None:
                continue
            new_ids = cached.new_block_ids[i]
            resumed = req_id in cached.resumed_req_ids
            if resumed:
                t.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids:
                t.block_ids.extend(new_ids[0])
            self._plan(meta, req_id, t, cached.num_computed_tokens[i], so.num_scheduled_tokens.get(req_id, 0), resumed)
        self._plan_async_loads(meta)
        self._pending_loads.clear()
        self._async_blocks.clear()
        return meta

    def _plan_async_loads(self, meta: PykvshmMetadata) -> None:
        """Loads granted this step whose requests vLLM parked in WAITING_FOR_REMOTE_KVS."""
        from vllm.v1.request import RequestStatus

        for req_id, ext in self._pending_loads.items():
            t = self._reqs.get(req_id)
            if t is None or t.request.status != RequestStatus.WAITING_FOR_REMOTE_KVS:
                continue  # scheduled this step (a synchronous load, planned above) or not admitted
            bs = self.cfg.block_size
            local = self._asked.get(req_id, 0)
            lo, hi = local // bs, (local + ext) // bs
            t.block_ids = self._async_blocks.get(req_id, [])
            if hi > len(t.block_ids) or hi > len(t.keys[0]):
                raise RuntimeError(f"request {req_id}: asynchronous load of blocks {lo}..{hi - 1} but vLLM "
                                   f"allocated {len(t.block_ids)} and the prompt has {len(t.keys[0])} full blocks")
            meta.async_loads.append(self._transfer(req_id, t, list(range(lo, hi))))

    def _plan(self, meta: PykvshmMetadata, req_id: str, t: _Tracked, computed: int, scheduled: int,
              first: bool) -> None:
        """Add this step's load and save for one request.

        ``computed`` is vLLM's num_computed_tokens at the start of the step: the engine's
        own prefix-cache hit plus the tokens granted to the connector.
        """
        bs = self.cfg.block_size
        ext = self._pending_loads.get(req_id, 0)
        keys = self._keys(t)[0]
        load_lo = load_hi = computed // bs
        if ext:
            load_lo = (computed - ext) // bs
            meta.loads.append(self._transfer(req_id, t, list(range(load_lo, load_hi))))
        if self.cfg.save:
            # Blocks whose every token's KV exists after this step: the prompt's, and with
            # save_generated also those that fill up during decode (the KV of a sampled token is
            # computed in the step after it is sampled, when it is fed back).
            end = computed + scheduled
            if not self.cfg.save_generated:
                end = min(end, t.request.num_prompt_tokens)
            hi = min(end // bs, len(keys), len(t.block_ids))
            # Blocks computed in this step, and on a request's first step also the blocks the
            # engine's own prefix cache supplied (the pool may have lost them; the writer skips
            # keys it holds).  Never the blocks loaded in this step: if their load fails they
            # hold garbage until vLLM recomputes them.
            ranges = [range(0, load_lo)] if first else []
            ranges.append(range(load_hi, hi))
            picked = [i for r in ranges for i in r]
            if picked:
                meta.saves.append(self._transfer(req_id, t, picked))

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        # Every full block, prompt or generated, is saved inside the step that computed its last
        # token (committed in wait_for_save), so nothing is left to save here and vLLM may free
        # the blocks now.  The last sampled token never has KV, so a block it would complete is
        # not full in the KV cache and is not saved.
        rid = request.request_id
        self._reqs.pop(rid, None)
        self._pending_loads.pop(rid, None)
        self._asked.pop(rid, None)
        self._tier_deadline.pop(rid, None)
        self._tier_asked.pop(rid, None)
        # A request aborted while its asynchronous load is still copying into its engine blocks
        # keeps them: vLLM itself delays freeing a WAITING_FOR_REMOTE_KVS request's blocks until
        # the workers report its load finished (which they do, finished or not).
        return False, None

    def get_kv_connector_stats(self) -> PykvshmStats | None:
        if self.tier is not None:
            # The tier's threads keep cumulative counts; report what they added since last time.
            now = self.tier.stats()
            for key, ours in TIER_COUNTERS.items():
                self.stats.add(ours, now[key] - self._tier_reported.get(key, 0))
            self._tier_reported = now
        return self.stats.take()
