"""Moving a request's KV cache from a prefill process to a decode process.

:mod:`pykvshm.transfer.stream` is the pool's own layer-wise transfer API (TransferProducer /
TransferConsumer); :mod:`pykvshm.transfer.transport` defines the interface every transport
implements (producer / consumer, per-layer send and bounded waits, abort), with the pool as
:class:`PoolTransport` and the baselines it is compared against (TCP, NIXL/UCX, Mooncake) in
:mod:`pykvshm.transfer.baselines`.
"""

from .stream import TransferConsumer, TransferProducer, request_key
from .transport import (
    BackendUnavailableError,
    Consumer,
    Producer,
    TransferAborted,
    TransferTimeout,
    Transport,
    TransportError,
)

from .pool_transport import PoolTransport  # noqa: E402  (needs .transport first)

__all__ = [
    "PoolTransport",
    "TransferConsumer",
    "TransferProducer",
    "request_key",
    "BackendUnavailableError",
    "Consumer",
    "Producer",
    "TransferAborted",
    "TransferTimeout",
    "Transport",
    "TransportError",
]
