"""The tier client of one pool handle: a demoter ahead of eviction and a promoter on misses.

docs/design/tiering.md says what is guaranteed and how it is tested.
"""

from __future__ import annotations

import concurrent.futures
import functools
import queue
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from ..errors import PoolClosedError, PoolError, TierConfigError
from ..keys import keys_buffer
from . import format as fmt
from .config import TierConfig, parse_url
from .store import MooncakeStore

if TYPE_CHECKING:
    from ..pool import Pool

# The tier counters also kept in the pool (the keywords of the core's add_tier_counts).
_POOL_COUNTERS = ("demoted", "promoted", "integrity_failures")
_COUNTERS = ("demoted", "demote_skipped", "demote_failed", "promoted", "promote_misses", "integrity_failures",
             "promote_errors", "lookups")
_RECENT_S = 2.0


def _arr(kb: bytes) -> np.ndarray:
    """Concatenated 16-byte keys as the (n, 16) uint8 array the pool's calls take."""
    return np.frombuffer(kb, dtype=np.uint8).reshape(-1, 16)


def _split(kb: bytes) -> list[bytes]:
    return [kb[i:i + 16] for i in range(0, len(kb), 16)]


class Tier:
    """The cluster tier of one pool handle (see :meth:`pykvshm.Pool.tier`).

    * :meth:`promote` / :meth:`promote_async`: on a pool miss, fetch the keys' continuation from
      the store, verify every value (header, geometry, key, length, CRC32C) and commit the verified
      prefix into the pool; a pool hit never reaches the store.
    * :meth:`demote`: copy the next eviction victims (``pin_victims``) into the store; the
      background demoter (``demoter=True``) does it whenever the pool's free blocks fall under
      ``low_watermark`` of its blocks.  :meth:`demote_keys` copies given keys (write-through).
    * :meth:`lookup`: how many of the keys after ``start`` the store has (one round trip).
    """

    def __init__(self, pool: "Pool", url: str | TierConfig, *, demoter: bool = True, low_watermark: float = 0.125,
                 demote_batch: int = 64, interval: float = 0.05, promote_batch: int = 256) -> None:
        if not 0.0 <= float(low_watermark) <= 1.0:
            raise TierConfigError(f"low_watermark must be in [0, 1], got {low_watermark}")
        if int(demote_batch) < 1 or int(promote_batch) < 1:
            raise TierConfigError("demote_batch and promote_batch must be positive")
        if not float(interval) > 0:
            raise TierConfigError("interval must be positive")
        self.config = url if isinstance(url, TierConfig) else parse_url(url)
        self._pool = pool
        self._spec = pool.spec
        self._ns = fmt.namespace(self._spec)
        self._low = float(low_watermark)
        self._demote_batch = int(demote_batch)
        self._promote_batch = int(promote_batch)
        self._interval = float(interval)
        self._store = MooncakeStore(self.config)
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._count_lock = threading.Lock()
        self._inflight: dict[bytes, concurrent.futures.Future[int]] = {}
        self._demote_lock = threading.Lock()
        # Keys this client stored or saw in the store lately (skips asking again); trusted for
        # _RECENT_S only, since the store evicts and a restarted master forgets.
        self._recent: OrderedDict[bytes, float] = OrderedDict()
        self._stop = threading.Event()
        self._requests: queue.Queue[tuple[bytes, concurrent.futures.Future[int]] | None] = queue.Queue()
        self._promoter = threading.Thread(target=self._promote_loop, name="pykvshm-tier-promoter", daemon=True)
        self._promoter.start()
        self._demoter: threading.Thread | None = None
        if demoter:
            self._demoter = threading.Thread(target=self._demote_loop, name="pykvshm-tier-demoter", daemon=True)
            self._demoter.start()

    # ---- keys ----
    @property
    def namespace(self) -> str:
        return self._ns

    def store_key(self, key: bytes) -> str:
        """The store key of pool key ``key`` (16 bytes)."""
        return fmt.store_key(self._ns, bytes(key))

    def _count(self, name: str, n: int = 1) -> None:
        if n:
            with self._count_lock:
                self._counts[name] += n
            if name in _POOL_COUNTERS:
                # Also in the pool's own counters (this member's slot), where `pykvshm exporter`
                # reads them from a read-only attach, summed over every tier client of the pool.
                counts = dict.fromkeys(_POOL_COUNTERS, 0)
                counts[name] = n
                try:
                    self._pool._writable("tier").add_tier_counts(**counts)
                except PoolClosedError:
                    pass  # the pool was closed under a finishing batch: its local count stays

    def stats(self) -> dict[str, int]:
        with self._count_lock:
            return dict(self._counts)

    # ---- lookup ----
    def lookup(self, keys: Iterable[Any] | np.ndarray, start: int = 0) -> int:
        """How many consecutive keys from ``start`` on the store has now (one round trip)."""
        ks = _split(keys_buffer(keys))[int(start):]
        if not ks:
            return 0
        self._count("lookups")
        have = self._store.exists([self.store_key(k) for k in ks])
        n = 0
        while n < len(have) and have[n]:
            n += 1
        return n

    # ---- promotion ----
    def promote(self, keys: Iterable[Any] | np.ndarray, timeout: float | None = None) -> int:
        """Promote the store's continuation of ``keys`` into the pool and return the pool's prefix
        length after it (``pool.match(keys)``).  Blocks until done."""
        return self.promote_async(keys).result(timeout)

    def promote_async(self, keys: Iterable[Any] | np.ndarray) -> "concurrent.futures.Future[int]":
        """The same without waiting: the promoter thread batches concurrent requests into one store
        read.  The future's result is the pool's prefix length after the promotion."""
        kb = keys_buffer(keys)
        fut: concurrent.futures.Future[int] = concurrent.futures.Future()
        if self._stop.is_set():
            fut.set_exception(PoolClosedError("the tier is closed"))
            return fut
        self._requests.put((kb, fut))
        return fut

    def extend_hit(self, rank_keys: list[list[bytes]], hit: int, wait: float = 0.0) -> int:
        """For an engine's scheduler: the pool holds the first ``hit`` blocks of a request (of every
        tensor-parallel rank's ``rank_keys``); promote what the store has beyond them, waiting at most
        ``wait`` seconds, and return how many leading blocks the pool holds now for every rank.

        With ``wait=0`` it only starts the promotion and returns ``hit``: a later scheduling of the
        request (or the next request with the prefix) finds the blocks in the pool.  A request whose
        promotion is already in flight is not promoted twice.  Never called on a full hit.
        """
        futs = []
        for keys in rank_keys:
            if len(keys) <= hit:
                continue
            kb = keys_buffer(keys)
            started = False
            with self._count_lock:
                fut = self._inflight.get(kb)
                if fut is None:
                    fut = self.promote_async(np.frombuffer(kb, dtype=np.uint8).reshape(-1, 16))
                    self._inflight[kb] = fut
                    started = True
            if started:
                # Outside the lock: a future already done runs the callback right here.
                fut.add_done_callback(functools.partial(self._inflight_done, kb))
            futs.append(fut)
        if not futs:
            return hit
        if wait > 0:
            concurrent.futures.wait(futs, timeout=wait)
        n = min(len(keys) for keys in rank_keys)
        for keys in rank_keys:
            n = min(n, self._pool.match(keys[:n]))
        return max(hit, n)

    def promoting(self, rank_keys: list[list[bytes]]) -> bool:
        """Whether an `extend_hit` promotion of any of these key lists is still in flight."""
        with self._count_lock:
            return any(keys_buffer(keys) in self._inflight for keys in rank_keys)

    def _inflight_done(self, kb: bytes, _fut: Any = None) -> None:
        with self._count_lock:
            self._inflight.pop(kb, None)

    def _promote_loop(self) -> None:
        while True:
            item = self._requests.get()
            if item is None:
                return
            batch = [item]
            nkeys = len(item[0]) // 16
            while nkeys < self._promote_batch:
                try:
                    more = self._requests.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._requests.put(None)  # stop after this batch
                    break
                batch.append(more)
                nkeys += len(more[0]) // 16
            live = [(kb, f) for kb, f in batch if f.set_running_or_notify_cancel()]
            try:
                results = self._promote_batch_now([kb for kb, _ in live])
            except BaseException as e:  # noqa: BLE001 -- handed to the callers
                for _, f in live:
                    f.set_exception(e)
                continue
            for (_, f), r in zip(live, results):
                f.set_result(r)

    def _promote_batch_now(self, requests: list[bytes]) -> list[int]:
        pool = self._pool
        tails: list[tuple[int, list[bytes]]] = []
        wanted: dict[str, None] = {}
        for kb in requests:
            m = pool.match(_arr(kb))
            tail = _split(kb)[m:]
            tails.append((m, tail))
            for k in tail:
                wanted[self.store_key(k)] = None
        names = list(wanted)
        # Reads in chunks of at most half the client's buffer and 16 MiB: a read holds a lease on
        # its objects, and one that outlasts the lease fails whole (Mooncake's LEASE_EXPIRED).
        per = max(1, min(16 << 20, self.config.buffer // 2) // (fmt.HEADER_BYTES + self._spec.block_bytes))
        values: dict[str, bytes] = {}
        for i in range(0, len(names), per):
            chunk = names[i:i + per]
            values.update(zip(chunk, self._store.get(chunk)))
        out = []
        for kb, (m, tail) in zip(requests, tails):
            good: list[bytes] = []
            payloads: list[memoryview] = []
            for k in tail:
                v = values[self.store_key(k)]
                why = fmt.verify(self._spec, k, v)
                if why != fmt.OK:
                    self._count("promote_misses" if why == fmt.MISSING else "integrity_failures")
                    break
                good.append(k)
                payloads.append(memoryview(v)[fmt.HEADER_BYTES:])
            if good:
                self._commit(b"".join(good), payloads)
            out.append(pool.match(_arr(kb)))
        return out

    def _commit(self, kb: bytes, payloads: list[memoryview]) -> None:
        """Write verified payloads into reserved blocks and seal them (the pool's all-or-nothing commit)."""
        try:
            w = self._pool._writer(kb)
        except PoolError:
            self._count("promote_errors")  # pool full of pinned blocks, closed, ...: the caller recomputes
            return
        try:
            views = w.views()
            try:
                for j, pos in enumerate(w.positions):
                    views[j].view(np.uint8).reshape(-1)[:] = np.frombuffer(payloads[int(pos)], dtype=np.uint8)
            finally:
                del views  # no writable view may outlive the commit
            w.commit()
        except BaseException:
            w.abort()
            self._count("promote_errors")
            raise
        self._count("promoted", len(w))

    # ---- demotion ----
    def demote(self, n: int | None = None) -> int:
        """Copy up to ``n`` of the pool's next eviction victims into the store; returns how many
        were newly stored.  The pins last only for the copy out of the pool."""
        core = self._pool._writable("demote")
        with self._demote_lock:
            handles, kb = core.pin_victims(int(n or self._demote_batch))
            if len(handles) == 0:
                return 0
            from ..pool import Lease

            lease = Lease(self._pool, handles)
            self._pool._children.add(lease)
            return self._demote_lease(lease, _split(kb))

    def demote_keys(self, keys: Iterable[Any] | np.ndarray) -> int:
        """Copy the pool's blocks of ``keys`` (its present prefix of them) into the store now."""
        with self._demote_lock:
            kb = keys_buffer(keys)
            lease = self._pool.acquire(_arr(kb))
            return self._demote_lease(lease, _split(kb)[:len(lease)])

    def _demote_lease(self, lease: Any, keys: list[bytes]) -> int:
        try:
            now = time.monotonic()
            todo = [j for j, k in enumerate(keys) if now - self._recent.get(k, -_RECENT_S) >= _RECENT_S]
            self._count("demote_skipped", len(keys) - len(todo))
            names = [self.store_key(keys[j]) for j in todo]
            there = self._store.exists(names)
            for j, t in zip(list(todo), there):
                if t:
                    self._remember(keys[j])
            self._count("demote_skipped", sum(there))
            todo = [j for j, t in zip(todo, there) if not t]
            if not todo:
                return 0
            bb = self._spec.block_bytes
            stage = np.empty((len(todo), fmt.HEADER_BYTES + bb), dtype=np.uint8)
            views = lease.views()
            for row, j in enumerate(todo):
                stage[row, fmt.HEADER_BYTES:] = views[j].view(np.uint8).reshape(-1)
            del views
        finally:
            lease.release()  # the pins last only for the copy
        for row, j in enumerate(todo):
            stage[row, :fmt.HEADER_BYTES] = np.frombuffer(
                fmt.header(self._spec, keys[j], stage[row, fmt.HEADER_BYTES:]), dtype=np.uint8)
        ok = self._store.put([self.store_key(keys[j]) for j in todo], [stage[row] for row in range(len(todo))])
        stored = 0
        for j, good in zip(todo, ok):
            if good:
                self._remember(keys[j])
                stored += 1
        self._count("demoted", stored)
        self._count("demote_failed", len(todo) - stored)
        return stored

    def _remember(self, key: bytes) -> None:
        self._recent[key] = time.monotonic()
        self._recent.move_to_end(key)
        while len(self._recent) > 1 << 16:
            self._recent.popitem(last=False)

    def forget(self) -> None:
        """Forget which keys this client believes are in the store (after a store restart)."""
        with self._demote_lock:
            self._recent.clear()

    def _demote_loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                st = self._pool.stats()
                if st["free"] < self._low * st["total"]:
                    if self.demote() == 0:
                        self._stop.wait(self._interval * 4)
            except PoolClosedError:
                return
            except Exception:  # noqa: BLE001 -- a failed round is retried; the store may be down
                self._count("demote_failed")
                self._stop.wait(self._interval * 4)

    # ---- lifecycle ----
    def close(self) -> None:
        """Stop the threads (finishing the promotions queued) and close the store client."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._requests.put(None)
        self._promoter.join()
        if self._demoter is not None:
            self._demoter.join()
        self._store.close()

    def __enter__(self) -> "Tier":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Tier(pool={self._pool.name!r}, master={self.config.master!r}, namespace={self._ns})"
