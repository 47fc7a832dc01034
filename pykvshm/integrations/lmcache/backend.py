"""LMCache storage plugin: the pool as one of LMCacheEngine's storage backends.

LMCache loads it out of tree (``storage_plugins`` in its configuration)::

    storage_plugins: ["pykvshm"]
    extra_config:
      storage_plugin.pykvshm.module_path: pykvshm.integrations.lmcache
      storage_plugin.pykvshm.class_name: PykvshmStorageBackend
      pykvshm.pool: my-pool          # POSIX shm name or absolute path
      pykvshm.capacity: 8GiB         # when this process creates the pool
      pykvshm.block_tokens: 256      # tokens per pool block (divides chunk_size; default chunk_size)
      pykvshm.salt: ""               # deployments with different salts never share chunks

A full chunk (``chunk_size`` tokens, every layer, K and V) occupies
``chunk_size // block_tokens`` pool blocks, each holding its tokens in the pool's
canonical order ``(layer, K/V, token, head, head_dim)`` (LMCache's KV_2LTD memory
objects are the same data in another order).  Keys: ``engine_key(salt, chunk_hash
|| block index)``; the salt names the engine ("lmcache"), model, world size and
worker id (the TP rank), dtype and geometry (engine_keys.py; the vLLM connector
uses the same rule).  A chunk's last, partial chunk is not stored: pool blocks
have a fixed size and the key alone must say what a block holds; LMCache's prefix
lookup then stops before it, as it would at any miss.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from lmcache.v1.memory_management import MemoryFormat
from lmcache.v1.storage_backend.abstract_backend import StoragePluginInterface

from ..._torch import host_block_tensor
from ...errors import GeometryMismatchError, PoolFullError
from ...spec import KVSpec, parse_size
from ..engine_keys import engine_key, salt_digest

logger = logging.getLogger(__name__)

PREFIX = "pykvshm."
OPTIONS: dict[str, Any] = {
    "pool": "pykvshm-lmcache",
    "capacity": "4GiB",
    "create": "create_or_open",   # "open" | "create" | "create_or_open"
    "block_tokens": None,         # default: LMCache's chunk_size
    "salt": "",
    "huge_pages": False,
    "prefault": False,
    "open_timeout": 60.0,
}


def _options(extra: dict[str, Any] | None) -> dict[str, Any]:
    extra = dict(extra or {})
    mine = {k[len(PREFIX):]: v for k, v in extra.items() if k.startswith(PREFIX)}
    unknown = sorted(set(mine) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown LMCache extra_config keys for pykvshm: {[PREFIX + k for k in unknown]}; "
                         f"known: {[PREFIX + k for k in OPTIONS]}")
    opt = {**OPTIONS, **mine}
    if opt["create"] not in ("open", "create", "create_or_open"):
        raise ValueError(f"{PREFIX}create must be 'open', 'create' or 'create_or_open', got {opt['create']!r}")
    opt["capacity"] = parse_size(opt["capacity"])
    return opt


class PykvshmStorageBackend(StoragePluginInterface):
    """An LMCache storage plugin over a pykvshm pool (MHA models, KV_2LTD chunks)."""

    def __init__(self, dst_device: str = "cpu", config: Any = None, metadata: Any = None,
                 local_cpu_backend: Any = None, loop: Any = None) -> None:
        super().__init__(dst_device=dst_device, config=config, metadata=metadata,
                         local_cpu_backend=local_cpu_backend, loop=loop)
        if config is None or metadata is None or local_cpu_backend is None:
            raise ValueError("PykvshmStorageBackend needs LMCache's config, metadata and local CPU backend")
        if metadata.use_mla:
            raise NotImplementedError("PykvshmStorageBackend supports MHA models only (not MLA)")
        self.opt = _options(config.extra_config)
        num_layers, kv, chunk, heads, head_dim = (int(x) for x in metadata.kv_shape)
        if kv != 2:
            raise GeometryMismatchError(f"LMCache kv_shape {tuple(metadata.kv_shape)}: expected K and V (2)")
        bt = int(self.opt["block_tokens"] or chunk)
        if bt <= 0 or chunk % bt:
            raise GeometryMismatchError(f"{PREFIX}block_tokens={bt} must divide LMCache's chunk_size {chunk}")
        self.chunk = chunk
        self.per_chunk = chunk // bt
        self.dtype = metadata.kv_dtype
        self.spec = KVSpec(num_layers=num_layers, num_kv_heads=heads, head_dim=head_dim, block_tokens=bt,
                           dtype=metadata.kv_dtype)
        self.pool = self._open_pool()
        self._salts: dict[tuple[Any, ...], bytes] = {}
        self._pins: dict[Any, tuple[Any, int]] = {}   # key -> (lease, pin count)
        self._lock = threading.Lock()

    def __str__(self) -> str:
        return "PykvshmStorageBackend"

    def _open_pool(self) -> Any:
        from ...pool import Pool

        o = self.opt
        pf, hp = bool(o["prefault"]), bool(o["huge_pages"])
        if o["create"] == "open":
            return Pool.open(o["pool"], self.spec, prefault=pf, huge_pages=hp)
        if o["create"] == "create":
            return Pool.create(o["pool"], self.spec, o["capacity"], prefault=pf, huge_pages=hp)
        return Pool.open_or_create(o["pool"], self.spec, o["capacity"], timeout=float(o["open_timeout"]),
                                   prefault=pf, huge_pages=hp)

    # ---- keys ----
    def _keys(self, key: Any) -> list[bytes]:
        who = (key.model_name, key.world_size, key.worker_id, str(key.dtype), key.tags)
        salt = self._salts.get(who)
        if salt is None:
            salt = self._salts[who] = salt_digest([
                "pykvshm-lmcache-v1", key.model_name, f"worker{key.worker_id}/{key.world_size}", str(key.dtype),
                repr(key.tags), f"chunk{self.chunk}", repr(self.spec), self.opt["salt"]])
        raw = int(key.chunk_hash).to_bytes(32, "little", signed=True)
        return [engine_key(salt, raw + i.to_bytes(4, "little")) for i in range(self.per_chunk)]

    def _canonical(self, obj_tensor: torch.Tensor) -> torch.Tensor:
        """A KV_2LTD chunk [2, L, T, H*D] as (L, 2, T, H, D)."""
        s = self.spec
        return obj_tensor.view(2, s.num_layers, self.chunk, s.num_kv_heads, s.head_dim).permute(1, 0, 2, 3, 4)

    def _block(self, view: Any) -> torch.Tensor:
        return host_block_tensor(view).view(self.spec.torch_dtype).view(self.spec.block_shape)

    # ---- lookups ----
    def contains(self, key: Any, pin: bool = False) -> bool:
        if pin:
            return self.pin(key)
        return self.pool.match(self._keys(key)) == self.per_chunk

    def batched_contains(self, keys: list[Any], pin: bool = False) -> int:
        hit = 0
        for k in keys:
            if not self.contains(k, pin):
                break
            hit += 1
        return hit

    def exists_in_put_tasks(self, key: Any) -> bool:
        return False  # puts complete inside batched_submit_put_task

    # ---- puts ----
    def batched_submit_put_task(self, keys: Sequence[Any], objs: list[Any], transfer_spec: Any = None,
                                on_complete_callback: Optional[Callable[[Any], None]] = None) -> None:
        for key, obj in zip(keys, objs):
            if self._put(key, obj) and on_complete_callback is not None:
                try:
                    on_complete_callback(key)
                except Exception:
                    logger.exception("LMCache put callback failed")
        return None

    def _put(self, key: Any, obj: Any) -> bool:
        t = obj.tensor
        if t is None or obj.metadata.fmt != MemoryFormat.KV_2LTD:
            logger.debug("pykvshm: skipping a memory object in format %s", obj.metadata.fmt)
            return False
        s = self.spec
        if tuple(t.shape) != (2, s.num_layers, self.chunk, s.num_kv_heads * s.head_dim) or t.dtype != self.dtype:
            return False  # a partial last chunk (or a foreign shape): not stored, see the module docstring
        try:
            w = self.pool.writer(self._keys(key))
        except PoolFullError:
            logger.warning("pykvshm pool %s is full: a chunk was not stored", self.pool.name)
            return False
        canon = self._canonical(t)
        bt = s.block_tokens
        views = w.views()
        try:
            for i, p in enumerate(w.positions):
                p = int(p)
                self._block(views[i]).copy_(canon[:, :, p * bt:(p + 1) * bt])
        except BaseException:
            views.clear()
            w.abort()
            raise
        views.clear()
        w.commit()
        return True

    # ---- gets ----
    def get_blocking(self, key: Any) -> Any:
        s = self.spec
        with self._lock:
            held = self._pins.get(key)
        lease = held[0] if held is not None else self.pool.acquire(self._keys(key))
        try:
            if len(lease) < self.per_chunk:
                return None
            obj = self.local_cpu_backend.allocate(torch.Size([2, s.num_layers, self.chunk, s.num_kv_heads * s.head_dim]),
                                                  self.dtype, fmt=MemoryFormat.KV_2LTD)
            if obj is None:
                return None
            canon = self._canonical(obj.tensor)
            bt = s.block_tokens
            views = lease.views()
            try:
                for i in range(self.per_chunk):
                    canon[:, :, i * bt:(i + 1) * bt].copy_(self._block(views[i]))
            finally:
                views.clear()
            return obj
        finally:
            if held is None:
                lease.release()

    # ---- pins: a lease held between LMCache's lookup and its retrieve ----
    def pin(self, key: Any) -> bool:
        with self._lock:
            held = self._pins.get(key)
            if held is not None:
                self._pins[key] = (held[0], held[1] + 1)
                return True
        lease = self.pool.acquire(self._keys(key))
        if len(lease) < self.per_chunk:
            lease.release()
            return False
        with self._lock:
            held = self._pins.get(key)
            if held is not None:  # another thread pinned it meanwhile
                self._pins[key] = (held[0], held[1] + 1)
                lease.release()
            else:
                self._pins[key] = (lease, 1)
        return True

    def unpin(self, key: Any) -> bool:
        with self._lock:
            held = self._pins.get(key)
            if held is None:
                return False
            if held[1] > 1:
                self._pins[key] = (held[0], held[1] - 1)
                return True
            del self._pins[key]
        held[0].release()
        return True

    def remove(self, key: Any, force: bool = True) -> bool:
        # The pool is shared with other engines and instances; blocks leave it by eviction only.
        return False

    def touch_cache(self) -> None:
        return None

    def get_allocator_backend(self) -> Any:
        return self.local_cpu_backend

    def close(self) -> None:
        with self._lock:
            pins, self._pins = list(self._pins.values()), {}
        for lease, _ in pins:
            lease.release()
        if not self.pool.closed:
            self.pool.close()
