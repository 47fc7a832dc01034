"""What the scheduler half tells the worker half each step (pickled across processes)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass
class BlockTransfer:
    """Engine blocks of one request and the pool keys they correspond to, position by position."""

    req_id: str
    block_ids: list[int]
    keys: list[bytes]                  # tensor-parallel rank 0's keys (the only ones at TP=1)
    rank_keys: tuple[list[bytes], ...] = ()  # TP > 1: the keys of ranks 1, 2, ... in order

    def __post_init__(self) -> None:
        for keys in (self.keys, *self.rank_keys):
            if len(self.block_ids) != len(keys):
                raise ValueError(f"request {self.req_id}: {len(self.block_ids)} block ids but {len(keys)} keys")

    def keys_for(self, rank: int) -> list[bytes]:
        """The keys of tensor-parallel rank ``rank``'s shards of these blocks."""
        if rank == 0:
            return self.keys
        if not 0 < rank <= len(self.rank_keys):
            raise ValueError(f"request {self.req_id}: no keys for tensor-parallel rank {rank}")
        return self.rank_keys[rank - 1]


@dataclass
class PykvshmMetadata(KVConnectorMetadata):
    """One step's work: loads run before the forward pass, saves layer by layer during it.

    ``async_loads`` are loads of requests that wait in WAITING_FOR_REMOTE_KVS: the worker starts
    them and reports each request through ``get_finished`` once its blocks have landed, in a
    later step; no forward pass waits for them.
    """

    loads: list[BlockTransfer] = field(default_factory=list)
    saves: list[BlockTransfer] = field(default_factory=list)
    async_loads: list[BlockTransfer] = field(default_factory=list)
