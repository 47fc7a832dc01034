"""What the scheduler half tells the worker half each step (pickled across processes)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass
class BlockTransfer:
    """Engine blocks of one request and the pool keys they correspond to, position by position."""

    req_id: str
    block_ids: list[int]
    keys: list[bytes]

    def __post_init__(self) -> None:
        if len(self.block_ids) != len(self.keys):
            raise ValueError(f"request {self.req_id}: {len(self.block_ids)} block ids but {len(self.keys)} keys")


@dataclass
class PykvshmMetadata(KVConnectorMetadata):
    """One step's work: loads run before the forward pass, saves layer by layer during it."""

    loads: list[BlockTransfer] = field(default_factory=list)
    saves: list[BlockTransfer] = field(default_factory=list)
