"""The worker half: copies between vLLM's paged KV cache and pool blocks.

Each layer slot of a pool block holds one engine block of that layer verbatim (the
backend's own layout, as bytes), so the copy is the same for every attention backend;
the key salt keeps engines whose layouts differ apart (config.py).

Loads (`start_load_kv`): pin the longest present prefix with `Pool.acquire`, then queue one
batched gather per layer on the pool handle's copy engine (`Lease.read_spans`: every block's
layer slot into its engine block, one call, no GIL) and return; `wait_for_layer_load(layer)`
waits only for that layer, so layer l+1 is copied while layer l computes.  The pins are
dropped once the last layer has landed.  Engine blocks whose keys vanished since the
scheduler's match are reported through `get_block_ids_with_load_errors` and vLLM recomputes
them.  Saves run layer by layer (`save_kv_layer`): the first layer of a step reserves pool
blocks for keys the pool lacks (`Pool.writer`), each layer queues one batched scatter of its
engine blocks into them (`Writer.write_spans`), and `wait_for_save` waits for them and
commits only writers that received every layer.

Asynchronous loads (`async_loads`, requests vLLM parked in WAITING_FOR_REMOTE_KVS) are queued
the same way but nothing waits for them in a forward pass: `get_finished` reports each request
once every layer has landed, and its pins go then.

CUDA KV caches take the same batched shape through `PagedGather` (pykvshm/_torch.py): the
registered pool mapping is viewed as a device tensor, and one layer's load (or save) is one
row gather between it and the layer's KV tensor, queued on a load stream whose per-layer events
the compute stream waits on (`wait_for_layer_load` does not block the host).  No GPU has been
available to run it; the same gathers run on CPU tensors in the tests.  Non-contiguous caches
copy block by block.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..._torch import host_block_tensor
from ...errors import GeometryMismatchError, PoolFullError
from .config import ConnectorConfig
from .metadata import BlockTransfer, PykvshmMetadata
from .stats import PykvshmStats

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
    dst: list[Any] | None  # per-block path only: uint8 tensors over the reserved pool blocks (dropped before commit)
    plan: Any = None       # PagedGather path: the row plan of the reserved blocks
    layers_done: set[int] = field(default_factory=set)


@dataclass
class _Load:
    lease: Any
    futures: list[Any]     # one per layer: a CopyFuture, a _LayerEvent (CUDA) or None (copied already)

    def settle(self) -> None:
        """Wait until nothing reads the leased blocks any more, then drop the pins."""
        for f in self.futures:
            if isinstance(f, _LayerEvent):
                f.event.synchronize()
        self.lease.release()  # waits for queued copy-engine gathers too


class _LayerEvent:
    """A CUDA event recorded on the load stream after one layer's gather."""

    __slots__ = ("event",)

    def __init__(self, event: Any) -> None:
        self.event = event

    def done(self) -> bool:
        return bool(self.event.query())

    def wait(self) -> None:
        """Make the compute stream wait for the layer (the host does not block)."""
        import torch

        torch.cuda.current_stream().wait_event(self.event)


@dataclass
class _StepStats:
    load_blocks: int = 0
    load_failed: int = 0
    load_s: float = 0.0
    save_blocks: int = 0
    save_skipped: int = 0
    save_s: float = 0.0
    load_reqs: list[str] = field(default_factory=list)
    async_reqs: int = 0


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
        self._loads: list[_Load] = []          # this step's queued loads (released after the last layer)
        self._async_loads: dict[str, tuple[BlockTransfer, _Load]] = {}  # WAITING_FOR_REMOTE_KVS loads in flight
        self._finished_loads: set[str] = set()  # asynchronous loads done, not yet reported
        self._chunks: tuple[int, int, int] = (1, 0, 0)  # per layer tensor: (outer, blocks, inner bytes)
        self._batched = False                  # host KV caches: batched span copies through the copy engine
        self._gather: Any = None               # CUDA KV caches: PagedGather over a device view of the pool
        self._load_stream: Any = None          # CUDA: the stream gathers run on
        self._stats = _StepStats()
        self._interval = PykvshmStats()  # vLLM's KV-connector stats since its last get_kv_connector_stats

    # ---- setup ----
    def register_kv_caches(self, kv_caches: dict[str, Any], num_blocks: int) -> None:
        from vllm.model_executor.models.utils import extract_layer_index

        names = sorted(kv_caches, key=extract_layer_index)
        if len(names) != self.cfg.spec.num_layers:
            raise GeometryMismatchError(
                f"vLLM registered {len(names)} KV cache layers, the pool geometry has {self.cfg.spec.num_layers}")
        layer_bytes = self._layer_bytes
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
        # An engine block of a layer is `outer` chunks of `inner` bytes (e.g. its K and its V part
        # when the layer tensor is (2, num_blocks, ...)); the pool slot holds them back to back.
        shape = tuple(first.shape)
        outer = int(np.prod(shape[:self._block_dim], dtype=np.int64))
        inner = int(np.prod(shape[self._block_dim + 1:], dtype=np.int64)) * first.element_size()
        self._chunks = (outer, int(shape[self._block_dim]), inner)
        contiguous = all(t.is_contiguous() for t in tensors)
        self._batched = first.device.type == "cpu" and contiguous
        if first.device.type == "cuda" and contiguous:
            import torch

            self._use_paged_gather()
            self._load_stream = torch.cuda.Stream(device=first.device)

    @property
    def _layer_bytes(self) -> int:
        """One layer's slot in a pool block: the bytes of one engine block of one layer."""
        return self.cfg.spec.block_bytes // self.cfg.spec.num_layers

    def _use_paged_gather(self) -> None:
        """Move blocks by row gathers on the KV cache's device (the CUDA path); tests call it
        directly to run that path over CPU tensors."""
        from ... import _torch

        core = self.pool._live()
        layer_bytes = self._layer_bytes
        pool_t = _torch.pool_tensor(int(core.address), int(core.total_bytes), self._layers[0].device)
        self._gather = _torch.PagedGather(pool_t, int(core.address), layer_bytes, self._chunks)
        self._batched = False

    def _spans(self, block_ids: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """(pool block numbers, offsets in the layer slot, offsets in the engine layer tensor, size)
        of every chunk of the given engine blocks, in the order of ``block_ids``."""
        outer, nblocks, inner = self._chunks
        bids = np.asarray(block_ids, dtype=np.int64)
        j = np.repeat(np.arange(len(bids)), outer)
        i = np.tile(np.arange(outer), len(bids))
        return j, i * inner, (i * nblocks + bids[j]) * inner, inner

    # ---- loads ----
    def start_load_kv(self, meta: PykvshmMetadata) -> None:
        t0 = time.perf_counter()
        self._finish_loads()  # a previous step's loads, if vLLM never waited for their last layer
        if (meta.loads or meta.async_loads) and _fault("evict-before-load"):
            evict_all(self.pool)
        for tr in meta.loads:
            got, load = self._load_one(tr, layerwise=self.cfg.layerwise_loads)
            if load is not None:
                self._loads.append(load)
            if self._account(tr, got):
                self._failed_reqs.add(tr.req_id)
        for tr in meta.async_loads:
            # Nobody waits for these inside a forward pass: get_finished_loads polls them.
            got, load = self._load_one(tr, layerwise=True)
            self._account(tr, got)
            self._stats.async_reqs += 1
            if load is None:
                self._finished_loads.add(tr.req_id)
            else:
                self._async_loads[tr.req_id] = (tr, load)
        self._stats.load_s += time.perf_counter() - t0

    def _account(self, tr: BlockTransfer, got: int) -> bool:
        """Count one request's load of ``got`` of its blocks; the rest are load errors (True if any)."""
        self._stats.load_blocks += got
        self._stats.load_reqs.append(tr.req_id)
        if got == len(tr.block_ids):
            return False
        self._load_errors.update(tr.block_ids[got:])
        self._stats.load_failed += len(tr.block_ids) - got
        return True

    def _load_one(self, tr: BlockTransfer, layerwise: bool) -> tuple[int, "_Load | None"]:
        """Pin the longest present prefix of ``tr`` and copy it into its engine blocks: queued per
        layer on the copy engine when ``layerwise`` (the returned `_Load` holds the pins until its
        copies are done), otherwise before returning.  Returns how many blocks it loads."""
        lease = self.pool.acquire(tr.keys_for(self.cfg.tp_rank))
        n = len(lease)
        if n == 0:
            lease.release()
            return 0, None
        if self._gather is not None:
            return n, self._gather_load(lease, tr, n)
        if not self._batched:
            try:
                self._load_per_block(lease, tr, n)
            finally:
                lease.release()
            return n, None
        layer_bytes = self._layer_bytes
        j, slot_off, kv_off, size = self._spans(tr.block_ids[:n])
        futures = []
        try:
            for layer, kv in enumerate(self._layers):
                futures.append(lease.read_spans(kv, j, layer * layer_bytes + slot_off, kv_off, size,
                                                wait=not layerwise))
        except BaseException:
            lease.release()  # waits for what was queued
            raise
        return n, _Load(lease, futures)

    def _gather_load(self, lease: Any, tr: BlockTransfer, n: int) -> _Load:
        """One row gather per layer from the pool into the engine blocks: on CUDA queued on the
        load stream (after what the compute stream has queued, e.g. the blocks' zeroing), each
        layer followed by an event; on the CPU done before returning."""
        import contextlib

        import torch

        try:
            addrs = [int(v.ctypes.data) for v in lease.views()]  # the views go before the pins can
            plan = self._gather.plan(addrs, tr.block_ids[:n])
            stream = self._load_stream
            events: list[Any] = []
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                if stream is not None:
                    stream.wait_stream(torch.cuda.current_stream(stream.device))
                for layer, kv in enumerate(self._layers):
                    self._gather.load(kv, layer, plan)
                    if stream is not None:
                        ev = torch.cuda.Event()
                        ev.record(stream)
                        events.append(_LayerEvent(ev))
        except BaseException:
            if self._load_stream is not None:
                self._load_stream.synchronize()
            lease.release()
            raise
        return _Load(lease, events or [None] * len(self._layers))

    def _load_per_block(self, lease: Any, tr: BlockTransfer, n: int) -> None:
        """CUDA (or non-contiguous) KV caches: one DMA per block and layer from the registered pool."""
        import torch

        layer_bytes = self._layer_bytes
        cuda = self._layers[0].device.type == "cuda"
        srcs = [host_block_tensor(v) for v in lease.views()]  # read-only: we only read them
        try:
            for layer, kv in enumerate(self._layers):
                for j in range(n):
                    dst = kv.select(self._block_dim, tr.block_ids[j]).view(torch.uint8)
                    dst.copy_(srcs[j][layer * layer_bytes:(layer + 1) * layer_bytes].view(dst.shape),
                              non_blocking=cuda)
            if cuda:
                torch.cuda.current_stream(self._layers[0].device).synchronize()
        finally:
            srcs = []  # drop the views before the pins

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Wait until layer ``layer_name`` of this step's loads has landed (the others may still be
        copying); after the last layer, drop the pins."""
        if not self._loads:
            return
        t0 = time.perf_counter()
        layer = self._layer_of.get(layer_name)
        if layer is None:
            return
        for ld in self._loads:
            f = ld.futures[layer]
            if f is not None:
                f.wait()  # a CUDA layer event: the compute stream waits, not the host
        if layer == len(self._layers) - 1:
            self._finish_loads()
        self._stats.load_s += time.perf_counter() - t0

    def _finish_loads(self) -> None:
        loads, self._loads = self._loads, []
        for ld in loads:
            ld.settle()  # waits for every queued layer first

    def get_finished_loads(self) -> set[str]:
        """Requests whose asynchronous load has landed (or failed) since the last call; their pins
        are dropped.  A copy that failed makes all of its request's blocks load errors, reported by
        the get_block_ids_with_load_errors call that vLLM makes right after this one."""
        done, self._finished_loads = self._finished_loads, set()
        for rid, (tr, ld) in list(self._async_loads.items()):
            if not all(f is None or f.done() for f in ld.futures):
                continue
            del self._async_loads[rid]
            try:
                for f in ld.futures:
                    if f is not None and not isinstance(f, _LayerEvent):
                        f.wait()  # raises a failed copy's error
            except Exception:
                self._load_errors.update(tr.block_ids)
                if self.cfg.tp_rank == 0:
                    self._interval.add("load_failed_blocks", len(tr.block_ids))
            finally:
                ld.settle()
            done.add(rid)
        return done

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
        layer_bytes = self._layer_bytes
        lo, hi = layer * layer_bytes, (layer + 1) * layer_bytes
        cuda = kv_layer.device.type == "cuda"
        for s in self._saves:
            if self._gather is not None:
                if s.plan is None:
                    addrs = [int(v.ctypes.data) for v in s.writer.views()]  # dropped before commit
                    s.plan = self._gather.plan(addrs, s.block_ids)
                self._gather.save(kv_layer, layer, s.plan)  # on the stream that computed kv_layer
            elif self._batched and kv_layer.is_contiguous():
                # One scatter per writer and layer, queued: wait_for_save waits for it.
                j, slot_off, kv_off, size = self._spans(s.block_ids)
                s.writer.write_spans(kv_layer, j, lo + slot_off, kv_off, size, wait=False)
            else:
                if s.dst is None:
                    s.dst = [host_block_tensor(v) for v in s.writer.views()]
                for dst, bid in zip(s.dst, s.block_ids):
                    src = kv_layer.select(self._block_dim, bid).view(torch.uint8)
                    dst[lo:hi].view(src.shape).copy_(src, non_blocking=cuda)
            s.layers_done.add(layer)
        if cuda and self._gather is None:
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
                w = self.pool.writer(tr.keys_for(self.cfg.tp_rank))
            except PoolFullError:
                self._stats.save_skipped += len(tr.keys)
                continue
            if len(w) == 0:
                w.abort()
                continue
            saves.append(_Save(tr, w, [tr.block_ids[int(p)] for p in w.positions], None))
        return saves

    def wait_for_save(self) -> None:
        t0 = time.perf_counter()
        n = self.cfg.spec.num_layers
        if self._saves and self._gather is not None and self._layers[0].device.type == "cuda":
            import torch

            torch.cuda.current_stream(self._layers[0].device).synchronize()  # every layer's save has landed
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
        self._count(self._stats)
        self._stats = _StepStats()

    def _count(self, s: _StepStats) -> None:
        """Add one step to the counters vLLM collects (see stats.py for who counts what)."""
        iv, bb = self._interval, self.cfg.spec.block_bytes
        if self.cfg.tp_rank == 0:
            iv.add("load_reqs", len(s.load_reqs))
            iv.add("load_async_reqs", s.async_reqs)
            iv.add("load_blocks", s.load_blocks)
            iv.add("load_failed_blocks", s.load_failed)
            iv.add("save_blocks", s.save_blocks)
            iv.add("save_skipped_blocks", s.save_skipped)
        iv.add("load_bytes", s.load_blocks * bb)
        iv.add("save_bytes", s.save_blocks * bb)
        if s.load_reqs:
            iv.add("load_seconds", s.load_s)
        if s.save_blocks or s.save_skipped:
            iv.add("save_seconds", s.save_s)

    def get_kv_connector_stats(self) -> PykvshmStats | None:
        return self._interval.take()

    def _write_stats(self) -> None:
        s = self._stats
        line = {"pid": os.getpid(), "t": time.time(), "load_reqs": s.load_reqs, "load_blocks": s.load_blocks,
                "load_failed": s.load_failed, "async_reqs": s.async_reqs, "load_ms": round(s.load_s * 1e3, 3), "save_blocks": s.save_blocks,
                "save_skipped": s.save_skipped, "save_ms": round(s.save_s * 1e3, 3)}
        with open(str(self.cfg.stats_file), "a") as f:
            f.write(json.dumps(line) + "\n")

    def shutdown(self) -> None:
        self._finish_loads()
        for _, ld in self._async_loads.values():
            ld.settle()
        self._async_loads.clear()
        for s in self._saves or []:
            s.dst = None
            s.writer.abort()
        self._saves = None
        self.pool.close()
