"""Runs inside the LMCache environment (scripts/setup_engines_env.sh): LMCache's own
LMCacheEngine (token database, StorageManager, LocalCPUBackend) stores chunks to and
retrieves chunks from the pykvshm storage plugin, loaded from ``storage_plugins`` the
way LMCache loads any out-of-tree backend.

    python lmcache_engine.py store|load POOL SEED NCHUNKS [SHARED_CHUNKS]

LMCache 0.5.6 has no GPU connector for a CPU device (CreateGPUConnector raises "No
supported cpu connector found."), so the paged-KV gather/scatter is CpuPagedConnector
below: it copies between a paged KV cache [2, slots, H, D] per layer and LMCache's
KV_2LTD memory objects by slot mapping, as the CUDA connector does on a GPU.
local_cpu is off, so every hit on load comes from the pool.
LAYERS, KV_HEADS, HEAD_DIM, CHUNK and BLOCK (environment) set the geometry; with
$PYKVSHM_RENDEZVOUS_DIR set, it waits after attaching to the pool (rendezvous.py).
Prints one JSON line with what it saw.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("PYTHONHASHSEED", "0")  # LMCache's builtin chunk hash must agree across processes

import torch
from lmcache.v1.cache_engine import LMCacheEngineBuilder
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.gpu_connector.gpu_connectors import GPUConnectorInterface
from lmcache.v1.metadata import LMCacheMetadata
from rendezvous import meet

# Model geometry (the shared-pool test sets the vLLM test model's: 4 layers, 2 KV heads of 64).
L, H, D = (int(os.environ.get(k, v)) for k, v in (("LAYERS", "2"), ("KV_HEADS", "2"), ("HEAD_DIM", "16")))
CHUNK = int(os.environ.get("CHUNK", "64"))
BLOCK = int(os.environ.get("BLOCK", "32"))
SLOTS = 64 * CHUNK


class CpuPagedConnector(GPUConnectorInterface):
    def __init__(self) -> None:
        self.kvcaches = None

    def get_shape(self, num_tokens: int) -> torch.Size:
        return torch.Size([2, L, num_tokens, H * D])

    def from_gpu(self, memory_obj, start, end, **kw):  # type: ignore[no-untyped-def]
        kv, slots = kw["kvcaches"], kw["slot_mapping"][start:end]
        for layer in range(L):
            memory_obj.tensor[:, layer, : end - start] = kv[layer].view(2, -1, H * D)[:, slots]

    def to_gpu(self, memory_obj, start, end, **kw):  # type: ignore[no-untyped-def]
        kv, slots = kw["kvcaches"], kw["slot_mapping"][start:end]
        for layer in range(L):
            kv[layer].view(2, -1, H * D)[:, slots] = memory_obj.tensor[:, layer, : end - start]

    def batched_from_gpu(self, memory_objs, starts, ends, **kw):  # type: ignore[no-untyped-def]
        for m, a, b in zip(memory_objs, starts, ends):
            self.from_gpu(m, a, b, **kw)

    def batched_to_gpu(self, memory_objs=None, starts=None, ends=None, **kw):  # type: ignore[no-untyped-def]
        for m, a, b in zip(memory_objs, starts, ends):
            self.to_gpu(m, a, b, **kw)


def engine(pool: str):
    cfg = LMCacheEngineConfig.from_defaults(
        chunk_size=CHUNK, local_cpu=False, max_local_cpu_size=0.05, storage_plugins=["pykvshm"],
        extra_config={"storage_plugin.pykvshm.module_path": "pykvshm.integrations.lmcache",
                      "storage_plugin.pykvshm.class_name": "PykvshmStorageBackend",
                      "pykvshm.pool": pool, "pykvshm.capacity": "64MiB", "pykvshm.block_tokens": BLOCK})
    md = LMCacheMetadata(model_name="issue17-tiny-llama", world_size=1, local_world_size=1, worker_id=0,
                         local_worker_id=0, kv_dtype=torch.float32, kv_shape=(L, 2, CHUNK, H, D))
    eng = LMCacheEngineBuilder.get_or_create("issue17", cfg, md, CpuPagedConnector(), None, None)
    eng.post_init()
    backends = eng.storage_manager.storage_backends
    assert type(backends.get("pykvshm")).__name__ == "PykvshmStorageBackend", list(backends)
    return eng


def tokens_for(seed: int, n: int) -> torch.Tensor:
    return torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(seed))


def kv_for(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    return [torch.randn((2, SLOTS, H, D), generator=g) for _ in range(L)]


def main() -> None:
    role, pool, seed, nchunks = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    shared = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    eng = engine(pool)
    meet("lmcache", role)
    ntok = nchunks * CHUNK + CHUNK // 2          # and a partial last chunk, which is not stored
    toks = tokens_for(seed, ntok)
    slots = torch.randperm(SLOTS, generator=torch.Generator().manual_seed(seed + 2))[:ntok]
    kv = kv_for(seed)
    out: dict = {"role": role, "chunk": CHUNK, "block": BLOCK}
    if role == "store":
        eng.store(toks, kvcaches=kv, slot_mapping=slots)
        out["stored_blocks"] = eng.storage_manager.storage_backends["pykvshm"].pool.stats().get("sealed")
    else:
        out["lookup_tokens"] = int(eng.lookup(toks))
        got = [torch.zeros_like(t) for t in kv]
        mask = eng.retrieve(toks, kvcaches=got, slot_mapping=slots)
        n = int(mask.sum())
        out["retrieved_tokens"] = n
        out["bit_exact"] = all(torch.equal(got[layer][:, slots[:n]], kv[layer][:, slots[:n]]) for layer in range(L))
        out["untouched_after"] = all(not got[layer][:, slots[n:]].any() for layer in range(L))
        other = toks.clone()
        other[shared * CHUNK:] += 1                # diverges after `shared` chunks
        out["partial_lookup_tokens"] = int(eng.lookup(other))
    LMCacheEngineBuilder.destroy("issue17")
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
