"""The tier's configuration, from one URL.

``mooncake://MASTER_HOST:RPC_PORT?metadata=URL&protocol=tcp&segment=0&buffer=64MiB&host=HOST&device=``

* ``metadata``: Mooncake's metadata service (``http://HOST:PORT/metadata`` for the master's built-in
  HTTP one, ``etcd://...``, or ``P2PHANDSHAKE``); required.
* ``protocol``: ``tcp`` (default) or ``rdma`` (then ``device`` names the RDMA devices).
* ``segment``: memory this client mounts into the store (``0``, the default: store memory is
  mounted by storage processes, so a rack that dies takes no stored block with it).
* ``buffer``: this client's local transfer buffer (default 64 MiB).
* ``host``: the address other store members reach this client at (default: this host's name).
* ``replicas``: copies the store keeps of each demoted block (default 1).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from ..errors import TierConfigError
from ..spec import parse_size

_KNOWN = {"metadata", "protocol", "segment", "buffer", "host", "device", "replicas"}


@dataclass(frozen=True)
class TierConfig:
    master: str
    metadata: str
    protocol: str = "tcp"
    segment: int = 0
    buffer: int = 64 << 20
    host: str = ""
    device: str = ""
    replicas: int = 1

    def local_hostname(self) -> str:
        return self.host or socket.gethostname()


def _size(name: str, v: str) -> int:
    if v.strip() == "0":
        return 0
    try:
        n = parse_size(v)
    except (ValueError, TypeError) as e:
        raise TierConfigError(f"tier URL: {name}={v!r} is not a size ({e})") from None
    if n < 0:
        raise TierConfigError(f"tier URL: {name} must not be negative")
    return n


def parse_url(url: str) -> TierConfig:
    """Parse a tier URL; raises :class:`~pykvshm.errors.TierConfigError` saying what is wrong."""
    if not isinstance(url, str):
        raise TierConfigError(f"a tier URL must be a string, got {type(url).__name__}")
    u = urlsplit(url)
    if u.scheme != "mooncake":
        raise TierConfigError(f"tier URL {url!r}: the scheme must be mooncake:// (the only store supported)")
    try:
        port = u.port
    except ValueError:
        raise TierConfigError(f"tier URL {url!r}: the master's port is not a number") from None
    if not u.hostname or port is None:
        raise TierConfigError(f"tier URL {url!r}: name the master as mooncake://HOST:RPC_PORT")
    try:
        q = parse_qs(u.query, keep_blank_values=True, strict_parsing=bool(u.query))
    except ValueError as e:
        raise TierConfigError(f"tier URL {url!r}: malformed query ({e})") from None
    unknown = set(q) - _KNOWN
    if unknown:
        raise TierConfigError(f"tier URL {url!r}: unknown option(s) {sorted(unknown)}; known: {sorted(_KNOWN)}")
    for k, v in q.items():
        if len(v) != 1:
            raise TierConfigError(f"tier URL {url!r}: option {k} is given {len(v)} times")
    one = {k: v[0] for k, v in q.items()}
    if not one.get("metadata"):
        raise TierConfigError(f"tier URL {url!r}: metadata=<the Mooncake metadata service URL> is required")
    protocol = one.get("protocol", "tcp")
    if protocol not in ("tcp", "rdma"):
        raise TierConfigError(f"tier URL {url!r}: protocol must be tcp or rdma, not {protocol!r}")
    try:
        replicas = int(one.get("replicas", "1"))
    except ValueError:
        raise TierConfigError(f"tier URL {url!r}: replicas must be an integer") from None
    if not 1 <= replicas <= 16:
        raise TierConfigError(f"tier URL {url!r}: replicas must be 1..16")
    buffer = _size("buffer", one.get("buffer", "64MiB"))
    if buffer < (1 << 20):
        raise TierConfigError(f"tier URL {url!r}: buffer must be at least 1 MiB")
    host = u.hostname if ":" not in u.hostname else f"[{u.hostname}]"
    return TierConfig(master=f"{host}:{port}", metadata=one["metadata"], protocol=protocol,
                      segment=_size("segment", one.get("segment", "0")), buffer=buffer,
                      host=one.get("host", ""), device=one.get("device", ""), replicas=replicas)
