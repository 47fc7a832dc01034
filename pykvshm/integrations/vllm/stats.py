"""The connector's counters, reported through vLLM's KV-connector stats interface.

Each step, every worker's connector (one per tensor-parallel rank) and the scheduler's return a
`PykvshmStats` from `get_kv_connector_stats` (what they counted since their previous call); vLLM
sums the workers' and the scheduler's (`aggregate`), ships the dict to the front end, and there
`PykvshmPromMetrics` adds it to Prometheus counters, which a `vllm serve` exposes on `/metrics`
(and `LLM.get_metrics()` returns when stats are enabled).  The periodic log line uses `reduce`.

Counting rules (what each counter means when several ranks add theirs):

- scheduler: ``lookups`` (requests the scheduler asked the pool about, once per scheduling),
  ``hit_blocks``/``hit_tokens`` (blocks and tokens the connector granted; at TP > 1 the match is
  already the minimum over ranks);
- workers: ``load_reqs``, ``load_async_reqs``, ``load_blocks``, ``load_failed_blocks``, ``save_blocks`` and
  ``save_skipped_blocks`` are engine blocks, counted by tensor-parallel rank 0 only (every rank
  moves its shard of the same blocks); ``load_bytes``, ``save_bytes`` are every rank's shards
  summed (what crossed the pool); ``load_seconds``, ``save_seconds`` are the connector's time on
  the forward thread, summed over ranks;
- scheduler, with the cluster tier: ``tier_promoted_blocks``, ``tier_demoted_blocks``,
  ``tier_demote_failed_blocks`` are pool blocks (at TP > 1 each rank's shard is a pool block of its
  own, so they count every rank's), ``tier_promote_misses`` and ``tier_integrity_failures`` count
  promotions that stopped at a missing or a refused value (pykvshm.tier.Tier.stats).  They are
  reported at the next scheduler step after the tier's threads counted them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

# data key -> (Prometheus counter name, documentation).  prometheus_client appends "_total".
COUNTERS: dict[str, tuple[str, str]] = {
    "lookups": ("vllm:pykvshm_lookups", "Requests whose prompt the pykvshm connector looked up in the pool"),
    "hit_blocks": ("vllm:pykvshm_hit_blocks", "Engine blocks the pykvshm connector granted from the pool"),
    "hit_tokens": ("vllm:pykvshm_hit_tokens", "Prompt tokens the pykvshm connector granted from the pool"),
    "load_reqs": ("vllm:pykvshm_load_requests", "Requests whose blocks were loaded from the pykvshm pool"),
    "load_async_reqs": ("vllm:pykvshm_load_async_requests",
                        "Requests whose load ran asynchronously (WAITING_FOR_REMOTE_KVS, async_load_bytes)"),
    "load_blocks": ("vllm:pykvshm_load_blocks", "Engine blocks loaded from the pykvshm pool"),
    "load_failed_blocks": ("vllm:pykvshm_load_failed_blocks",
                           "Engine blocks whose load failed (gone from the pool); vLLM recomputes them"),
    "load_bytes": ("vllm:pykvshm_load_bytes", "Bytes loaded from the pykvshm pool, all ranks"),
    "load_seconds": ("vllm:pykvshm_load_seconds", "Seconds the forward thread spent starting and waiting for loads"),
    "save_blocks": ("vllm:pykvshm_save_blocks", "Engine blocks published into the pykvshm pool"),
    "save_skipped_blocks": ("vllm:pykvshm_save_skipped_blocks",
                            "Engine blocks not saved (pool full, failed load, aborted writer)"),
    "save_bytes": ("vllm:pykvshm_save_bytes", "Bytes published into the pykvshm pool, all ranks"),
    "save_seconds": ("vllm:pykvshm_save_seconds", "Seconds the forward thread spent on saves"),
    # The cluster tier (kv_connector_extra_config["tier"]), counted by the scheduler's tier client.
    "tier_promoted_blocks": ("vllm:pykvshm_tier_promoted_blocks",
                             "Pool blocks the cluster tier promoted from the store into the pool, all ranks"),
    "tier_promote_misses": ("vllm:pykvshm_tier_promote_misses",
                            "Promotions that stopped at a block the store did not have"),
    "tier_integrity_failures": ("vllm:pykvshm_tier_integrity_failures",
                                "Store values refused by the cluster tier's checks (header, key, CRC32C)"),
    "tier_demoted_blocks": ("vllm:pykvshm_tier_demoted_blocks",
                            "Pool blocks the cluster tier's demoter copied into the store"),
    "tier_demote_failed_blocks": ("vllm:pykvshm_tier_demote_failed_blocks",
                                  "Pool blocks whose demotion to the store failed"),
}

# Tier.stats() key -> our key (the scheduler reports what its tier client counted since its last report).
TIER_COUNTERS: dict[str, str] = {
    "promoted": "tier_promoted_blocks",
    "promote_misses": "tier_promote_misses",
    "integrity_failures": "tier_integrity_failures",
    "demoted": "tier_demoted_blocks",
    "demote_failed": "tier_demote_failed_blocks",
}


def zero() -> dict[str, float]:
    return {k: 0 for k in COUNTERS}


@dataclass
class PykvshmStats(KVConnectorStats):
    """Counters since the last report; ``data`` maps every key of `COUNTERS` to a number."""

    def __post_init__(self) -> None:
        full = zero()
        for k, v in (self.data or {}).items():
            if k in full and isinstance(v, (int, float)) and not isinstance(v, bool):
                full[k] = v
        self.data = full

    def reset(self) -> None:
        self.data = zero()

    def add(self, key: str, value: float) -> None:
        self.data[key] += value

    def aggregate(self, other: KVConnectorStats) -> "PykvshmStats":
        for k, v in other.data.items():
            if k in self.data:
                self.data[k] += v
        return self

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.data.items()}
        return out

    def is_empty(self) -> bool:
        return not any(self.data.values())

    def take(self) -> "PykvshmStats | None":
        """A copy of the counters, then zero them; None when nothing was counted."""
        if self.is_empty():
            return None
        out = PykvshmStats(dict(self.data))
        self.reset()
        return out


class PykvshmPromMetrics(KVConnectorPromMetrics):
    """One Prometheus counter per `COUNTERS` key, labelled per engine like vLLM's own metrics."""

    def __init__(self, vllm_config: Any, metric_types: dict[Any, Any], labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters: dict[str, dict[int, Any]] = {}
        for key, (name, doc) in COUNTERS.items():
            metric = self._counter_cls(name=name, documentation=doc, labelnames=labelnames)
            self._counters[key] = {idx: metric.labels(*values) for idx, values in per_engine_labelvalues.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for key, per_engine in self._counters.items():
            v = transfer_stats_data.get(key, 0)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
                per_engine[engine_idx].inc(v)
