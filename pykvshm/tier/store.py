"""The store side of the tier: a thin client over ``mooncake.store.MooncakeDistributedStore``.

It turns Mooncake's return codes into what the tier needs: a put that failed is a demotion
dropped, a get that failed or found nothing is a miss (Mooncake answers ``b''`` for both), an
existence check that failed is "not there".  It never raises for a store that is down; it
raises :class:`~pykvshm.errors.TierUnavailableError` only when the client cannot be made.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Sequence
from urllib.parse import urlsplit

from ..errors import TierUnavailableError
from .config import TierConfig


_SLOW_S = 0.5   # a failed call that took this long looks like an unreachable master
_PROBE_S = 0.25  # connection timeout of the master check while suspect


def _import_store() -> Any:
    try:
        from mooncake.store import MooncakeDistributedStore, ReplicateConfig
    except Exception as e:  # ImportError, or OSError for a missing libibverbs
        raise TierUnavailableError(
            f"the Mooncake Store client cannot be imported ({type(e).__name__}: {e}); install it with "
            "pip install 'pykvshm[tier]' (Debian also needs libibverbs1)") from None
    return MooncakeDistributedStore, ReplicateConfig


def _reachable(host: str, port: int, timeout: float) -> str:
    """'' when a TCP connection to host:port opens within timeout; else why not."""
    try:
        with socket.create_connection((host.strip("[]"), port), timeout=timeout):
            return ""
    except OSError as e:
        return f"{host}:{port} is unreachable ({e})"


def probe(cfg: TierConfig, timeout: float = 3.0) -> None:
    """Fail fast, before the store client's own retries (about 90 s), when the master or an HTTP
    metadata service does not accept connections."""
    host, _, port = cfg.master.rpartition(":")
    why = _reachable(host, int(port), timeout)
    if not why and cfg.metadata.startswith(("http://", "https://")):
        u = urlsplit(cfg.metadata)
        if u.hostname:
            why = _reachable(u.hostname, u.port or (443 if u.scheme == "https" else 80), timeout)
    if why:
        raise TierUnavailableError(f"the Mooncake Store is not reachable: {why} (master {cfg.master}, "
                                   f"metadata {cfg.metadata})")


class MooncakeStore:
    """One Mooncake Store client.  Thread-safe (one call at a time)."""

    def __init__(self, cfg: TierConfig) -> None:
        store_cls, replicate_cls = _import_store()
        probe(cfg)
        self.cfg = cfg
        self._lock = threading.Lock()
        self._store = store_cls()
        rc = self._store.setup(cfg.local_hostname(), cfg.metadata, int(cfg.segment), int(cfg.buffer),
                               cfg.protocol, cfg.device, cfg.master)
        if rc != 0:
            raise TierUnavailableError(f"Mooncake Store setup failed (code {rc}) for master {cfg.master}, "
                                       f"metadata {cfg.metadata}: is mooncake_master running there?")
        host, _, port = cfg.master.rpartition(":")
        self._master = (host, int(port))
        self._suspect = False  # a call failed slowly: probe the master before the next ones
        self._replicate = replicate_cls()
        self._replicate.replica_num = int(cfg.replicas)
        self._closed = False

    def exists(self, keys: Sequence[str]) -> list[bool]:
        """Which keys the store has now (an error counts as absent)."""
        if not keys:
            return []
        with self._lock:
            if not self._usable():
                return [False] * len(keys)
            t0 = time.monotonic()
            r = self._store.batch_is_exist(list(keys))
            ok = len(r) == len(keys) and all(x >= 0 for x in r)
            self._note(ok, t0)
        return [x == 1 for x in r] if ok else [False] * len(keys)

    def put(self, keys: Sequence[str], values: Sequence[Any]) -> list[bool]:
        """Store each value; per key, whether it is in the store now.  Never raises for a store error."""
        if not keys:
            return []
        with self._lock:
            if not self._usable():
                return [False] * len(keys)
            t0 = time.monotonic()
            rc = self._store.put_batch(list(keys), list(values), self._replicate)
            self._note(rc == 0, t0)
            if rc == 0:
                return [True] * len(keys)
            if self._suspect:
                return [False] * len(keys)
            # One code for the whole batch: ask which got in.
            return self.exists_unlocked(keys)

    def exists_unlocked(self, keys: Sequence[str]) -> list[bool]:
        r = self._store.batch_is_exist(list(keys))
        return [x == 1 for x in r] if len(r) == len(keys) else [False] * len(keys)

    def get(self, keys: Sequence[str]) -> list[bytes]:
        """The values (``b''`` for a missing key or a failed read)."""
        if not keys:
            return []
        with self._lock:
            if not self._usable():
                return [b""] * len(keys)
            t0 = time.monotonic()
            r = self._store.get_batch(list(keys))
            ok = len(r) == len(keys)
            self._note(ok and any(len(x) for x in r), t0)
        return list(r) if ok else [b""] * len(keys)

    def remove(self, keys: Sequence[str]) -> None:
        with self._lock:
            if self._usable():
                self._store.batch_remove(list(keys), True)

    def _usable(self) -> bool:
        """Whether to call the store now.  After a call failed slowly (the client's timeouts and
        retries take seconds when the master is gone), each call first checks that the master
        accepts connections, and answers "missing" / "not stored" at once while it does not."""
        self._live()
        if not self._suspect:
            return True
        if _reachable(self._master[0], self._master[1], _PROBE_S):
            return False
        self._suspect = False
        return True

    def _note(self, ok: bool, t0: float) -> None:
        if not ok and time.monotonic() - t0 >= _SLOW_S:
            self._suspect = True

    def _live(self) -> None:
        if self._closed:
            raise TierUnavailableError("the tier's store client is closed")

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._store.close()
