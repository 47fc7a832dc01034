"""A real vLLM scheduler with PykvshmConnector, driven without a model (vLLM env only).

Modelled on the pattern of vLLM's own connector unit tests: build a VllmConfig on a
locally written model config, a KVCacheConfig with one full-attention group, a real
`Scheduler`, and `Request`s hashed with sha256.  Worker-side connectors get real CPU
KV cache tensors of the CPU backend's shape, so loads and saves move real bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

BLOCK = 32
LAYERS = 4
KV_HEADS = 2
HEAD_DIM = 64


def write_model_config(path: str) -> str:
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=LAYERS,
                num_attention_heads=4, num_key_value_heads=KV_HEADS, max_position_embeddings=2048).save_pretrained(path)
    return path


def vllm_config(model_dir: str, extra: dict[str, Any], role: str = "kv_both", *,
                max_num_batched_tokens: int = 2048, policy: str = "recompute") -> Any:
    from vllm.config import CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig, SchedulerConfig, VllmConfig

    model = ModelConfig(model=model_dir, skip_tokenizer_init=True, dtype="float32", max_model_len=1024, seed=0)
    sched = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=max_num_batched_tokens, max_model_len=1024,
                            enable_chunked_prefill=True, is_encoder_decoder=False)
    cache = CacheConfig(block_size=BLOCK, enable_prefix_caching=True)
    kvt = KVTransferConfig(kv_connector="PykvshmConnector", kv_connector_module_path="pykvshm.integrations.vllm",
                           kv_role=role, kv_load_failure_policy=policy, kv_connector_extra_config=extra)
    return VllmConfig(model_config=model, scheduler_config=sched, cache_config=cache, kv_transfer_config=kvt,
                      device_config=DeviceConfig("cpu"))


def kv_cache_config(num_blocks: int) -> Any:
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    names = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=KV_HEADS, head_size=HEAD_DIM, dtype=torch.float32)
    return KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(names, spec)])


def scheduler(cfg: Any, num_blocks: int = 128) -> Any:
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.structured_output import StructuredOutputManager

    cfg.cache_config.num_gpu_blocks = num_blocks
    return Scheduler(vllm_config=cfg, kv_cache_config=kv_cache_config(num_blocks),
                     structured_output_manager=StructuredOutputManager(cfg), block_size=BLOCK, log_stats=True)


_hasher = None


def request(req_id: str, tokens: list[int], max_tokens: int = 4) -> Any:
    from vllm import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    global _hasher
    if _hasher is None:
        init_none_hash(sha256)
        _hasher = get_request_block_hasher(BLOCK, sha256)
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return Request(request_id=req_id, prompt_token_ids=list(tokens), sampling_params=sp, pooling_params=None,
                   block_hasher=_hasher)


@dataclass
class Worker:
    """A worker-role connector over real CPU-backend-shaped KV tensors."""

    connector: Any
    kv: dict[str, torch.Tensor]
    finished: set[str] = field(default_factory=set)  # asynchronous loads reported by the last step

    @classmethod
    def create(cls, cfg: Any, num_blocks: int = 128, seed: int | None = None) -> "Worker":
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

        from pykvshm.integrations.vllm import PykvshmConnector

        conn = PykvshmConnector(cfg, KVConnectorRole.WORKER, kv_cache_config(num_blocks))
        # The CPU backend's layout: [num_blocks, num_kv_heads, block_size, 2 * head_dim].
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        kv = {f"model.layers.{i}.self_attn.attn": (torch.randn(num_blocks, KV_HEADS, BLOCK, 2 * HEAD_DIM, generator=g)
                                                    if g is not None else torch.zeros(num_blocks, KV_HEADS, BLOCK, 2 * HEAD_DIM))
              for i in range(LAYERS)}
        conn.register_kv_caches(kv)
        return cls(conn, kv)

    def run_step(self, meta: Any) -> set[int]:
        """What a model runner does with one step's metadata; returns the load errors."""
        self.connector.bind_connector_metadata(meta)
        self.connector.start_load_kv(None)
        for name, t in self.kv.items():
            self.connector.wait_for_layer_load(name)
            self.connector.save_kv_layer(name, t, None)
        self.connector.wait_for_save()
        self.finished = set(self.connector.get_finished(set())[1] or ())  # before the errors, as vLLM asks
        errors = self.connector.get_block_ids_with_load_errors()
        self.connector.clear_connector_metadata()
        return errors

    def block(self, block_id: int) -> torch.Tensor:
        """Every layer's bytes of one engine block."""
        return torch.stack([t[block_id] for t in self.kv.values()])


def model_output(sched_out: Any, sched: Any, invalid_block_ids: set[int] | None = None, token: int = 7,
                 finished_recving: set[str] | None = None) -> Any:
    """A ModelRunnerOutput sampling `token` for every request whose prompt this step completes
    (a partial prefill samples nothing, as the model runner discards it)."""
    from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

    cached = sched_out.scheduled_cached_reqs
    start = {r.req_id: r.num_computed_tokens for r in sched_out.scheduled_new_reqs}
    start.update(zip(cached.req_ids, cached.num_computed_tokens))
    req_ids = list(start)
    sampled = [[token] if start[r] + sched_out.num_scheduled_tokens[r] >= sched.requests[r].num_prompt_tokens else []
               for r in req_ids]
    return ModelRunnerOutput(
        req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
        sampled_token_ids=sampled, logprobs=None, prompt_logprobs_dict={}, pooler_output=[],
        kv_connector_output=KVConnectorOutput(invalid_block_ids=set(invalid_block_ids or ()),
                                              finished_recving=set(finished_recving or ())),
    )
