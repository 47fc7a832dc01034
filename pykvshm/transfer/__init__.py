"""Moving a request's KV cache from a prefill process to a decode process.

:mod:`pykvshm.transfer.transport` defines the interface every transport implements (producer /
consumer, per-layer send and bounded waits, abort); :mod:`pykvshm.transfer.baselines` holds the
baselines it is compared against (TCP, NIXL/UCX, Mooncake).
"""

from .transport import (
    BackendUnavailableError,
    Consumer,
    Producer,
    TransferAborted,
    TransferTimeout,
    Transport,
    TransportError,
)

__all__ = [
    "BackendUnavailableError",
    "Consumer",
    "Producer",
    "TransferAborted",
    "TransferTimeout",
    "Transport",
    "TransportError",
]
