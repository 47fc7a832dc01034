"""Prometheus exporter: a pool's block accounting, counters and members, read at scrape time.

``pykvshm exporter --pool NAME`` serves ``/metrics`` (the Prometheus text format) from a read-only
attach (``Pool.open(name, read_only=True)``): it takes no member slot, writes nothing to the pool,
and needs only read permission on the pool file. Every figure is read from the pool when Prometheus
scrapes, by a custom collector; nothing is cached between scrapes except the high-water marks that
keep counters monotonic (below). Needs ``prometheus_client`` (``pip install 'pykvshm[ops]'``).

Only what the pool itself counts is exported (docs/design/monitoring.md lists every metric and
where it comes from); per-process figures such as the noncoherent lock's acquisitions live in each
pool handle, not in the pool, and are not visible to a monitor.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator, Sequence
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from . import _core
from .errors import PoolError
from .pool import Pool

__all__ = ["PoolCollector", "COUNTERS", "serve"]

# stats() key -> (metric name without the _total suffix, help text).  All are totals over the pool's
# life: members that detached or were recovered have their counts folded into the pool's own.
COUNTERS: dict[str, tuple[str, str]] = {
    "hits": ("pykvshm_prefix_hits", "Blocks found (and pinned) by acquire"),
    "misses": ("pykvshm_prefix_misses", "Blocks asked for by acquire and not found"),
    "evictions": ("pykvshm_evictions", "Sealed blocks evicted to make room"),
    "bytes_in": ("pykvshm_bytes_in", "Bytes published into the pool"),
    "bytes_out": ("pykvshm_bytes_out", "Bytes copied out of the pool by copy_to"),
    "published": ("pykvshm_blocks_published", "Blocks newly sealed into the prefix index"),
    "duplicates": ("pykvshm_publish_duplicates", "Blocks skipped by publish because their key was present"),
    "allocs": ("pykvshm_block_allocs", "Blocks allocated (free or evicted)"),
    "index_full": ("pykvshm_index_full", "Keys not stored because their index neighbourhood was full"),
    "checksum_errors": ("pykvshm_checksum_errors", "Blocks whose bytes did not match their checksum on acquire"),
    "recovered_members": ("pykvshm_members_recovered", "Member slots recovered after their process died"),
    "pins_refused": ("pykvshm_pins_refused", "Pins refused for want of a free pin record (seen as misses)"),
    "lock_waits": ("pykvshm_lock_waits", "Noncoherent lock acquisitions (pool-wide or one shard) that found the lock held"),
    "tier_demoted": ("pykvshm_tier_demoted_blocks", "Blocks the cluster tier stored in its store (demotions)"),
    "tier_promoted": ("pykvshm_tier_promoted_blocks", "Blocks the cluster tier promoted from its store into the pool"),
    "tier_integrity_failures": ("pykvshm_tier_integrity_failures",
                                "Blocks fetched from the cluster tier's store and refused (key, geometry or checksum)"),
}

BLOCK_STATES = ("free", "writing", "sealed", "evicting")


class _Watched:
    """One pool the exporter watches: a read-only handle, reopened when the pool file is replaced."""

    def __init__(self, name: str, lease: float) -> None:
        self.name = name
        self.path = Pool.path_for(name)
        self.lease = lease
        self.pool: Pool | None = None
        self.file_id: tuple[int, int] | None = None
        self.high: dict[str, int] = {}  # counter high-water marks for the pool with uuid high_uuid
        self.high_uuid = ""

    def _file_id(self) -> tuple[int, int]:
        st = os.stat(self.path)
        return (st.st_dev, st.st_ino)

    def open(self) -> Pool:
        """The handle for the pool that is at ``path`` now (raises PoolError / OSError when none is)."""
        try:
            fid: tuple[int, int] | None = self._file_id()
        except OSError:
            fid = None  # gone: Pool.open below says so precisely
        if self.pool is not None and fid != self.file_id:
            self.close()  # destroyed (and perhaps created again): the old mapping shows a pool nobody uses
        if self.pool is None:
            self.pool = Pool.open(self.name, read_only=True, lease=self.lease)
            self.file_id = fid if fid is not None else self._file_id()
        return self.pool

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        self.pool = None
        self.file_id = None

    def monotonic(self, uuid: str, stats: dict[str, int]) -> dict[str, int]:
        """Counters never go down for one pool (uuid).  A scrape that races a member's detach can
        read the member's counters after they were folded into the pool's totals but the totals
        before: that would look like a counter reset to Prometheus, so report the high-water mark."""
        if uuid != self.high_uuid:
            self.high, self.high_uuid = {}, uuid
        out = {}
        for key in COUNTERS:
            v = max(int(stats.get(key, 0)), self.high.get(key, 0))
            self.high[key] = out[key] = v
        return out


class PoolCollector:
    """A prometheus_client collector for one or more pools; every value is read at scrape time.

    Register it with a ``prometheus_client.CollectorRegistry``; every metric carries a ``pool``
    label. A pool that cannot be read at scrape time (removed, replaced by a foreign file) gives
    ``pykvshm_up{pool=...} 0`` and no other series; it is attached again when it is back.
    """

    def __init__(self, pools: Sequence[str], *, lease: float = 10.0) -> None:
        if not pools:
            raise ValueError("give at least one pool to export")
        self._watched = [_Watched(str(p), lease) for p in dict.fromkeys(pools)]
        self._lock = threading.Lock()  # scrapes may run concurrently (one thread per request)

    def close(self) -> None:
        with self._lock:
            for w in self._watched:
                w.close()

    def check(self) -> None:
        """Open every pool once now, so that a wrong name fails at start-up, not at the first scrape."""
        with self._lock:
            for w in self._watched:
                w.open()

    def describe(self) -> list[Any]:
        return []  # metrics are only known by reading the pools; registration must not read them

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

        up = GaugeMetricFamily("pykvshm_up", "1 when the pool could be read at this scrape, else 0", labels=["pool"])
        info = InfoMetricFamily("pykvshm_pool", "What the pool is: uuid, path, coherence mode, layout version, "
                                "KV geometry", labels=["pool"])
        capacity = GaugeMetricFamily("pykvshm_pool_bytes", "Size of the pool's mapping in bytes", labels=["pool"])
        block_bytes = GaugeMetricFamily("pykvshm_block_bytes", "Bytes of one KV block", labels=["pool"])
        total = GaugeMetricFamily("pykvshm_blocks_capacity", "Data blocks in the pool", labels=["pool"])
        blocks = GaugeMetricFamily("pykvshm_blocks", "Blocks by state (free, writing, sealed, evicting)",
                                   labels=["pool", "state"])
        pinned = GaugeMetricFamily("pykvshm_blocks_pinned", "Blocks pinned by at least one reader (sealed)",
                                   labels=["pool"])
        members = GaugeMetricFamily("pykvshm_members", "Attached pool handles (member slots alive)", labels=["pool"])
        dead = GaugeMetricFamily("pykvshm_members_dead", "Member slots whose process is gone and that no live "
                                 "member has recovered yet", labels=["pool"])
        counters = {key: CounterMetricFamily(name, text, labels=["pool"]) for key, (name, text) in COUNTERS.items()}
        layout_version = str(_core.layout_info()["layout_version"])

        with self._lock:
            for w in self._watched:
                try:
                    pool = w.open()
                    stats = pool.stats()
                    member_list = pool.members()
                except (PoolError, OSError):
                    w.close()
                    up.add_metric([w.name], 0)
                    continue
                up.add_metric([w.name], 1)
                s = pool.spec
                info.add_metric([w.name], {
                    "uuid": pool.uuid, "path": pool.path, "coherence": pool.coherence,
                    "layout_version": layout_version, "checksums": str(pool.checksums).lower(),
                    "num_layers": str(s.num_layers), "num_kv_heads": str(s.num_kv_heads),
                    "head_dim": str(s.head_dim), "block_tokens": str(s.block_tokens), "dtype": s.dtype,
                })
                capacity.add_metric([w.name], pool.total_bytes)
                block_bytes.add_metric([w.name], s.block_bytes)
                total.add_metric([w.name], stats["total"])
                for state in BLOCK_STATES:
                    blocks.add_metric([w.name, state], stats[state])
                pinned.add_metric([w.name], stats["pinned"])
                members.add_metric([w.name], stats["members"])
                dead.add_metric([w.name], sum(1 for m in member_list if not m["alive"]))
                for key, value in w.monotonic(pool.uuid, stats).items():
                    counters[key].add_metric([w.name], value)
        yield from (up, info, capacity, block_bytes, total, blocks, pinned, members, dead, *counters.values())


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


def serve(pools: Sequence[str], host: str = "127.0.0.1", port: int = 9464, *, lease: float = 10.0,
          ready: Any = None) -> None:
    """Serve the metrics of ``pools`` on http://host:port/metrics until interrupted.

    Raises the pool's error when one cannot be opened at start-up. ``ready(url)`` is called once the
    socket listens (``port=0`` picks a free port; the URL names it).
    """
    try:
        from prometheus_client import CollectorRegistry, make_wsgi_app
    except ImportError as e:
        raise ImportError("pykvshm exporter needs prometheus_client: pip install 'pykvshm[ops]'") from e
    collector = PoolCollector(pools, lease=lease)
    try:
        collector.check()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        server = _ThreadingServer6 if ":" in host else _ThreadingServer
        httpd = make_server(host, int(port), make_wsgi_app(registry), server, handler_class=_QuietHandler)
        try:
            bound_host, bound_port = str(httpd.server_address[0]), int(httpd.server_address[1])
            if ready is not None:
                shown = f"[{bound_host}]" if ":" in bound_host else bound_host
                ready(f"http://{shown}:{bound_port}/metrics")
            httpd.serve_forever()
        finally:
            httpd.server_close()
    finally:
        collector.close()
