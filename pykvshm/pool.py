"""The pool: a shared KV block store that several processes map at once."""

from __future__ import annotations

import os
import threading
import uuid as _uuid
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from . import _core
from ._copy import CopyFuture, span_copy
from ._arrays import check_blocks, host_address, is_cuda, is_torch
from .errors import (
    GeometryMismatchError,
    PlacementError,
    PoolClosedError,
    PoolFullError,
    PoolNotFoundError,
    ReadOnlyPoolError,
    ShapeMismatchError,
    ViewsAliveError,
)
from .keys import keys_buffer
from .spec import KVSpec, parse_size

__all__ = ["Pool", "Lease", "Writer", "dax_devices"]

_COHERENCE = {"coherent": 0, "noncoherent": 1}
_COHERENCE_NAMES = {v: k for k, v in _COHERENCE.items()}


class _Anchor:
    """The base object of zero-copy views: alive exactly as long as some view is."""

    __slots__ = ("owner", "__weakref__")

    def __init__(self, owner: Any) -> None:
        self.owner = owner


class _ViewTracker:
    """Hands out one anchor at a time and knows whether views of it are still alive."""

    __slots__ = ("_ref",)

    def __init__(self) -> None:
        self._ref: weakref.ref[_Anchor] | None = None

    def anchor(self, owner: Any) -> _Anchor:
        a = self._ref() if self._ref is not None else None
        if a is None:
            a = _Anchor(owner)
            self._ref = weakref.ref(a)
        return a

    def alive(self) -> bool:
        return self._ref is not None and self._ref() is not None


_KERNELS = {"auto": 0, "memcpy": 1, "stream": 2}


def _engine_options(threads: Any, kernel: Any) -> dict[str, int]:
    if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= 64:
        raise ValueError(f"copy_threads must be an int from 1 to 64, got {threads!r}")
    if kernel not in _KERNELS:
        raise ValueError(f"copy_kernel must be one of {sorted(_KERNELS)}, got {kernel!r}")
    return {"copy_threads": threads, "copy_kernel": _KERNELS[kernel]}


def _with_huge_pages(huge_pages: Any, make: Any) -> tuple[Any, str | None]:
    """Run ``make(huge)`` for ``huge_pages`` True / False / "auto" (try, then fall back to small pages
    with the refusal's text; a refused placement creates nothing, so the retry starts clean)."""
    if huge_pages == "auto":
        try:
            return make(True), None
        except PlacementError as e:
            return make(False), str(e)
    if not isinstance(huge_pages, bool):
        raise ValueError(f"huge_pages must be True, False or 'auto', got {huge_pages!r}")
    return make(huge_pages), None


def _parse_uuid(u: Any) -> _uuid.UUID:
    if isinstance(u, _uuid.UUID):
        return u
    if isinstance(u, (bytes, bytearray)) and len(u) == 16:
        return _uuid.UUID(bytes=bytes(u))
    if isinstance(u, str):
        try:
            return _uuid.UUID(u)
        except ValueError:
            pass
    raise ValueError(f"uuid must be a pool uuid such as '0f8fad5b-d9cb-469f-a165-70867728950e', got {u!r}")


def _numa_maps(address: int) -> dict[str, Any]:
    """The NUMA policy and per-node resident pages of the mapping starting at ``address``."""
    out: dict[str, Any] = {"policy": None, "pages_per_node": {}}
    try:
        with open("/proc/self/numa_maps") as f:
            for line in f:
                fields = line.split()
                if fields and int(fields[0], 16) == address:
                    out["policy"] = fields[1] if len(fields) > 1 else None
                    for fld in fields[2:]:
                        if fld.startswith("N") and "=" in fld and fld[1:fld.index("=")].isdigit():
                            out["pages_per_node"][int(fld[1:fld.index("=")])] = int(fld[fld.index("=") + 1:])
                    break
    except (OSError, ValueError):
        pass
    return out


def dax_devices() -> list[dict[str, Any]]:
    """The device-DAX devices listed in sysfs and what each holds, read without mapping them:
    ``name`` (daxX.Y), ``path``, ``size``, ``uuid`` (of the pykvshm pool on it, or None) and ``note``."""
    out = []
    for d in _core.dax_scan():
        d = dict(d)
        d["uuid"] = None if d["uuid"] is None else str(_uuid.UUID(bytes=bytes(d["uuid"])))
        out.append(d)
    return out


_LAYOUT = _core.layout_info()
DEFAULT_MAX_MEMBERS: int = int(_LAYOUT["default_max_members"])  # member slots of a new pool unless asked otherwise
MIN_MEMBERS: int = int(_LAYOUT["min_members"])
MAX_MEMBERS_LIMIT: int = int(_LAYOUT["max_members_limit"])
_MAX_CAPACITY = 1 << 62  # bytes; far beyond any machine, and no size arithmetic can overflow below it


def _int_option(name: str, value: Any, lo: int, hi: int, what: str) -> int:
    """``value`` as an int in [lo, hi], or a ValueError that says what is expected."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be {what}, got {type(value).__name__} {value!r}")
    v = int(value)
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return v


def _mode_option(mode: Any) -> int:
    m = _int_option("mode", mode, 0, (1 << 32) - 1, "permission bits between 0 and 0o777, such as 0o600")
    if m & ~0o777:
        raise ValueError(f"mode {oct(m)} has bits beyond the permission bits (setuid, setgid or sticky, or more); "
                         f"a pool file takes permission bits only, such as 0o600 or 0o660")
    return m


def _lease_option(lease: Any) -> float:
    try:
        v = float(lease)
    except (TypeError, ValueError):
        raise ValueError(f"lease must be a number of seconds, got {type(lease).__name__} {lease!r}") from None
    if not 0 < v < 1e9:  # also refuses nan and inf
        raise ValueError(f"lease must be a positive, finite number of seconds, got {lease!r}")
    return v


def _placement_options(numa_node: Any, host_id: Any) -> tuple[int, int]:
    node = -1 if numa_node is None else _int_option("numa_node", numa_node, 0, (1 << 31) - 1,
                                                     "a non-negative int (a NUMA node number) or None")
    host = 0 if host_id is None else _int_option("host_id", host_id, 0, (1 << 64) - 1,
                                                  "an int between 0 and 2**64-1 (0 or None: this host's own id)")
    return node, host


def _block_array(buf: Any, spec: KVSpec) -> np.ndarray:
    return np.frombuffer(buf, dtype=np.uint8).view(spec.np_dtype).reshape(spec.block_shape)


class Pool:
    """A handle on a shared KV pool.  One handle = one member of the pool.

    Create a pool with :meth:`create`, attach from any process with :meth:`open`.
    ``name`` is a POSIX shm name (the pool lives in /dev/shm/<name>) or an absolute
    path: a file on tmpfs, hugetlbfs or a DAX filesystem, or a device-DAX
    character device (/dev/daxX.Y).
    """

    def __init__(self, core: Any, name: str) -> None:
        self._pid = os.getpid()
        self._core = core
        self._name = name
        self._block_views: dict[int, _ViewTracker] = {}
        self._huge_refusal: str | None = None
        self._children: weakref.WeakSet[Any] = weakref.WeakSet()
        try:
            self._spec = KVSpec._from_geometry(core.geometry)
        except Exception:
            core.close()
            raise

    # ---- lifecycle ----
    @classmethod
    def create(
        cls,
        name: str,
        spec: KVSpec,
        capacity: int | str = "512MiB",
        *,
        mode: int = 0o600,
        prefault: bool = False,
        huge_pages: bool | str = False,
        numa_node: int | None = None,
        coherence: str = "coherent",
        checksums: bool = False,
        host_id: int | None = None,
        lease: float = 10.0,
        copy_threads: int = 1,
        copy_kernel: str = "auto",
        max_members: int = DEFAULT_MAX_MEMBERS,
        lock_shards: int | None = None,
    ) -> "Pool":
        """Create a pool of ``capacity`` bytes holding blocks of ``spec`` and attach to it.

        ``prefault`` maps every page now (no first-touch cost later); ``huge_pages``
        asks for 2 MiB pages (a hugetlbfs path and device DAX always have them; on
        tmpfs they need transparent huge pages); ``huge_pages="auto"`` takes them where
        the system allows and otherwise falls back to 4 KiB pages, with the reason in
        ``placement["huge_pages_refusal"]``; ``numa_node`` binds the memory to a
        NUMA node (CXL memory is a CPU-less node).  Unavailable placement raises
        :class:`~pykvshm.errors.PlacementError` naming what the machine has.  On
        device DAX (``/dev/daxX.Y``) the pool takes the whole device and ``capacity``
        is ignored.  ``coherence``
        is ``"coherent"`` (one host, or CXL 3.x) or ``"noncoherent"`` (CXL 2.0
        memory shared by several hosts, at most 16: metadata changes then run under
        a pool lock and every line is written back or invalidated, see
        docs/design/coherence.md); ``checksums`` stores a CRC32C per block and
        verifies it on acquire; ``lease`` is the seconds after which a silent member
        of another host is considered dead.  ``copy_threads`` and ``copy_kernel``
        (``"auto"``, ``"memcpy"`` or ``"stream"``: non-temporal stores) configure this
        handle's copy engine (see :meth:`copy_engine_info`).  ``max_members`` is the
        size of the member table (default 4,096; 2 to 65,535): one slot per attached
        handle, one kept spare, so ``max_members - 1`` handles can be attached at once
        (each takes 256 bytes of the pool, plus 16 bytes of pin records).
        ``lock_shards`` (noncoherent pools) splits the pool lock into that many
        block-range locks plus one for the index, so that hosts allocating, publishing and
        acquiring in different shards do not wait for each other: a power of two up to 8 (fewer in small pools: each shard
        needs 64 blocks), 1 for one pool-wide lock, ``None`` for the default (up to 8;
        docs/design/coherence.md, "Lock shards").
        """
        members = _int_option("max_members", max_members, MIN_MEMBERS, MAX_MEMBERS_LIMIT,
                              f"an int between {MIN_MEMBERS} and {MAX_MEMBERS_LIMIT} (member slots)")
        if not isinstance(spec, KVSpec):
            raise TypeError(f"spec must be a pykvshm.KVSpec, got {type(spec).__name__}")
        if coherence not in _COHERENCE:
            raise ValueError(f"coherence must be 'coherent' or 'noncoherent', got {coherence!r}")
        node, host = _placement_options(numa_node, host_id)
        cap = parse_size(capacity)
        shards = 0  # None: the core's default
        if lock_shards is not None:
            shards = _int_option("lock_shards", lock_shards, 1, 8, "None or a power of two from 1 to 8")
            if shards & (shards - 1):
                raise ValueError(f"lock_shards must be a power of two, got {lock_shards}")
            if coherence != "noncoherent" and shards != 1:
                raise ValueError("lock_shards applies to noncoherent pools only (a coherent pool has no lock)")
        if cap > _MAX_CAPACITY:
            raise ValueError(f"capacity {cap} bytes is larger than a pool can be (at most 2**62 bytes)")

        def make(huge: bool) -> Any:
            return _core.Pool.create(
                str(name), spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.block_tokens, spec.dtype_code,
                spec.itemsize, cap, mode=_mode_option(mode), prefault=bool(prefault),
                huge_pages=huge, numa_node=node, coherence=_COHERENCE[coherence], checksums=bool(checksums),
                host_id=host, lease_s=_lease_option(lease), **_engine_options(copy_threads, copy_kernel),
                max_members=members,
                lock_shards=shards,
            )

        core, refusal = _with_huge_pages(huge_pages, make)
        pool = cls(core, str(name))
        pool._huge_refusal = refusal
        return pool

    @classmethod
    def open(
        cls,
        name: str | None = None,
        spec: KVSpec | None = None,
        *,
        uuid: str | _uuid.UUID | None = None,
        prefault: bool = False,
        huge_pages: bool | str = False,
        numa_node: int | None = None,
        host_id: int | None = None,
        lease: float = 10.0,
        copy_threads: int = 1,
        copy_kernel: str = "auto",
        read_only: bool = False,
        allow_foreign: bool = False,
    ) -> "Pool":
        """Attach to an existing pool.  With ``spec``, refuse a pool of another geometry.

        A pool file owned by another user, or writable by its group or by others, raises
        :class:`~pykvshm.errors.UntrustedPoolError` (whoever controls the file can read and
        alter every KV block: another local user may have created the name first);
        ``allow_foreign=True`` attaches anyway, for a pool shared between users on purpose.

        ``read_only=True`` opens a monitor: the pool is validated like any attach, then
        mapped read-only from a read-only file descriptor, and no member slot is taken, so
        a user with read permission on the pool file can watch it (the ownership check does
        not apply: a monitor writes nothing).  :meth:`stats`,
        :meth:`members`, :meth:`check` and the description work; every call that would
        change the pool raises :class:`~pykvshm.errors.ReadOnlyPoolError`.  It takes no
        placement options.  On a ``noncoherent`` pool a monitor cannot take the pool lock:
        it reads each line fresh from memory, and its figures are a best-effort snapshot.

        ``uuid`` without ``name`` finds the pool among the device-DAX devices (the same
        device has different names on different hosts; the uuid in its superblock does
        not change): every ``/dev/daxX.Y`` listed in sysfs is read, never mapped, and the
        one holding that pool is opened.  ``PoolNotFoundError`` lists what was scanned.
        With both, the pool at ``name`` must have that uuid.
        """
        if spec is not None and not isinstance(spec, KVSpec):
            raise TypeError(f"spec must be a pykvshm.KVSpec, got {type(spec).__name__}")
        want = None if uuid is None else _parse_uuid(uuid)
        if name is None:
            if want is None:
                raise TypeError("Pool.open needs a pool name (or path), or uuid= to find it among the device-DAX devices")
            name = str(_core.dax_find_pool(want.bytes))
        expect = None if spec is None else (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.block_tokens,
                                             spec.dtype_code, spec.itemsize)
        node, host = _placement_options(numa_node, host_id)
        refusal: str | None = None
        if read_only:
            if prefault or huge_pages or numa_node is not None:
                raise ValueError("a read-only attach takes no placement options (prefault, huge_pages, numa_node)")
            core = _core.Pool.open_read_only(str(name), host_id=host, lease_s=_lease_option(lease), expect=expect)
        else:
            def attach(huge: bool) -> Any:
                return _core.Pool.open(
                    str(name), prefault=bool(prefault), huge_pages=huge, numa_node=node, host_id=host,
                    lease_s=_lease_option(lease), expect=expect, **_engine_options(copy_threads, copy_kernel),
                    allow_foreign=bool(allow_foreign),
                )

            core, refusal = _with_huge_pages(huge_pages, attach)
        pool = cls(core, str(name))
        pool._huge_refusal = refusal
        if want is not None and pool.uuid != str(want):
            got, path = pool.uuid, pool.path
            pool.close()
            raise PoolNotFoundError(f"the pool at {path} has uuid {got}, not {want}")
        return pool

    @classmethod
    def open_or_create(
        cls,
        name: str,
        spec: KVSpec,
        capacity: int | str = "512MiB",
        *,
        timeout: float = 30.0,
        **options: Any,
    ) -> "Pool":
        """Attach to the pool ``name`` if it exists, else create it; safe when many processes race.

        Every racer ends up attached to the same pool: one creates it, the others
        wait (up to ``timeout`` seconds) while the creator initialises it.  An
        existing pool of another geometry raises ``GeometryMismatchError``.
        ``options`` are :meth:`create`'s keyword arguments (``prefault``,
        ``huge_pages``, ``numa_node``, ``coherence``, ...); the ones :meth:`open`
        also takes apply when attaching, and ``allow_foreign`` only there.
        """
        import time

        from .errors import PoolExistsError, PoolInitializingError, PoolNotFoundError

        open_opts = {k: v for k, v in options.items()
                     if k in ("prefault", "huge_pages", "numa_node", "host_id", "lease", "copy_threads", "copy_kernel",
                              "allow_foreign")}
        options.pop("allow_foreign", None)  # attaching only: a pool this call creates is its caller's own
        deadline = time.monotonic() + timeout
        while True:
            try:
                return cls.open(name, spec, **open_opts)
            except PoolNotFoundError:
                try:
                    return cls.create(name, spec, capacity, **options)
                except PoolExistsError:
                    pass  # another process won the race; attach to its pool
            except PoolInitializingError as e:
                # A creator is still at work on it (the core sees the creator's lock on the
                # file; a file left unfinished by a dead creator is CorruptPoolError at once).
                if time.monotonic() > deadline:
                    raise e
            if time.monotonic() > deadline:
                raise PoolInitializingError(f"pool '{name}' did not become ready within {timeout} s")
            time.sleep(0.02)

    @staticmethod
    def destroy(name: str) -> None:
        """Remove a pool's backing store.  Processes that have it mapped keep their mapping."""
        _core.Pool.destroy(str(name))

    @staticmethod
    def path_for(name: str) -> str:
        """Where the pool called ``name`` lives."""
        return str(_core.Pool.path_for(str(name)))

    def close(self) -> None:
        """Release every pin, abort unfinished writes, leave the pool and unmap it.

        Raises :class:`ViewsAliveError` while zero-copy views of this handle exist
        (they would point at unmapped memory).
        """
        core = self._core
        if core.closed:
            return
        # Refuse new calls first (other threads' calls now raise PoolClosedError), so that no
        # view can appear between the check below and the unmap; core.close() waits for the
        # calls in flight (which run without the GIL) before it unmaps.
        core.shut_calls()
        if any(t.alive() for t in self._block_views.values()) or any(c._views.alive() for c in list(self._children)):
            core.reopen_calls()
            raise ViewsAliveError("zero-copy views of this pool are still alive; delete them before close()")
        for child in list(self._children):
            child._closed_by_pool()
        core.close()

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        core = getattr(self, "_core", None)
        if core is not None and not core.closed and os.getpid() == self._pid:
            try:
                self.close()
            except Exception:
                pass

    def __repr__(self) -> str:
        state = "closed" if self._core.closed else f"{self.num_blocks} blocks"
        ro = " read-only" if self.read_only else ""
        return f"<pykvshm.Pool {self._name!r} {self._spec} {state}{ro}>"

    # ---- description ----
    @property
    def name(self) -> str:
        return self._name

    @property
    def spec(self) -> KVSpec:
        return self._spec

    @property
    def num_blocks(self) -> int:
        return int(self._core.num_blocks)

    @property
    def path(self) -> str:
        return str(self._core.path)

    @property
    def uuid(self) -> str:
        u = bytes(self._core.uuid).hex()
        return f"{u[:8]}-{u[8:12]}-{u[12:16]}-{u[16:20]}-{u[20:]}"

    @property
    def placement(self) -> dict[str, Any]:
        """Where this handle's mapping lives: ``backend`` (shm, file, devdax), ``page_size``,
        ``huge_pages``, ``numa_node`` (bound by this handle, or None), ``device_node`` (device
        DAX: the node of its memory per sysfs, or None), ``prefault``, and from
        /proc/self/numa_maps the kernel's ``policy`` for the mapping (e.g. ``bind:0``, shared
        with every process on shm) and ``pages_per_node`` resident in this process."""
        p = dict(self._live().placement)
        for k in ("numa_node", "device_node"):
            p[k] = None if p[k] < 0 else int(p[k])
        p["huge_pages_refusal"] = None
        if int(p.get("page_size") or 0) < (2 << 20):
            # Why this mapping is on small pages: the refusal a huge_pages="auto" open fell back
            # from, else what the system would say to a request for transparent huge pages.
            why = self._huge_refusal
            if why is None and p.get("backend") != "devdax":
                why = str(_core.transparent_huge_pages_refusal(self.path)) or \
                    "2 MiB pages were not requested (huge_pages=False)"
            p["huge_pages_refusal"] = why
        p.update(_numa_maps(int(self._core.address)))
        return p

    @property
    def coherence(self) -> str:
        return _COHERENCE_NAMES[int(self._core.coherence)]

    @property
    def lock_shards(self) -> int:
        """Lock shards of a noncoherent pool (1: one pool-wide lock; always 1 when coherent)."""
        return int(self._core.lock_shards)

    @property
    def checksums(self) -> bool:
        return bool(self._core.block_checksums)

    @property
    def max_members(self) -> int:
        """Member slots of the pool's table (set at creation); ``max_members - 1`` handles can be attached at once."""
        return int(self._core.max_members)

    @property
    def closed(self) -> bool:
        return bool(self._core.closed)

    @property
    def read_only(self) -> bool:
        """Whether this handle is a read-only monitor (``Pool.open(..., read_only=True)``)."""
        return bool(self._core.read_only)

    @property
    def total_bytes(self) -> int:
        return int(self._core.total_bytes)

    def copy_engine_info(self) -> dict[str, Any]:
        """This handle's copy engine: ``threads``, ``kernel``, ``stream_threshold`` (bytes from which
        ``auto`` uses non-temporal stores), ``jobs_done`` and ``bytes_done`` (asynchronous jobs)."""
        return dict(self._live().copy_engine_info())

    def _live(self) -> Any:
        if self._core.closed:
            raise PoolClosedError(f"pool '{self._name}' handle is closed")
        return self._core

    def _writable(self, what: str) -> Any:
        """The core handle, for a call that changes the pool (refused on a read-only handle)."""
        core = self._live()
        if core.read_only:
            raise ReadOnlyPoolError(f"{what}: pool '{self._name}' is open read-only (a monitor); "
                                    f"open it without read_only=True to change it")
        return core

    # ---- allocator ----
    def alloc(self, n: int, *, evict: bool = True) -> np.ndarray:
        """Allocate ``n`` blocks, all or nothing; returns their handles (uint64).

        Evicts sealed, unpinned blocks when no block is free (unless ``evict=False``);
        raises :class:`~pykvshm.errors.PoolFullError` when even that cannot make room.
        """
        n = _int_option("n", n, 0, 1 << 64, "a number of blocks (an int >= 0)")
        core = self._writable("alloc")
        if n > self.num_blocks:
            raise PoolFullError(f"asked for {n} blocks but the pool has only {self.num_blocks}")
        return core.alloc(n, bool(evict))

    def free(self, handles: Iterable[int] | np.ndarray) -> None:
        """Free blocks this handle allocated (and has not sealed)."""
        h = np.ascontiguousarray(np.asarray(handles, dtype=np.uint64).reshape(-1))
        for x in h.tolist():
            t = self._block_views.get(x)
            if t is not None and t.alive():
                raise ViewsAliveError(f"views of block handle {x} are still alive; delete them before free()")
        self._writable("free").free(h)
        for x in h.tolist():
            self._block_views.pop(x, None)

    def block_view(self, handle: int) -> np.ndarray:
        """A writable zero-copy view (``spec.block_shape``) of a block this handle allocated."""
        core = self._writable("block_view")
        h = int(handle)
        tracker = self._block_views.setdefault(h, _ViewTracker())
        buf = core.block_buffer(h, True, tracker.anchor(self))
        return _block_array(buf, self._spec)

    # ---- the prefix index ----
    def match(self, keys: Iterable[Any] | np.ndarray) -> int:
        """Number of leading ``keys`` whose blocks are in the pool (sealed)."""
        return int(self._writable("match").match(keys_buffer(keys)))

    def publish(self, keys: Iterable[Any] | np.ndarray, data: Any) -> int:
        """Store one block per key; ``data`` is ``(len(keys), *spec.block_shape)`` numpy or torch (CPU or CUDA).

        Keys already present are skipped.  Returns how many blocks were newly stored.
        A block becomes visible to readers only after all its bytes are written.
        """
        core = self._writable("publish")
        kb = keys_buffer(keys)
        n = len(kb) // 16
        check_blocks(data, self._spec, n, "publish data")
        if n == 0:
            return 0
        if is_cuda(data):
            with self._writer(kb) as w:
                w._copy_from_device(data)
            return len(w)
        addr, stride, keep = host_address(data, writable=False)
        stored = int(core.publish(kb, addr, stride))
        del keep
        return stored

    def acquire(self, keys: Iterable[Any] | np.ndarray) -> "Lease":
        """Pin the longest present prefix of ``keys``; returns a :class:`Lease` on it (possibly empty)."""
        core = self._writable("acquire")
        handles = core.acquire(keys_buffer(keys))
        lease = Lease(self, handles)
        self._children.add(lease)
        return lease

    def writer(self, keys: Iterable[Any] | np.ndarray) -> "Writer":
        """Reserve blocks for the keys not yet present, to be filled and then committed."""
        return self._writer(keys_buffer(keys))

    def _writer(self, kb: bytes) -> "Writer":
        core = self._writable("writer")
        positions, handles = core.reserve(kb)
        w = Writer(self, positions, handles)
        self._children.add(w)
        return w

    # ---- the cluster tier ----
    def tier(self, url: Any, **options: Any) -> Any:
        """The cluster tier of this handle: a :class:`pykvshm.tier.Tier` on the Mooncake Store at
        ``url`` (``mooncake://MASTER:PORT?metadata=...``; see :mod:`pykvshm.tier.config`).  It demotes
        this pool's next eviction victims into the store in the background and promotes a missing
        prefix back on request (``tier.promote(keys)``).  Close it before the pool (or use ``with``).
        Needs ``pip install 'pykvshm[tier]'``."""
        from .tier import Tier

        self._writable("tier")
        return Tier(self, url, **options)

    # ---- maintenance ----
    def stats(self) -> dict[str, int]:
        """Block accounting (total, free, writing, sealed, evicting, pinned), members and counters."""
        return dict(self._live().stats())

    def check(self, strict: bool = True, *, checksums: bool = False) -> None:
        """Verify the pool's invariants; raises CorruptPoolError on the first violation.

        ``strict`` checks exact accounting and must be called when no operation is
        in flight in any process; ``strict=False`` checks only what holds at all times.
        ``checksums`` (a pool created with ``checksums=True``) also reads every sealed
        block and compares it with its stored CRC32C, naming the blocks that fail.
        """
        if checksums and not self.checksums:
            raise ValueError("check(checksums=True): the pool was created without block checksums (checksums=True)")
        self._live().check(bool(strict), bool(checksums))

    def recover(self) -> dict[str, int]:
        """Reclaim what dead members held (blocks being written, pins, member slots)."""
        return dict(self._writable("recover").recover())

    def members(self) -> list[dict[str, Any]]:
        """The attached members: slot, pid, host id, heartbeat, liveness."""
        return [dict(m) for m in self._live().members()]


class Lease:
    """Pins on a prefix of blocks; the blocks cannot be evicted or reused until released.

    ``views()`` gives read-only zero-copy numpy views.  A view keeps the lease
    alive, and :meth:`release` refuses (``ViewsAliveError``) while views exist,
    so a view can never silently outlive its pins.
    """

    def __init__(self, pool: Pool, handles: np.ndarray) -> None:
        self._pool = pool
        self._handles = handles
        self._released = False
        self._views = _ViewTracker()
        self._pending: list[CopyFuture] = []
        self._lock = threading.Lock()  # makes release's check-and-set atomic across threads

    def __len__(self) -> int:
        return 0 if self._released else len(self._handles)

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self.views())

    @property
    def handles(self) -> np.ndarray:
        return self._handles.copy()

    @property
    def released(self) -> bool:
        return self._released

    def _check(self) -> Any:
        core = self._pool._live()
        if self._released:
            raise PoolError_released()
        return core

    def views(self) -> list[np.ndarray]:
        """Read-only numpy views, one per block, shape ``spec.block_shape``; no copy."""
        core = self._check()
        anchor = self._views.anchor(self)
        return [_block_array(core.block_buffer(int(h), False, anchor), self._pool.spec) for h in self._handles]

    def copy_to(self, out: Any) -> Any:
        """Copy the leased blocks into ``out`` of shape ``(len(lease), *spec.block_shape)``.

        ``out`` is a numpy array or a torch tensor, on the CPU or on a CUDA device;
        a CUDA copy is one DMA per block straight from the (registered) pool.
        """
        core = self._check()
        spec = self._pool.spec
        check_blocks(out, spec, len(self._handles), "copy_to destination")
        if len(self._handles) == 0:
            return out
        if is_cuda(out):
            from . import _torch

            _torch.ensure_registered(int(core.address), int(core.total_bytes))
            anchor = self._views.anchor(self)
            bufs = [core.block_buffer(int(h), False, anchor) for h in self._handles]
            _torch.copy_blocks_to_device(bufs, out)
            del bufs, anchor
            return out
        addr, stride, keep = host_address(out, writable=True)
        core.copy_out(self._handles, addr, stride)
        del keep
        return out

    def read_spans(self, dst: Any, blocks: Any, block_offsets: Any, dst_offsets: Any, sizes: Any, *,
                   wait: bool = True) -> "CopyFuture | None":
        """Gather: span ``j`` copies ``sizes[j]`` bytes from leased block ``blocks[j]`` (an index into
        this lease) at byte ``block_offsets[j]`` into ``dst`` (a contiguous host numpy array or torch
        tensor, any shape) at byte ``dst_offsets[j]``.  Offsets and sizes may be scalars.

        One call, every span checked first, no GIL.  ``wait=False`` queues the copy on the pool
        handle's copy engine and returns a :class:`~pykvshm.CopyFuture`; :meth:`release` waits for
        it.  This is the entry point an engine's loader uses (one call per layer).
        """
        core = self._check()
        fut = span_copy(core.read_spans, self._handles, dst, True, blocks, block_offsets, dst_offsets, sizes,
                        self._pool.spec.block_bytes, wait, self._forget)
        if fut is not None:
            self._pending.append(fut)
        return fut

    def _forget(self, fut: CopyFuture) -> None:
        try:
            self._pending.remove(fut)
        except ValueError:
            pass

    def wait(self) -> None:
        """Wait for every asynchronous copy of this lease (raises the first error)."""
        for f in list(self._pending):
            f.wait()

    def release(self) -> None:
        """Drop the pins (after waiting for this lease's asynchronous copies).  Idempotent, also when
        several threads release the lease at once (exactly one of them drops the pins)."""
        with self._lock:
            if self._released:
                return
            for f in list(self._pending):
                try:
                    f.wait()
                except Exception:
                    pass
            if self._views.alive():
                raise ViewsAliveError("views of this lease are still alive; delete them before release()")
            self._released = True
        if len(self._handles) and not self._pool._core.closed:
            try:
                self._pool._core.release(self._handles)
            except PoolClosedError:
                pass  # closed meanwhile by another thread: closing dropped every pin

    def _closed_by_pool(self) -> None:
        self._released = True

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            if not self._released and os.getpid() == self._pool._pid:
                self.release()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"<pykvshm.Lease {len(self)} blocks{' released' if self._released else ''}>"


def PoolError_released() -> Exception:
    from .errors import InvalidHandleError

    return InvalidHandleError("the lease has been released")


class Writer:
    """Blocks reserved for keys not yet in the pool, filled in place, then committed.

    ``positions`` are the indices (into the keys given) this writer stores; the
    other keys were already present or being written by someone else.  Use as a
    context manager: leaving the block normally commits, an exception aborts.
    """

    def __init__(self, pool: Pool, positions: np.ndarray, handles: np.ndarray) -> None:
        self._pool = pool
        self._positions = positions
        self._handles = handles
        self._done = False
        self._views = _ViewTracker()
        self._pending: list[CopyFuture] = []

    def __len__(self) -> int:
        return len(self._handles)

    @property
    def positions(self) -> np.ndarray:
        return self._positions.copy()

    @property
    def handles(self) -> np.ndarray:
        return self._handles.copy()

    @property
    def done(self) -> bool:
        return self._done

    def _check(self) -> Any:
        core = self._pool._live()
        if self._done:
            from .errors import InvalidHandleError

            raise InvalidHandleError("the writer has already been committed or aborted")
        return core

    def views(self) -> list[np.ndarray]:
        """Writable zero-copy views of the reserved blocks, shape ``spec.block_shape``."""
        core = self._check()
        anchor = self._views.anchor(self)
        return [_block_array(core.block_buffer(int(h), True, anchor), self._pool.spec) for h in self._handles]

    def write_layer(self, layer: int, kv: Any) -> None:
        """Write layer ``layer`` of every reserved block from ``kv`` of shape
        ``(len(writer), 2, block_tokens, num_kv_heads, head_dim)`` (numpy or torch)."""
        core = self._check()
        spec = self._pool.spec
        if not 0 <= int(layer) < spec.num_layers:
            raise ShapeMismatchError(f"layer {layer} is out of range for a {spec.num_layers}-layer pool")
        check_blocks(kv, spec, len(self._handles), "write_layer data", per_block=spec.layer_shape)
        layer_bytes = spec.block_bytes // spec.num_layers
        n = len(self._handles)
        if not is_cuda(kv):
            # Host data: one batched scatter through the copy engine.
            src = kv.contiguous() if is_torch(kv) else np.ascontiguousarray(kv)
            self.write_spans(src, np.arange(n), int(layer) * layer_bytes, np.arange(n) * layer_bytes, layer_bytes)
            return
        from . import _torch
        import torch

        _torch.ensure_registered(int(core.address), int(core.total_bytes))
        anchor = self._views.anchor(self)
        bufs = [core.block_buffer(int(h), True, anchor) for h in self._handles]
        src_dev = kv.reshape(n, -1).view(torch.uint8)
        for j, b in enumerate(bufs):
            _torch.host_block_tensor(b)[int(layer) * layer_bytes : (int(layer) + 1) * layer_bytes].copy_(
                src_dev[j], non_blocking=True)
        torch.cuda.current_stream(kv.device).synchronize()
        del bufs, anchor

    def write_spans(self, src: Any, blocks: Any, block_offsets: Any, src_offsets: Any, sizes: Any, *,
                    wait: bool = True) -> "CopyFuture | None":
        """Scatter: span ``j`` copies ``sizes[j]`` bytes from ``src`` (a contiguous host numpy array or
        torch tensor) at byte ``src_offsets[j]`` into reserved block ``blocks[j]`` (an index into this
        writer) at byte ``block_offsets[j]``: one checked call without the GIL, through the copy engine.
        ``wait=False`` queues it and returns a :class:`~pykvshm.CopyFuture` (``src`` must stay unchanged
        until it is done); ``commit()`` and ``abort()`` wait for the writer's queued copies."""
        core = self._check()
        fut = span_copy(core.write_spans, self._handles, src, False, blocks, block_offsets, src_offsets, sizes,
                        self._pool.spec.block_bytes, wait)
        if fut is not None:
            self._pending.append(fut)
        return fut

    def _wait_pending(self, raise_errors: bool) -> None:
        pending, self._pending = self._pending, []
        first: BaseException | None = None
        for f in pending:
            try:
                f.wait()
            except Exception as e:
                first = first or e
        if first is not None and raise_errors:
            raise first

    def write(self, data: Any) -> None:
        """Write whole blocks: ``data`` has shape ``(len(writer), *spec.block_shape)``."""
        self._check()
        check_blocks(data, self._pool.spec, len(self._handles), "write data")
        if is_cuda(data):
            self._copy_from_device(data, rows=list(range(len(self._handles))))
            return
        for j, v in enumerate(self.views()):
            v[...] = data[j] if not is_torch(data) else data[j].numpy()

    def _copy_from_device(self, data: Any, rows: list[int] | None = None) -> None:
        from . import _torch

        core = self._check()
        _torch.ensure_registered(int(core.address), int(core.total_bytes))
        anchor = self._views.anchor(self)
        bufs = [core.block_buffer(int(h), True, anchor) for h in self._handles]
        _torch.copy_device_to_blocks(data, bufs, rows if rows is not None else [int(p) for p in self._positions])
        del bufs, anchor

    def _block_views_alive(self) -> bool:
        """Whether ``pool.block_view(h)`` views of this writer's blocks are alive (they are writable)."""
        views = self._pool._block_views
        return any((t := views.get(int(h))) is not None and t.alive() for h in self._handles)

    def _forget_block_views(self) -> None:
        for h in self._handles:
            self._pool._block_views.pop(int(h), None)

    def commit(self) -> None:
        """Seal the blocks and make them visible in the index."""
        core = self._check()
        if self._views.alive() or self._block_views_alive():
            raise ViewsAliveError("writable views of this writer's blocks are still alive (views() or "
                                  "pool.block_view()); delete them before commit(): a sealed block is immutable")
        self._wait_pending(raise_errors=True)
        core.commit(self._handles)
        self._done = True
        self._forget_block_views()

    def abort(self) -> None:
        """Free the reserved blocks and withdraw their keys.  Idempotent."""
        if self._done:
            return
        if self._views.alive() or self._block_views_alive():
            raise ViewsAliveError("writable views of this writer's blocks are still alive (views() or "
                                  "pool.block_view()); delete them before abort()")
        self._wait_pending(raise_errors=False)
        self._done = True
        if not self._pool._core.closed:
            try:
                self._pool._core.abort(self._handles)
            except PoolClosedError:
                pass  # closed meanwhile by another thread: closing aborted every write
        self._forget_block_views()

    def _closed_by_pool(self) -> None:
        self._done = True

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if self._done:
            return
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def __del__(self) -> None:
        try:
            if not self._done and os.getpid() == self._pool._pid:
                self.abort()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"<pykvshm.Writer {len(self)} blocks{' done' if self._done else ''}>"

