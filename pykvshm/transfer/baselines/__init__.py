"""Baseline transports, side by side with the pool: plain TCP, NIXL/UCX, Mooncake.

``TRANSPORTS`` maps a name to its :class:`~pykvshm.transfer.transport.Transport` class. Importing
this package never imports nixl or mooncake; constructing a producer or consumer of a transport
whose package is missing raises :class:`~pykvshm.transfer.transport.BackendUnavailableError`
naming the install command (``Transport.available()`` checks without raising).
"""

from __future__ import annotations

from ..transport import Transport
from .mooncake import MooncakeTransport
from .nixl import NixlTransport
from .tcp import TcpTransport

__all__ = ["TRANSPORTS", "MooncakeTransport", "NixlTransport", "TcpTransport", "get_transport"]

TRANSPORTS: dict[str, type[Transport]] = {
    TcpTransport.name: TcpTransport,
    NixlTransport.name: NixlTransport,
    MooncakeTransport.name: MooncakeTransport,
}


def get_transport(name: str) -> type[Transport]:
    """The transport class registered under ``name`` (``"pool"`` is the pool itself)."""
    if name == "pool":
        from ..pool_transport import PoolTransport

        return PoolTransport
    try:
        return TRANSPORTS[name]
    except KeyError:
        raise KeyError(f"unknown transport {name!r}; known: {', '.join(sorted(TRANSPORTS))}") from None
