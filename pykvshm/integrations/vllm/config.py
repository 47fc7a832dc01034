"""The connector's configuration: what `kv_connector_extra_config` says, the pool geometry vLLM's
KV cache implies, and the pool keys of a request's blocks.

Both halves of the connector (the scheduler's and each worker's) build the same
`ConnectorConfig` from the same `VllmConfig` and `KVCacheConfig`, so they agree on the
pool, its geometry and the keys without talking to each other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ...errors import GeometryMismatchError, PoolError
from ...spec import KVSpec, parse_size
from ..engine_keys import engine_key, salt_digest

# kv_connector_extra_config keys, with their defaults.
EXTRA_DEFAULTS: dict[str, Any] = {
    "pool": "pykvshm-vllm",       # POSIX shm name or absolute path (file, hugetlbfs, /dev/daxX.Y)
    "capacity": "4GiB",           # size when this engine creates the pool
    "create": "create_or_open",   # "open" | "create" | "create_or_open"
    "salt": "",                   # extra key salt: engines with different salts never share blocks
    "coherence": "coherent",      # "coherent" | "noncoherent" (multi-host CXL 2.0), at creation
    "huge_pages": False,
    "prefault": False,
    "numa_node": None,
    "lease": 10.0,                # seconds before a silent member of another host is presumed dead
    "allow_foreign": False,       # attach to a pool owned by another user / writable by others (shared on purpose)
    "open_timeout": 60.0,         # seconds to wait for another engine that is creating the pool
    "stats_file": None,           # append one JSON line of worker load/save timings per step
    "layerwise_loads": True,      # queue loads per layer; wait_for_layer_load waits for one layer only
    "save_generated": True,       # also save blocks that fill up during decode (multi-turn hits)
    "async_load_bytes": 67108864,  # 64 MiB: loads at least this large (per rank) go asynchronous; None: never
    "tier": None,                 # cluster tier URL (mooncake://MASTER:PORT?metadata=...): pykvshm.tier
    "tier_wait": 0.0,             # seconds a request may be held back while the tier promotes its miss
}
CREATE_MODES = ("open", "create", "create_or_open")


@dataclass(frozen=True)
class ConnectorConfig:
    """Everything both halves of the connector derive from vLLM's configuration."""

    pool: str
    capacity: int
    create: str
    spec: KVSpec
    salt: bytes                 # 16-byte digest folded into every key
    block_size: int             # tokens per engine block (= spec.block_tokens)
    hash_stride: int            # block_hashes entries per engine block
    save: bool                  # producer or both: store computed prompt blocks
    load: bool                  # consumer or both: load matched prefixes
    pool_options: tuple[tuple[str, Any], ...]
    open_timeout: float
    stats_file: str | None
    layerwise_loads: bool = True  # loads queued per layer; wait_for_layer_load waits for one layer
    save_generated: bool = True   # save blocks that fill up during decode too
    async_load_bytes: int | None = 64 << 20  # loads this large run asynchronously (WAITING_FOR_REMOTE_KVS)
    tp_rank: int = 0              # this process's tensor-parallel rank (0 in the scheduler)
    tp_size: int = 1
    rank_salts: tuple[bytes, ...] = ()  # the salt of every tensor-parallel rank; rank_salts[tp_rank] == salt
    tier: str | None = None       # cluster tier URL (pykvshm.tier); None: no tier
    tier_wait: float = 0.0        # seconds a request may be held back (not scheduled) for a promotion

    @classmethod
    def from_vllm(cls, vllm_config: Any, kv_cache_config: Any, worker: bool = False) -> "ConnectorConfig":
        """``worker``: built for a worker process, whose tensor-parallel rank picks its keys (the
        scheduler's config is rank 0's and knows every rank's salt)."""
        ktc = vllm_config.kv_transfer_config
        extra = dict(ktc.kv_connector_extra_config or {})
        unknown = sorted(set(extra) - set(EXTRA_DEFAULTS))
        if unknown:
            raise ValueError(
                f"unknown kv_connector_extra_config keys for PykvshmConnector: {unknown}; "
                f"known: {sorted(EXTRA_DEFAULTS)}")
        opt = {**EXTRA_DEFAULTS, **extra}
        if opt["create"] not in CREATE_MODES:
            raise ValueError(f"kv_connector_extra_config 'create' must be one of {CREATE_MODES}, got {opt['create']!r}")
        if not isinstance(opt["pool"], str) or not opt["pool"]:
            raise ValueError(f"kv_connector_extra_config 'pool' must be a pool name or path, got {opt['pool']!r}")
        if opt["tier"] is not None:
            from ...tier.config import parse_url

            parse_url(opt["tier"])  # a malformed URL fails here, with TierConfigError
        if not isinstance(opt["tier_wait"], (int, float)) or not 0 <= float(opt["tier_wait"]) <= 60:
            raise ValueError(
                f"kv_connector_extra_config 'tier_wait' must be seconds in [0, 60], got {opt['tier_wait']!r}")
        for flag in ("layerwise_loads", "save_generated"):
            if not isinstance(opt[flag], bool):
                raise ValueError(f"kv_connector_extra_config {flag!r} must be true or false, got {opt[flag]!r}")
        async_bytes = opt["async_load_bytes"]
        if isinstance(async_bytes, bool):
            raise ValueError("kv_connector_extra_config 'async_load_bytes' must be a size (bytes or e.g. '64MiB'), "
                             f"0 or null, got {async_bytes!r}")
        if async_bytes is not None and async_bytes != 0:  # 0: every load asynchronous; None: none
            try:
                async_bytes = parse_size(async_bytes)
            except (TypeError, ValueError) as e:
                raise ValueError(f"kv_connector_extra_config 'async_load_bytes' must be a size (bytes or e.g. "
                                 f"'64MiB'), 0 or null, got {async_bytes!r}") from e

        par = vllm_config.parallel_config
        if getattr(par, "pipeline_parallel_size", 1) != 1:
            raise NotImplementedError(
                f"PykvshmConnector supports pipeline_parallel_size=1 only (got {par.pipeline_parallel_size})")
        tp_size = int(getattr(par, "tensor_parallel_size", 1) or 1)
        tp_rank = _tp_rank() if worker and tp_size > 1 else 0
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tensor-parallel rank {tp_rank} outside tensor_parallel_size {tp_size}")

        spec, layer_names = spec_from_kv_cache_config(kv_cache_config)
        bs = spec.block_tokens
        hash_bs = getattr(kv_cache_config, "hash_block_size", None) or bs
        if bs % hash_bs:
            raise GeometryMismatchError(f"engine block size {bs} is not a multiple of the hash block size {hash_bs}")
        hash_algo = str(getattr(vllm_config.cache_config, "prefix_caching_hash_algo", "sha256"))
        if hash_algo.startswith("xxhash") and "PYTHONHASHSEED" not in os.environ:
            raise ValueError(
                f"prefix_caching_hash_algo={hash_algo!r} seeds its hashes randomly per process unless "
                "PYTHONHASHSEED is set (the same value in every engine); set it or use sha256")

        rank_salts = tuple(_salt(vllm_config, spec, layer_names, str(opt["salt"]), r, tp_size) for r in range(tp_size))
        return cls(
            pool=opt["pool"],
            capacity=parse_size(opt["capacity"]),
            create=opt["create"],
            spec=spec,
            salt=rank_salts[tp_rank],
            block_size=bs,
            hash_stride=bs // hash_bs,
            save=bool(ktc.is_kv_producer),
            load=bool(ktc.is_kv_consumer),
            pool_options=tuple(sorted(
                (k, opt[k]) for k in ("coherence", "huge_pages", "prefault", "numa_node", "lease", "allow_foreign"))),
            open_timeout=float(opt["open_timeout"]),
            stats_file=opt["stats_file"],
            layerwise_loads=opt["layerwise_loads"],
            save_generated=opt["save_generated"],
            async_load_bytes=async_bytes,
            tp_rank=tp_rank,
            tp_size=tp_size,
            rank_salts=rank_salts,
            tier=opt["tier"],
            tier_wait=float(opt["tier_wait"]),
        )

    def open_pool(self) -> Any:
        """Attach to (or create) the configured pool, checking its geometry."""
        from ...pool import Pool

        options = dict(self.pool_options)
        open_options = {k: options[k] for k in ("prefault", "huge_pages", "numa_node", "lease", "allow_foreign")}
        if self.create == "open":
            return Pool.open(self.pool, self.spec, **open_options)
        if self.create == "create":
            options.pop("allow_foreign")
            return Pool.create(self.pool, self.spec, self.capacity, **options)
        return Pool.open_or_create(self.pool, self.spec, self.capacity, timeout=self.open_timeout, **options)


def spec_from_kv_cache_config(kv_cache_config: Any) -> tuple[KVSpec, list[str]]:
    """The pool geometry of vLLM's KV cache: one pool block = one engine block of every layer."""
    groups = list(kv_cache_config.kv_cache_groups)
    if len(groups) != 1:
        raise GeometryMismatchError(
            f"PykvshmConnector supports one KV cache group (uniform full attention); this model has {len(groups)}")
    group = groups[0]
    s = group.kv_cache_spec
    for attr in ("block_size", "num_kv_heads", "head_size", "dtype"):
        if not hasattr(s, attr):
            raise GeometryMismatchError(f"unsupported KV cache spec {type(s).__name__} (no {attr})")
    head_v = getattr(s, "head_size_v", None)
    if head_v not in (None, s.head_size):
        raise GeometryMismatchError(f"K and V head sizes differ ({s.head_size} vs {head_v}); not supported")
    if getattr(s, "sliding_window", None) or getattr(s, "attention_chunk_size", None):
        raise GeometryMismatchError("sliding-window and chunked attention KV caches are not supported")
    spec = KVSpec(num_layers=len(group.layer_names), num_kv_heads=int(s.num_kv_heads), head_dim=int(s.head_size),
                  block_tokens=int(s.block_size), dtype=s.dtype)
    return spec, list(group.layer_names)


def _tp_rank() -> int:
    """This worker's tensor-parallel rank (vLLM builds worker connectors after its process groups)."""
    from vllm.distributed import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("tensor_parallel_size > 1 but vLLM's tensor-parallel group is not initialised")
    return int(parallel_state.get_tensor_model_parallel_rank())


def _salt(vllm_config: Any, spec: KVSpec, layer_names: list[str], user_salt: str, tp_rank: int = 0,
          tp_size: int = 1) -> bytes:
    """What two engines must share for one's KV bytes to be valid in the other.

    Layer slots hold engine blocks verbatim, whose interior depends on the attention
    backend, the CPU ISA and the cache dtype; engines that differ in any of these
    get different keys and simply miss.  At tensor_parallel_size > 1 a pool block holds one
    rank's shard (its KV heads), so the rank and the TP size are part of the salt; at TP=1
    nothing is added and keys are those of earlier releases.
    """
    import torch

    mc, cc = vllm_config.model_config, vllm_config.cache_config
    device = str(getattr(vllm_config.device_config, "device_type", "") or "")
    backend = getattr(getattr(vllm_config, "attention_config", None), "backend", None)
    isa = torch.backends.cpu.get_cpu_capability() if device == "cpu" else ""
    parts = [
        "pykvshm-vllm-v1", str(mc.model), str(getattr(mc, "revision", None)), str(mc.dtype),
        str(getattr(cc, "cache_dtype", "auto")), str(getattr(cc, "kv_cache_layout", None)), str(backend),
        device, isa, repr(spec), ",".join(layer_names), user_salt,
    ]
    if tp_size > 1:
        parts.append(f"tp={tp_rank}/{tp_size}")
    return salt_digest(parts)


def request_keys(cfg: ConnectorConfig, block_hashes: list[Any], num_blocks: int, rank: int | None = None,
                 start: int = 0) -> list[bytes]:
    """Pool keys of a request's engine blocks ``start`` to ``num_blocks - 1`` (of tensor-parallel
    rank ``rank``; default: this process's).

    vLLM's block hash i is already chained over the whole prefix (and its extra keys:
    LoRA, multimodal inputs, cache_salt), so equal keys mean equal prefixes.
    """
    salt = cfg.salt if rank is None else cfg.rank_salts[rank]
    stride = cfg.hash_stride
    n = min(num_blocks, len(block_hashes) // stride)
    keys = []
    for i in range(start, n):
        h = block_hashes[(i + 1) * stride - 1]
        if not isinstance(h, (bytes, bytearray)):
            raise PoolError(f"vLLM block hash of type {type(h).__name__}; expected bytes (sha256 prefix hashing)")
        keys.append(engine_key(salt, bytes(h)))
    return keys
