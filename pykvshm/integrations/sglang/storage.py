"""SGLang HiCache storage backend: the pool as HiCache's L3 tier.

SGLang loads it out of tree::

    --enable-hierarchical-cache --hicache-storage-backend dynamic
    --hicache-storage-backend-extra-config '{"backend_name": "pykvshm",
        "module_path": "pykvshm.integrations.sglang", "class_name": "PykvshmHiCacheStorage",
        "interface_v1": 1, "pool": "my-pool", "capacity": "8GiB"}'

One pool block holds one SGLang page (``page_size`` tokens, every layer, K and V)
in the pool's canonical order ``(layer, K/V, token, head, head_dim)``, whatever
the host pool's layout (``layer_first``, ``page_first``, ``page_first_direct``,
``page_head``): pages are copied straight between the host KV pool and pool
blocks, with no staging tensor.  Keys: ``engine_key(salt, page_hash)``, where the
salt names the engine ("sglang"), model, dtype, the TP/PP/attention-CP rank and
size, and the geometry (engine_keys.py; the vLLM connector uses the same rule).
Each TP rank thus stores its own head shard under its own keys.
"""

from __future__ import annotations

import logging
from typing import Any, List, Optional

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig

from ..._torch import host_block_tensor
from ...errors import GeometryMismatchError, PoolError, PoolFullError
from ...spec import KVSpec, parse_size
from ..engine_keys import engine_key, salt_digest

logger = logging.getLogger(__name__)

# extra_config keys this backend reads, with defaults.  SGLang's own keys
# (backend_name, module_path, class_name, interface_v1, tp_lcm_size) are allowed too.
EXTRA_DEFAULTS: dict[str, Any] = {
    "pool": "pykvshm-sglang",     # POSIX shm name or absolute path
    "capacity": "4GiB",           # size when this process creates the pool
    "create": "create_or_open",   # "open" | "create" | "create_or_open"
    "salt": "",                   # extra key salt: deployments with different salts never share pages
    "huge_pages": False,
    "prefault": False,
    "open_timeout": 60.0,
}
_SGLANG_KEYS = {"backend_name", "module_path", "class_name", "interface_v1", "tp_lcm_size"}
CREATE_MODES = ("open", "create", "create_or_open")

# Per host-pool layout: how a page view (get_data_page(index, flat=False)) maps onto the
# canonical (layer, K/V, token, head, head_dim) order.  (squeeze the page dim?, permutation)
_LAYOUTS = {
    "layer_first": (False, (1, 0, 2, 3, 4)),        # [2, L, T, H, D]
    "page_first": (False, (2, 0, 1, 3, 4)),         # [2, T, L, H, D]
    "page_first_direct": (True, (1, 0, 2, 3, 4)),   # [2, 1, L, T, H, D]
    "page_head": (True, (3, 0, 2, 1, 4)),           # [2, 1, H, T, L, D]
}


def _options(extra: dict[str, Any] | None) -> dict[str, Any]:
    extra = dict(extra or {})
    unknown = sorted(set(extra) - set(EXTRA_DEFAULTS) - _SGLANG_KEYS)
    if unknown:
        raise ValueError(f"unknown hicache storage extra_config keys for pykvshm: {unknown}; "
                         f"known: {sorted(EXTRA_DEFAULTS)}")
    opt = {**EXTRA_DEFAULTS, **extra}
    if opt["create"] not in CREATE_MODES:
        raise ValueError(f"extra_config 'create' must be one of {CREATE_MODES}, got {opt['create']!r}")
    if not isinstance(opt["pool"], str) or not opt["pool"]:
        raise ValueError(f"extra_config 'pool' must be a pool name or path, got {opt['pool']!r}")
    opt["capacity"] = parse_size(opt["capacity"])
    return opt


class PykvshmHiCacheStorage(HiCacheStorage):
    """`HiCacheStorage` over a pykvshm pool (MHA models; one pool block per page)."""

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Optional[dict] = None) -> None:
        if storage_config is None:
            raise ValueError("PykvshmHiCacheStorage needs SGLang's HiCacheStorageConfig")
        if storage_config.is_mla_model:
            raise NotImplementedError("PykvshmHiCacheStorage supports MHA models only (MLA KV is one latent "
                                      "buffer per layer, not K and V)")
        self.storage_config = storage_config
        self.opt = _options(storage_config.extra_config)
        self.pool: Any = None
        self.mem_pool_host: Any = None
        self.spec: KVSpec | None = None
        self._salt = b""
        self._squeeze = False
        self._perm: tuple[int, ...] = ()
        self._page = 0

    # ---- setup: the host pool fixes the geometry, then the pool is attached ----
    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        layout = getattr(mem_pool_host, "layout", None)
        if layout not in _LAYOUTS:
            raise NotImplementedError(f"PykvshmHiCacheStorage: host pool layout {layout!r} is not supported "
                                      f"(supported: {sorted(_LAYOUTS)})")
        for attr in ("layer_num", "head_num", "head_dim", "page_size", "dtype", "kv_buffer"):
            if getattr(mem_pool_host, attr, None) is None:
                raise GeometryMismatchError(
                    f"PykvshmHiCacheStorage needs an MHA host KV pool; {type(mem_pool_host).__name__} has no {attr}")
        v_dim = getattr(mem_pool_host, "v_head_dim", mem_pool_host.head_dim)
        if v_dim != mem_pool_host.head_dim:
            raise GeometryMismatchError(f"K and V head sizes differ ({mem_pool_host.head_dim} vs {v_dim})")
        spec = KVSpec(num_layers=int(mem_pool_host.layer_num), num_kv_heads=int(mem_pool_host.head_num),
                      head_dim=int(mem_pool_host.head_dim), block_tokens=int(mem_pool_host.page_size),
                      dtype=mem_pool_host.dtype)
        super().register_mem_pool_host(mem_pool_host)
        self.spec = spec
        self._page = spec.block_tokens
        self._squeeze, self._perm = _LAYOUTS[layout]
        c = self.storage_config
        self._salt = salt_digest([
            "pykvshm-sglang-v1", c.model_name, spec.dtype, repr(spec), f"tp{c.tp_rank}/{c.tp_size}",
            f"pp{c.pp_rank}/{c.pp_size}", f"cp{c.attn_cp_rank}/{c.attn_cp_size}", self.opt["salt"],
        ])
        if self.pool is None:
            self.pool = self._open_pool(spec)

    def _open_pool(self, spec: KVSpec) -> Any:
        from ...pool import Pool

        o = self.opt
        if o["create"] == "open":
            return Pool.open(o["pool"], spec, prefault=bool(o["prefault"]), huge_pages=bool(o["huge_pages"]))
        if o["create"] == "create":
            return Pool.create(o["pool"], spec, o["capacity"], prefault=bool(o["prefault"]),
                               huge_pages=bool(o["huge_pages"]))
        return Pool.open_or_create(o["pool"], spec, o["capacity"], timeout=float(o["open_timeout"]),
                                   prefault=bool(o["prefault"]), huge_pages=bool(o["huge_pages"]))

    def _live(self) -> Any:
        if self.pool is None:
            raise PoolError("PykvshmHiCacheStorage: no host KV pool registered yet (register_mem_pool_host)")
        return self.pool

    # ---- keys and page views ----
    def _keys(self, keys: List[str]) -> list[bytes]:
        return [engine_key(self._salt, k) for k in keys]

    def _canonical(self, page: torch.Tensor) -> torch.Tensor:
        """A host-pool page view (or a flat page in the host layout) as (L, 2, T, H, D)."""
        if self._squeeze:
            page = page.squeeze(1)
        return page.permute(*self._perm)

    def _host_page(self, index: int) -> torch.Tensor:
        host = self.mem_pool_host
        if not 0 <= index <= host.size - self._page:
            raise PoolError(f"host index {index} is outside the host KV pool ({host.size} tokens)")
        return self._canonical(host.get_data_page(index, flat=False))

    def _flat_page(self, flat: torch.Tensor) -> torch.Tensor:
        """A flat data page as SGLang's generic path builds it (get_data_page(flat=True))."""
        assert self.spec is not None
        host = self.mem_pool_host
        if flat.numel() * flat.element_size() != self.spec.block_bytes or flat.dtype != host.dtype:
            raise GeometryMismatchError(f"a page of {flat.numel()} {flat.dtype} does not match the pool's "
                                        f"{self.spec} ({self.spec.block_bytes} bytes)")
        shape = tuple(host.get_data_page(0, flat=False).shape)
        return self._canonical(flat.view(shape))

    def _block(self, view: Any) -> torch.Tensor:
        assert self.spec is not None
        return host_block_tensor(view).view(self.spec.torch_dtype).view(self.spec.block_shape)

    def _fill(self, w: Any, source: Any) -> None:
        """Copy ``source(position)`` into each block the writer reserved; no view outlives the call."""
        views = w.views()
        try:
            for i, p in enumerate(w.positions):
                self._block(views[i]).copy_(source(int(p)))
        finally:
            views.clear()  # even when a traceback keeps this frame alive

    def _drain(self, lease: Any, target: Any) -> None:
        """Copy each leased block into ``target(j)``; no view outlives the call."""
        views = lease.views()
        try:
            for j in range(len(views)):
                target(j).copy_(self._block(views[j]))
        finally:
            views.clear()

    def _page_indices(self, keys: List[str], host_indices: torch.Tensor) -> list[int]:
        if host_indices.numel() < len(keys) * self._page:
            raise PoolError(f"{len(keys)} pages need {len(keys) * self._page} host indices, "
                            f"got {host_indices.numel()}")
        return [int(host_indices[i * self._page]) for i in range(len(keys))]

    # ---- zero-copy interface (interface_v1): straight between host pool pages and pool blocks ----
    def batch_exists(self, keys: List[str], extra_info: Any = None) -> int:
        if not keys:
            return 0
        return int(self._live().match(self._keys(keys)))

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def batch_set_v1(self, keys: List[str], host_indices: torch.Tensor, extra_info: Any = None) -> List[bool]:
        if not keys:
            return []
        pool = self._live()
        starts = self._page_indices(keys, host_indices)
        try:
            w = pool.writer(self._keys(keys))
        except PoolFullError:
            logger.warning("pykvshm pool %s is full (everything pinned or being written): %d pages not stored",
                           pool.name, len(keys))
            return [False] * len(keys)
        try:
            self._fill(w, lambda p: self._host_page(starts[p]))
        except BaseException:
            w.abort()
            raise
        w.commit()
        # Keys the writer skipped were present already or are being stored by another writer.
        return [True] * len(keys)

    def batch_get_v1(self, keys: List[str], host_indices: torch.Tensor, extra_info: Any = None) -> List[bool]:
        if not keys:
            return []
        pool = self._live()
        starts = self._page_indices(keys, host_indices)
        lease = pool.acquire(self._keys(keys))
        try:
            n = len(lease)
            self._drain(lease, lambda j: self._host_page(starts[j]))
        finally:
            lease.release()
        return [True] * n + [False] * (len(keys) - n)

    # ---- generic interface (flat page tensors) ----
    def get(self, key: str, target_location: Optional[Any] = None, target_sizes: Optional[Any] = None) -> Any:
        if target_location is None:
            raise ValueError("PykvshmHiCacheStorage.get needs target_location (a flat page tensor to fill)")
        dst = self._flat_page(target_location)
        with self._live().acquire(self._keys([key])) as lease:
            if len(lease) == 0:
                return None
            self._drain(lease, lambda j: dst)
        return target_location

    def batch_get(self, keys: List[str], target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> List[Any]:
        if target_locations is None or len(target_locations) != len(keys):
            raise ValueError("PykvshmHiCacheStorage.batch_get needs one target page per key")
        out: list[Any] = []
        for k, t in zip(keys, target_locations):
            got = self.get(k, t)
            out.append(got)
            if got is None:  # a prefix store: nothing after a miss is usable
                out.extend([None] * (len(keys) - len(out)))
                break
        return out

    def set(self, key: str, value: Optional[Any] = None, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> bool:
        if value is None:
            raise ValueError("PykvshmHiCacheStorage.set needs a value (a flat page tensor)")
        return self.batch_set([key], [value])

    def batch_set(self, keys: List[str], values: Optional[Any] = None, target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> bool:
        if values is None or len(values) != len(keys):
            raise ValueError("PykvshmHiCacheStorage.batch_set needs one page per key")
        if not keys:
            return True
        srcs = [self._flat_page(v.contiguous()) for v in values]
        try:
            w = self._live().writer(self._keys(keys))
        except PoolFullError:
            return False
        try:
            self._fill(w, lambda p: srcs[p])
        except BaseException:
            w.abort()
            raise
        w.commit()
        return True

    # ---- housekeeping ----
    def clear(self) -> bool:
        # The pool is shared with other engines and instances: one instance's flush must not
        # drop their blocks.  Blocks age out by the pool's eviction instead.
        logger.warning("PykvshmHiCacheStorage.clear: the shared pool is not cleared by one SGLang instance")
        return False

    def get_stats(self) -> Any:
        return None if self.pool is None else self.pool.stats()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None
