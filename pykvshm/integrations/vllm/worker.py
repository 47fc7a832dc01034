"""The worker half: copies between vLLM's paged KV cache and pool blocks.

Each layer slot of a pool block holds one engine block of that layer verbatim (the
backend's own layout, as bytes), so the copy is the same for every attention backend;
the key salt keeps engines whose layouts differ apart (config.py).

Loads run before the forward pass (`start_load_kv`): pin the longest present prefix
with `Pool.acquire`, copy each block into its engine block, release.  Engine blocks
whose keys vanished since the scheduler's match are reported through
`get_block_ids_with_load_errors` and vLLM recomputes them.  Saves run layer by layer
(`save_kv_layer`): the first layer of a step reserves pool blocks for keys the pool
lacks (`Pool.writer`), each layer gathers its engine blocks into them, and
`wait_for_save` commits only writers that received every layer.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from ..._torch import host_block_tensor
from ...errors import GeometryMismatchError, PoolFullError
from .config import ConnectorConfig
from .metadata import BlockTransfer, PykvshmMetadata

# Fault injection for tests: while the file named by this variable exists and says
# "evict-before-load", every pool block is evicted between the scheduler's match and the
# worker's load, as a concurrent engine's saves could do.
FAULT_FILE_ENV = "PYKVSHM_VLLM_FAULT_FILE"


def _fault(name: str) -> bool:
    path = os.environ.get(FAULT_FILE_ENV)
    if not path:
        return False
    try:
        with open(path) as f:
            return f.read().strip() == name
    except OSError:
        return False


def evict_all(pool: Any) -> bool:
    """Evict every block of ``pool``; False (nothing evicted) while any is pinned or being written."""
    try:
        handles = pool.alloc(pool.num_blocks)  # all or nothing: takes every block, evicting sealed ones
    except PoolFullError:
        return False
    pool.free(handles)
    return True


@dataclass
class _Save:
    transfer: BlockTransfer
    writer: Any
    block_ids: list[int]   # engine block id of each reserved pool block
    dst: list[Any] | None  # uint8 tensors over the reserved pool blocks (dropped before commit)
    layers_done: set[int] = field(default_factory=set)


@dataclass
class _StepStats:
    load_blocks: int = 0
    load_failed: int = 0
    load_s: float = 0.0
    save_blocks: int = 0
    save_skipped: int = 0
    save_s: float = 0.0
    load_reqs: list[str] = field(default_factory=list)


class WorkerSide:
    def __init__(self, cfg: ConnectorConfig, pool: Any) -> None:
        self.cfg = cfg
        self.pool = pool
        self._layers: list[Any] = []           # per layer: the engine's KV tensor
        self._layer_of: dict[str, int] = {}    # layer name -> layer index
        self._block_dim = 0                    # the dimension of a layer tensor that indexes blocks
        self._saves: list[_Save] | None = None  # this step's writers (None until the first layer)
        self._failed_reqs: set[str] = set()
        self._load_errors: set[int] = set()
        self._stats = _StepStats()

    # ---- setup ----
    def register_kv_caches(self, kv_caches: dict[str, Any], num_blocks: int) -> None:
        from vllm.model_executor.models.utils import extract_layer_index

        names = sorted(kv_caches, key=extract_layer_index)
        if len(names) != self.cfg.spec.num_layers:
            raise GeometryMismatchError(
                f"vLLM registered {len(names)} KV cache layers, the pool geometry has {self.cfg.spec.num_layers}")
        layer_bytes = self.cfg.spec.block_bytes // self.cfg.spec.num_layers
        tensors = [kv_caches[n] for n in names]
        first = tensors[0]
        dims = [d for d in range(min(2, first.dim())) if first.shape[d] == num_blocks]
        if not dims:
            raise GeometryMismatchError(
                f"cannot find the block dimension ({num_blocks} blocks) in KV cache shape {tuple(first.shape)}")
        self._block_dim = dims[0]
        for n, t in zip(names, tensors):
            if t.shape != first.shape or t.dtype != first.dtype:
                raise GeometryMismatchError(f"layer {n} has shape {tuple(t.shape)} {t.dtype}, "
                                            f"layer {names[0]} {tuple(first.shape)} {first.dtype}")
            one = t.select(self._block_dim, 0)
            if one.numel() * one.element_size() != layer_bytes:
                raise GeometryMismatchError(
                    f"an engine block of layer {n} has {one.numel() * one.element_size()} bytes; a pool layer "
                    f"slot has {layer_bytes} ({self.cfg.spec})")
        if first.device.type == "cuda":
            from ... import _torch

            core = self.pool._live()
            _torch.ensure_registered(int(core.address), int(core.total_bytes))
        self._layers = tensors
        self._layer_of = {n: i for i, n in enumerate(names)}

    # ---- loads ----
    def start_load_kv(self, meta: PykvshmMetadata) -> None:
        t0 = time.perf_counter()
        if meta.loads and _fault("evict-before-load"):
            evict_all(self.pool)
        for tr in meta.loads:
            got = self._load_one(tr)
            self._stats.load_blocks += got
            self._stats.load_reqs.append(tr.req_id)
            if got < len(tr.block_ids):
                self._load_errors.update(tr.block_ids[got:])
                self._failed_reqs.add(tr.req_id)
                self._stats.load_failed += len(tr.block_ids) - got
        self._stats.load_s += time.perf_counter() - t0

    def _load_one(self, tr: BlockTransfer) -> int:
        """Copy the longest present prefix of ``tr`` into its engine blocks; returns blocks copied."""
        import torch

        lease = self.pool.acquire(tr.keys)
        srcs: list[Any] = []
        try:
            n = len(lease)
            if n == 0:
                return 0
            layer_bytes = self.cfg.spec.block_bytes // self.cfg.spec.num_layers
            cuda = self._layers[0].device.type == "cuda"
            srcs = [host_block_tensor(v) for v in lease.views()]  # read-only: we only read them
            for layer, kv in enumerate(self._layers):
                for j in range(n):
                    dst = kv.select(self._block_dim, tr.block_ids[j]).view(torch.uint8)
                    dst.copy_(srcs[j][layer * layer_bytes:(layer + 1) * layer_bytes].view(dst.shape),
                              non_blocking=cuda)
            if cuda:
                torch.cuda.current_stream(self._layers[0].device).synchronize()
            return n
        finally:
            srcs = []  # drop the views before the pins
            lease.release()

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    # ---- saves ----
    def save_kv_layer(self, layer_name: str, kv_layer: Any, meta: PykvshmMetadata) -> None:
        if not meta.saves:
            return
        import torch

        t0 = time.perf_counter()
        layer = self._layer_of.get(layer_name)
        if layer is None:
            raise GeometryMismatchError(f"save_kv_layer for unregistered layer {layer_name!r}")
        if self._saves is None:
            self._saves = self._open_writers(meta)
        layer_bytes = self.cfg.spec.block_bytes // self.cfg.spec.num_layers
        lo, hi = layer * layer_bytes, (layer + 1) * layer_bytes
        cuda = kv_layer.device.type == "cuda"
        for s in self._saves:
            assert s.dst is not None
            for dst, bid in zip(s.dst, s.block_ids):
                src = kv_layer.select(self._block_dim, bid).view(torch.uint8)
                dst[lo:hi].view(src.shape).copy_(src, non_blocking=cuda)
            s.layers_done.add(layer)
        if cuda:
            torch.cuda.current_stream(kv_layer.device).synchronize()
        self._stats.save_s += time.perf_counter() - t0

    def _open_writers(self, meta: PykvshmMetadata) -> list[_Save]:
        saves = []
        for tr in meta.saves:
            if tr.req_id in self._failed_reqs:
                # Its load failed this step: the forward pass attended over garbage, so
                # nothing it computed may be published.  vLLM recomputes and we save then.
                self._stats.save_skipped += len(tr.keys)
                continue
            try:
                w = self.pool.writer(tr.keys)
            except PoolFullError:
                self._stats.save_skipped += len(tr.keys)
                continue
            if len(w) == 0:
                w.abort()
                continue
            # One copy per block and layer, straight from the engine block into the pool block
            # (a batched index_select gather measured ~7 ms per layer here, the copies ~10 us).
            dst = [host_block_tensor(v) for v in w.views()]
            saves.append(_Save(tr, w, [tr.block_ids[int(p)] for p in w.positions], dst))
        return saves

    def wait_for_save(self) -> None:
        t0 = time.perf_counter()
        n = self.cfg.spec.num_layers
        for s in self._saves or []:
            s.dst = None  # the views go before the writer can commit or abort
            if len(s.layers_done) == n:
                s.writer.commit()
                self._stats.save_blocks += len(s.writer)
            else:
                s.writer.abort()
                self._stats.save_skipped += len(s.writer)
        had_work = self._saves is not None or self._stats.load_reqs
        self._saves = None
        self._failed_reqs.clear()
        self._stats.save_s += time.perf_counter() - t0
        if had_work and self.cfg.stats_file:
            self._write_stats()
        self._stats = _StepStats()

    def _write_stats(self) -> None:
        s = self._stats
        line = {"pid": os.getpid(), "t": time.time(), "load_reqs": s.load_reqs, "load_blocks": s.load_blocks,
                "load_failed": s.load_failed, "load_ms": round(s.load_s * 1e3, 3), "save_blocks": s.save_blocks,
                "save_skipped": s.save_skipped, "save_ms": round(s.save_s * 1e3, 3)}
        with open(str(self.cfg.stats_file), "a") as f:
            f.write(json.dumps(line) + "\n")

    def shutdown(self) -> None:
        for s in self._saves or []:
            s.dst = None
            s.writer.abort()
        self._saves = None
        self.pool.close()
