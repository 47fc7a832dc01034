"""The scheduler half: how many leading tokens of a prompt the pool holds, and each step's plan.

It only reads the pool's index (`Pool.match`, side-effect free); pins, copies and
writes are the worker half's.  A hit found here can be gone by the time the worker
loads it (another engine's save evicted it); the worker then reports those engine
blocks as load errors and vLLM recomputes them (`kv_load_failure_policy="recompute"`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import ConnectorConfig, request_keys
from .metadata import BlockTransfer, PykvshmMetadata


@dataclass
class _Tracked:
    request: Any
    block_ids: list[int] = field(default_factory=list)
    keys: list[bytes] | None = None


class SchedulerSide:
    def __init__(self, cfg: ConnectorConfig, pool: Any) -> None:
        self.cfg = cfg
        self.pool = pool
        self._reqs: dict[str, _Tracked] = {}
        self._pending_loads: dict[str, int] = {}  # req id -> external tokens granted this step

    # ---- keys ----
    def _keys(self, t: _Tracked) -> list[bytes]:
        """Keys of the request's full prompt blocks (computed once per request)."""
        if t.keys is None:
            r = t.request
            t.keys = request_keys(self.cfg, list(r.block_hashes), r.num_prompt_tokens // self.cfg.block_size)
        return t.keys

    def _track(self, request: Any) -> _Tracked:
        t = self._reqs.get(request.request_id)
        if t is None or t.request is not request:
            t = self._reqs[request.request_id] = _Tracked(request)
        return t

    # ---- KVConnectorBase_V1, scheduler role ----
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        if not self.cfg.load:
            return 0, False
        bs = self.cfg.block_size
        keys = self._keys(self._track(request))
        # Leave at least one prompt token to compute: vLLM needs a forward pass to sample from.
        limit = min(len(keys), (request.num_prompt_tokens - 1) // bs)
        if limit * bs <= num_computed_tokens:
            return 0, False
        hit = self.pool.match(keys[:limit])
        return max(0, hit * bs - num_computed_tokens), False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        self._track(request)
        if num_external_tokens > 0:
            self._pending_loads[request.request_id] = num_external_tokens
        else:
            self._pending_loads.pop(request.request_id, None)

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
        self._pending_loads.clear()
        return meta

    def _plan(self, meta: PykvshmMetadata, req_id: str, t: _Tracked, computed: int, scheduled: int,
              first: bool) -> None:
        """Add this step's load and save for one request.

        ``computed`` is vLLM's num_computed_tokens at the start of the step: the engine's
        own prefix-cache hit plus the tokens granted to the connector.
        """
        bs = self.cfg.block_size
        ext = self._pending_loads.get(req_id, 0)
        keys = self._keys(t)
        load_lo = load_hi = computed // bs
        if ext:
            load_lo = (computed - ext) // bs
            meta.loads.append(BlockTransfer(req_id, t.block_ids[load_lo:load_hi], keys[load_lo:load_hi]))
        if self.cfg.save:
            done = min(computed + scheduled, t.request.num_prompt_tokens) // bs
            hi = min(done, len(keys), len(t.block_ids))
            # Blocks computed in this step, and on a request's first step also the blocks the
            # engine's own prefix cache supplied (the pool may have lost them; the writer skips
            # keys it holds).  Never the blocks loaded in this step: if their load fails they
            # hold garbage until vLLM recomputes them.
            ranges = [range(0, load_lo)] if first else []
            ranges.append(range(load_hi, hi))
            picked = [i for r in ranges for i in r]
            if picked:
                meta.saves.append(BlockTransfer(req_id, [t.block_ids[i] for i in picked], [keys[i] for i in picked]))

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        # Saves complete inside the step that computed the blocks, so vLLM may free them now.
        self._reqs.pop(request.request_id, None)
        self._pending_loads.pop(request.request_id, None)
        return False, None
