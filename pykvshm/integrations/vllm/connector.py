"""`PykvshmConnector`: the `KVConnectorBase_V1` vLLM loads by module path.

vLLM builds one instance per role: the scheduler process's (role SCHEDULER) answers
prefix lookups and plans each step; each worker process's (role WORKER) moves the
bytes.  Both attach to the same pool; the plan travels to the workers as
`PykvshmMetadata`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

from .config import ConnectorConfig
from .metadata import PykvshmMetadata
from .scheduler import SchedulerSide
from .stats import PykvshmPromMetrics, PykvshmStats
from .worker import WorkerSide, evict_all

if TYPE_CHECKING:
    import torch

log = logging.getLogger("pykvshm.vllm")


class PykvshmConnector(KVConnectorBase_V1):
    """KV connector over a pykvshm shared-memory pool (producer, consumer or both)."""

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.cfg = ConnectorConfig.from_vllm(vllm_config, kv_cache_config, worker=role == KVConnectorRole.WORKER)
        policy = getattr(self._kv_transfer_config, "kv_load_failure_policy", "fail")
        if self.cfg.load and policy != "recompute":
            log.warning(
                "PykvshmConnector: kv_load_failure_policy=%r; with 'fail' a block evicted between the "
                "scheduler's lookup and the worker's load fails the request instead of being recomputed. "
                "Set kv_load_failure_policy='recompute'.", policy)
        self.pool = self.cfg.open_pool()
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = SchedulerSide(self.cfg, self.pool)
        else:
            self._worker = WorkerSide(self.cfg, self.pool)
        log.info("PykvshmConnector (%s, %s) on pool %r: %s, %d blocks", role.name,
                 "both" if self.cfg.save and self.cfg.load else "producer" if self.cfg.save else "consumer",
                 self.cfg.pool, self.cfg.spec, self.pool.num_blocks)

    @property
    def scheduler_side(self) -> SchedulerSide:
        if self._scheduler is None:
            raise RuntimeError("this PykvshmConnector was built for the worker role")
        return self._scheduler

    @property
    def worker_side(self) -> WorkerSide:
        if self._worker is None:
            raise RuntimeError("this PykvshmConnector was built for the scheduler role")
        return self._worker

    def _meta(self) -> PykvshmMetadata:
        meta = self._get_connector_metadata()
        assert isinstance(meta, PykvshmMetadata), type(meta)
        return meta

    # ---- worker role ----
    def register_kv_caches(self, kv_caches: dict[str, "torch.Tensor"]) -> None:
        self.worker_side.register_kv_caches(kv_caches, int(self._kv_cache_config.num_blocks))

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        self.worker_side.start_load_kv(self._meta())

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.worker_side.wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: "torch.Tensor", attn_metadata: Any, **kwargs: Any) -> None:
        self.worker_side.save_kv_layer(layer_name, kv_layer, self._meta())

    def wait_for_save(self) -> None:
        self.worker_side.wait_for_save()

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker_side.get_block_ids_with_load_errors()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Requests whose asynchronous load has landed since the last call (nothing is sent
        asynchronously: saves commit in wait_for_save)."""
        return None, self.worker_side.get_finished_loads()

    # ---- both roles: vLLM's KV-connector stats (Prometheus /metrics) ----
    def get_kv_connector_stats(self) -> PykvshmStats | None:
        """What this half counted since vLLM last asked (workers: loads and saves; scheduler:
        lookups and hits); vLLM sums the halves and every rank."""
        side = self._worker if self._worker is not None else self._scheduler
        return side.get_kv_connector_stats() if side is not None else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return PykvshmStats(data=dict(data) if data else {})

    @classmethod
    def build_prom_metrics(cls, vllm_config: Any, metric_types: dict[Any, Any], labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> KVConnectorPromMetrics | None:
        return PykvshmPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        else:
            if self._scheduler is not None and self._scheduler.tier is not None:
                self._scheduler.tier.close()
            if not self.pool.closed:
                self.pool.close()

    # ---- scheduler role ----
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self.scheduler_side.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        self.scheduler_side.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        return self.scheduler_side.build_connector_meta(scheduler_output)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler_side.request_finished(request, block_ids)

    def reset_cache(self) -> bool:
        """`LLM.reset_prefix_cache(reset_connector=True)`: evict every block of the shared pool.

        Every engine on the pool loses its hits (the pool is one cache for all of them),
        which is what a weight update needs.  False while blocks are pinned or being written.
        """
        return evict_all(self.pool)
