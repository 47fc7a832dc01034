"""Runs inside the SGLang environment (scripts/setup_engines_env.sh): SGLang's own HiCache
cache controller, with its own device and host KV pools on the CPU, stores pages to and
loads pages from the pykvshm backend, loaded the way `--hicache-storage-backend dynamic`
loads it.

    python sglang_hicache.py store|load POOL LAYOUT SEED NPAGES [SHARED_PAGES]

store: fills NPAGES pages of the host KV pool (seeded random K/V), backs them up through
       HiCacheController.write_storage and checks every page was written.
load:  a fresh controller prefetches the same token sequence through
       HiCacheController.prefetch into newly allocated host pages and checks them bit for
       bit against the seeded data; then a sequence sharing only SHARED_PAGES leading pages
       must hit exactly SHARED_PAGES pages.
LAYERS, KV_HEADS, HEAD_DIM and PAGE (environment) set the geometry; with
$PYKVSHM_RENDEZVOUS_DIR set, it waits after attaching to the pool (rendezvous.py).
Prints one JSON line with what it saw.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time

import torch
import torch.distributed as dist
from rendezvous import meet

# Model geometry (the shared-pool test sets the vLLM test model's: 4 layers, 2 KV heads of 64).
L, H, D = (int(os.environ.get(k, v)) for k, v in (("LAYERS", "2"), ("KV_HEADS", "2"), ("HEAD_DIM", "16")))
P = int(os.environ.get("PAGE", "32"))
DEVICE_TOKENS = 64 * P


def setup(pool_name: str, layout: str, port: int):
    from sglang.srt.managers.cache_controller import HiCacheController
    from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
    from sglang.srt.mem_cache.hybrid_cache.hybrid_pool_assembler import _mha_host_inputs
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sglang.srt.server_args import ServerArgs
    from sglang.test.parallel_groups import publish
    from transformers import LlamaConfig

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=0, world_size=1)
    model = tempfile.mkdtemp(prefix="issue17-engines-model-")
    LlamaConfig(hidden_size=2 * H * D, intermediate_size=64, num_hidden_layers=L, num_attention_heads=2 * H,
                num_key_value_heads=H, head_dim=D, vocab_size=1024, max_position_embeddings=4096,
                architectures=["LlamaForCausalLM"]).save_pretrained(model)
    publish(ServerArgs(model_path=model, device="cpu", page_size=P, enable_hierarchical_cache=True,
                       hicache_storage_backend="dynamic", hicache_mem_layout=layout, skip_tokenizer_init=True),
            role="scheduler")
    kv = MHATokenToKVPool(DEVICE_TOKENS, P, torch.float32, H, D, L, "cpu", False, start_layer=0, end_layer=L)
    # build_kv_host_pool's arguments, except pin_memory: pinning calls cudaHostRegister
    # ("Torch not compiled with CUDA enabled" on a CPU-only torch).
    cls, info, kw = _mha_host_inputs(kv)
    host = cls(info, 2.0, 0, P, layout, pin_memory=False, **kw)
    alloc = PagedTokenToKVPoolAllocator(DEVICE_TOKENS, P, torch.float32, "cpu", kv, False)
    extra = {"backend_name": "pykvshm", "module_path": "pykvshm.integrations.sglang",
             "class_name": "PykvshmHiCacheStorage", "interface_v1": 1, "pool": pool_name, "capacity": "64MiB"}
    ctrl = HiCacheController(alloc, host, P, dist.group.WORLD, threading.Event(), storage_backend="dynamic",
                             model_name="issue17-tiny-llama", storage_backend_extra_config=extra)
    assert type(ctrl.storage_backend).__name__ == "PykvshmHiCacheStorage", type(ctrl.storage_backend)
    assert ctrl.page_set_func.__name__ == "_page_set_zero_copy", ctrl.page_set_func
    return ctrl, host


def tokens_for(seed: int, npages: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1000, (npages * P,), generator=g).tolist()


def pages_for(seed: int, npages: int) -> torch.Tensor:
    """(npages, 2, L, P, H, D): K and V of each page, in SGLang's token-major form."""
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn((npages, 2, L, P, H, D), generator=g)


def host_page(host, index: int) -> torch.Tensor:
    """One page of the host pool as (2, L, P, H, D), whatever its layout."""
    page = host.get_data_page(index, flat=False)
    return {
        "layer_first": lambda t: t,
        "page_first": lambda t: t.permute(0, 2, 1, 3, 4),
        "page_first_direct": lambda t: t.squeeze(1),
        "page_head": lambda t: t.squeeze(1).permute(0, 3, 2, 1, 4),
    }[host.layout](page)


def wait(q, timeout: float = 60.0):
    from queue import Empty

    try:
        return q.get(timeout=timeout)
    except Empty:
        raise SystemExit(f"timed out after {timeout} s waiting for the cache controller") from None


def store(ctrl, host, seed: int, npages: int) -> dict:
    from sglang.srt.mem_cache.utils import get_storage_hash_str

    toks, data = tokens_for(seed, npages), pages_for(seed, npages)
    idx = host.alloc(npages * P)
    for j in range(npages):
        host_page(host, int(idx[j * P])).copy_(data[j])
    hashes = get_storage_hash_str(toks, None, page_size=P)
    ctrl.write_storage(idx, toks, hash_value=hashes)
    op = wait(ctrl.ack_backup_queue)
    return {"stored_tokens": op.completed_tokens, "exists": ctrl.storage_backend.batch_exists(hashes)}


def prefetch(ctrl, host, toks: list[int]) -> tuple[int, torch.Tensor | None]:
    op = ctrl.prefetch("req-%d" % time.monotonic_ns(), toks)
    op = wait(ctrl.prefetch_hit_queue)
    hit = op.storage_hit_count
    if hit == 0:
        return 0, None
    idx = host.alloc(hit)
    op.host_indices = idx
    ctrl.prefetch_buffer.put(op)
    done = 0
    while done < hit:
        ack = wait(ctrl.ack_prefetch_queue)
        if ack.completed_tokens is None:
            continue
        done = ack.completed_tokens
        if done < hit:
            break
    return done, idx


def load(ctrl, host, seed: int, npages: int, shared: int) -> dict:
    toks, data = tokens_for(seed, npages), pages_for(seed, npages)
    done, idx = prefetch(ctrl, host, toks)
    exact = idx is not None and all(torch.equal(host_page(host, int(idx[j * P])), data[j])
                                    for j in range(done // P))
    other = toks[: shared * P] + [t + 1 for t in toks[shared * P:]]  # diverges after `shared` pages
    done2, _ = prefetch(ctrl, host, other)
    return {"loaded_tokens": done, "bit_exact": bool(exact), "partial_hit_tokens": done2}


def main() -> None:
    role, pool, layout, seed, npages = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    shared = int(sys.argv[6]) if len(sys.argv) > 6 else 0
    ctrl, host = setup(pool, layout, 29500 + os.getpid() % 1000)
    meet("sglang", role)
    out = store(ctrl, host, seed, npages) if role == "store" else load(ctrl, host, seed, npages, shared)
    out.update(role=role, layout=layout, page=P)
    ctrl.detach_storage_backend()
    print("RESULT " + json.dumps(out), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
