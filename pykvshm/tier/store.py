"""The store side of the tier: a thin client over ``mooncake.store.MooncakeDistributedStore``.

It turns Mooncake's return codes into what the tier needs: a put that failed is a demotion
dropped, a get that failed or found nothing is a miss (Mooncake answers ``b''`` for both), an
existence check that failed is "not there".  It never raises for a store that is down; it
raises :class:`~pykvshm.errors.TierUnavailableError` only when the client cannot be made.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

from ..errors import TierUnavailableError
from .config import TierConfig


def _import_store() -> Any:
    try:
        from mooncake.store import MooncakeDistributedStore, ReplicateConfig
    except Exception as e:  # ImportError, or OSError for a missing libibverbs
        raise TierUnavailableError(
            f"the Mooncake Store client cannot be imported ({type(e).__name__}: {e}); install it with "
            "pip install 'pykvshm[tier]' (Debian also needs libibverbs1)") from None
    return MooncakeDistributedStore, ReplicateConfig


class MooncakeStore:
    """One Mooncake Store client.  Thread-safe (one call at a time)."""

    def __init__(self, cfg: TierConfig) -> None:
        store_cls, replicate_cls = _import_store()
        self.cfg = cfg
        self._lock = threading.Lock()
        self._store = store_cls()
        rc = self._store.setup(cfg.local_hostname(), cfg.metadata, int(cfg.segment), int(cfg.buffer),
                               cfg.protocol, cfg.device, cfg.master)
        if rc != 0:
            raise TierUnavailableError(f"Mooncake Store setup failed (code {rc}) for master {cfg.master}, "
                                       f"metadata {cfg.metadata}: is mooncake_master running there?")
        self._replicate = replicate_cls()
        self._replicate.replica_num = int(cfg.replicas)
        self._closed = False

    def exists(self, keys: Sequence[str]) -> list[bool]:
        """Which keys the store has now (an error counts as absent)."""
        if not keys:
            return []
        with self._lock:
            self._live()
            r = self._store.batch_is_exist(list(keys))
        return [x == 1 for x in r] if len(r) == len(keys) else [False] * len(keys)

    def put(self, keys: Sequence[str], values: Sequence[Any]) -> list[bool]:
        """Store each value; per key, whether it is in the store now.  Never raises for a store error."""
        if not keys:
            return []
        with self._lock:
            self._live()
            rc = self._store.put_batch(list(keys), list(values), self._replicate)
            if rc == 0:
                return [True] * len(keys)
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
            self._live()
            r = self._store.get_batch(list(keys))
        return list(r) if len(r) == len(keys) else [b""] * len(keys)

    def remove(self, keys: Sequence[str]) -> None:
        with self._lock:
            self._live()
            self._store.batch_remove(list(keys), True)

    def _live(self) -> None:
        if self._closed:
            raise TierUnavailableError("the tier's store client is closed")

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._store.close()
