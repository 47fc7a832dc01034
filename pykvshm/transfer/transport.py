"""One transport interface for a KV-cache handoff between two processes.

A *producer* (prefill) holds the KV of a request in a contiguous numpy buffer; a *consumer*
(decode) holds a destination buffer of the same size. The buffer of a request is layer-major:
``num_layers`` equal slices, layer ``l`` being bytes ``[l * layer_bytes, (l + 1) * layer_bytes)``.
The producer sends one layer (``send_layer``) or the whole request (``send``); the consumer waits
until a layer (``wait_layer``) or the whole request (``wait``) is in *its* buffer. Every wait is
bounded by a timeout and ends in data, :class:`TransferTimeout` or :class:`TransferAborted`.

Lifecycle, identical for every implementation::

    # each process
    side = Transport.producer(**options)      # or Transport.consumer(**options)
    blob = side.metadata()                    # opaque bytes; hand them to the peer out of band
    side.connect(peer_blob, timeout=10)       # both sides call it; it may wait for the peer
    side.register(request_id, buf, num_layers)
    # producer                                # consumer
    side.prepare(request_id)   # optional: per-request setup ahead of the first send
    side.send_layer(request_id, l)            side.wait_layer(request_id, l, timeout=5)
    side.send(request_id)                     side.wait(request_id, timeout=5)
    side.release(request_id)                  side.release(request_id)
    side.close()                              side.close()

Implementations differ in how bytes move (sockets, RDMA/CMA writes through NIXL or Mooncake, or
shared-memory pool blocks flagged ready and waited on with a futex) but not in what the caller
sees. A write-into-peer transport (NIXL, Mooncake) needs the consumer's destination address, so
its ``send_layer`` may wait (within its timeout) until the consumer has registered the request; a
pool transport does not need to. Neither side may assume the other registered first.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import numpy as np

__all__ = [
    "BackendUnavailableError",
    "BookConsumer",
    "Consumer",
    "LayerBook",
    "Producer",
    "TransferAborted",
    "TransferTimeout",
    "Transport",
    "TransportError",
    "check_buffer",
]

DEFAULT_TIMEOUT = 30.0


class TransportError(RuntimeError):
    """A transfer failed: the peer is gone, the backend reported an error, or misuse."""


class TransferTimeout(TransportError, TimeoutError):
    """A bounded wait ran out before the data (or the peer) arrived."""


class TransferAborted(TransportError):
    """The request was aborted by this side or by the peer; ``reason`` says why."""

    def __init__(self, request_id: str, reason: str = "", *, by_peer: bool = False) -> None:
        who = "peer" if by_peer else "local side"
        super().__init__(f"request {request_id!r} aborted by {who}: {reason or 'no reason given'}")
        self.request_id = request_id
        self.reason = reason
        self.by_peer = by_peer


class BackendUnavailableError(ImportError):
    """The optional package behind a transport is missing; the message names the install command."""


def check_buffer(buf: np.ndarray, num_layers: int) -> int:
    """Validate a request buffer and return ``layer_bytes``.

    The buffer must be a C-contiguous, writable numpy array whose size in bytes is a positive
    multiple of ``num_layers``.
    """
    if not isinstance(buf, np.ndarray):
        raise TypeError(f"buffer must be a numpy array, got {type(buf).__name__}")
    if not buf.flags.c_contiguous:
        raise ValueError("buffer must be C-contiguous")
    if not buf.flags.writeable:
        raise ValueError("buffer must be writable")
    if num_layers <= 0:
        raise ValueError(f"num_layers must be positive, got {num_layers}")
    if buf.nbytes == 0 or buf.nbytes % num_layers:
        raise ValueError(f"buffer of {buf.nbytes} bytes does not split into {num_layers} equal layers")
    return buf.nbytes // num_layers


class _Side(ABC):
    """What producer and consumer share: setup, registration, abort, teardown."""

    @abstractmethod
    def metadata(self) -> bytes:
        """Opaque bytes describing this endpoint (agent metadata, address, ...).

        The caller carries them to the peer out of band (a pipe, a queue, an HTTP header) and
        the peer passes them to :meth:`connect`. Valid for the lifetime of this object.
        """

    @abstractmethod
    def connect(self, peer_metadata: bytes, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Connect to the peer described by ``peer_metadata``.

        Both sides call it, in any order; it may block until the peer has called it too, and
        raises :class:`TransferTimeout` if that does not happen within ``timeout`` seconds.
        """

    @abstractmethod
    def register(self, request_id: str, buf: np.ndarray, num_layers: int) -> None:
        """Register ``buf`` (see :func:`check_buffer`) as this side's memory for ``request_id``.

        The producer's buffer is the source, the consumer's the destination; both must have the
        same size and ``num_layers``. The buffer must stay alive and unmoved until
        :meth:`release`. Registering an id twice raises ``ValueError``.
        """

    @abstractmethod
    def abort(self, request_id: str, reason: str = "") -> None:
        """Abort ``request_id`` on both sides, best effort and without blocking for long.

        Local and (once the notice arrives) remote calls on that request raise
        :class:`TransferAborted`; calls already waiting are woken. Idempotent; an unknown id
        is remembered so that a later ``register``/``send``/``wait`` on it fails.
        """

    @abstractmethod
    def release(self, request_id: str) -> None:
        """Forget ``request_id`` and deregister its buffer. Unknown ids are ignored."""

    @abstractmethod
    def close(self) -> None:
        """Release everything and disconnect; pending waits raise :class:`TransportError`."""

    def __enter__(self):  # noqa: D105
        return self

    def __exit__(self, *exc: object) -> None:  # noqa: D105
        self.close()


class Producer(_Side):
    """Sending side: moves layers of a registered source buffer to the consumer."""

    def prepare(self, request_id: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Optionally do the per-request setup ahead of the first send.

        Write-into-peer transports wait here for the consumer's registration of ``request_id``
        and prepare their descriptors, so that ``send_layer`` only moves data (benchmarks call
        it outside the timed span). Sends do it implicitly when it was skipped. Same errors as
        ``send_layer``. The default does nothing.
        """

    @abstractmethod
    def send_layer(self, request_id: str, layer: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Send layer ``layer`` of ``request_id`` and notify the consumer that it is there.

        Returns once the source bytes of that layer may be overwritten. Raises
        :class:`TransferAborted` if either side aborted the request, :class:`TransferTimeout` if
        the consumer did not register the request, or the transfer did not finish, in time.
        """

    @abstractmethod
    def send(self, request_id: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Send every layer of ``request_id`` as one transfer; the consumer sees all layers ready."""


class Consumer(_Side):
    """Receiving side: waits until layers are in its registered destination buffer."""

    @abstractmethod
    def wait_layer(self, request_id: str, layer: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Block until layer ``layer`` of ``request_id`` is in this side's buffer.

        Raises :class:`TransferTimeout` after ``timeout`` seconds, :class:`TransferAborted` if
        either side aborted the request, :class:`TransportError` if the connection broke.
        Layers may be waited on in any order; a layer that has arrived stays arrived.
        """

    @abstractmethod
    def wait(self, request_id: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Block until every layer of ``request_id`` is in this side's buffer (same errors)."""


class BookConsumer(Consumer):
    """A consumer whose arrived layers are tracked in ``self._book`` (a :class:`LayerBook`).

    ``_poll``, when not None, is called while waiting (for transports whose notifications must
    be pumped by the waiting thread).
    """

    _book: "LayerBook"
    _poll: Callable[[], object] | None = None

    def wait_layer(self, request_id: str, layer: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        _, num_layers, _ = self._book.get(request_id)
        self._book.wait_layers(request_id, layer_range(num_layers, layer), timeout, poll=self._poll)

    def wait(self, request_id: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        _, num_layers, _ = self._book.get(request_id)
        self._book.wait_layers(request_id, layer_range(num_layers, None), timeout, poll=self._poll)


class Transport:
    """A named pair of factories; the unit a benchmark or an engine swaps.

    Subclasses set ``name``, ``producer_class`` and ``consumer_class`` (and ``requires``, a
    function that imports the packages they need and raises :class:`BackendUnavailableError`
    without them); keyword options are implementation specific (documented on each
    implementation).
    """

    name: ClassVar[str] = ""
    producer_class: ClassVar[Callable[..., Producer]]
    consumer_class: ClassVar[Callable[..., Consumer]]
    requires: ClassVar[Callable[[], object] | None] = None

    @classmethod
    def available(cls) -> bool:
        """True when the packages this transport needs can be imported here."""
        if cls.requires is None:
            return True
        try:
            cls.requires()
        except ImportError:
            return False
        return True

    @classmethod
    def producer(cls, **options: object) -> Producer:
        return cls.producer_class(**options)

    @classmethod
    def consumer(cls, **options: object) -> Consumer:
        return cls.consumer_class(**options)


class LayerBook:
    """Thread-safe bookkeeping of registered requests, arrived layers and aborts.

    A helper for implementations: one side records arrivals (``mark_ready``) and aborts, and
    waiters block on a condition variable. ``poll`` lets an implementation without a
    background thread drive its own progress (e.g. fetch notifications) while waiting.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.buffers: dict[str, tuple[np.ndarray, int, int]] = {}  # id -> (buf, layers, layer_bytes)
        self.peer: dict[str, object] = {}  # id -> what the peer told about its registration
        self._ready: dict[str, set[int]] = {}
        self._aborted: dict[str, tuple[str, bool]] = {}
        self._broken: str | None = None

    # -- registration ---------------------------------------------------------------------
    def add(self, request_id: str, buf: np.ndarray, num_layers: int) -> int:
        layer_bytes = check_buffer(buf, num_layers)
        with self._cond:
            self._raise_if_failed(request_id)
            if request_id in self.buffers:
                raise ValueError(f"request {request_id!r} is already registered")
            self.buffers[request_id] = (buf, num_layers, layer_bytes)
            self._ready.setdefault(request_id, set())
            self._cond.notify_all()
        return layer_bytes

    def get(self, request_id: str) -> tuple[np.ndarray, int, int]:
        with self._cond:
            self._raise_if_failed(request_id)
            try:
                return self.buffers[request_id]
            except KeyError:
                raise KeyError(f"request {request_id!r} is not registered") from None

    def remove(self, request_id: str) -> tuple[np.ndarray, int, int] | None:
        with self._cond:
            self._ready.pop(request_id, None)
            self._aborted.pop(request_id, None)
            self.peer.pop(request_id, None)
            return self.buffers.pop(request_id, None)

    # -- events ---------------------------------------------------------------------------
    def mark_ready(self, request_id: str, layers: range | list[int]) -> None:
        with self._cond:
            self._ready.setdefault(request_id, set()).update(layers)
            self._cond.notify_all()

    def set_peer(self, request_id: str, info: object) -> None:
        """Record that the peer registered ``request_id`` (with transport specific ``info``)."""
        with self._cond:
            self.peer[request_id] = info
            self._cond.notify_all()

    def mark_aborted(self, request_id: str, reason: str, by_peer: bool) -> bool:
        """Record an abort; returns False if it was already recorded."""
        with self._cond:
            if request_id in self._aborted:
                return False
            self._aborted[request_id] = (reason, by_peer)
            self._cond.notify_all()
            return True

    def mark_broken(self, reason: str) -> None:
        with self._cond:
            if self._broken is None:
                self._broken = reason
            self._cond.notify_all()

    @property
    def broken(self) -> str | None:
        return self._broken

    def _raise_if_failed(self, request_id: str) -> None:
        if request_id in self._aborted:
            reason, by_peer = self._aborted[request_id]
            raise TransferAborted(request_id, reason, by_peer=by_peer)
        if self._broken is not None:
            raise TransportError(f"connection lost: {self._broken}")

    def check(self, request_id: str) -> None:
        """Raise if ``request_id`` was aborted or the connection broke."""
        with self._cond:
            self._raise_if_failed(request_id)

    # -- waiting --------------------------------------------------------------------------
    def wait_until(self, request_id: str, predicate, timeout: float, what: str, poll=None,
                   spin_s: float = 5e-5, poll_interval: float = 2e-5) -> None:
        """Wait until ``predicate()`` (called under the lock) holds.

        Without ``poll`` this sleeps on the condition variable. With ``poll`` (a callable that
        makes progress and records events in this book) it polls back to back for ``spin_s``,
        then sleeps ``poll_interval`` between polls (plus ~50 us of Linux timer slack). Spinning
        longer starves the peer when both share a core, as on a busy 2-core host.
        """
        start = time.monotonic()
        deadline = start + timeout
        while True:
            with self._cond:
                self._raise_if_failed(request_id)
                if predicate():
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransferTimeout(f"timed out after {timeout:g} s waiting for {what}")
                if poll is None:
                    self._cond.wait(left)
                    continue
            poll()
            if time.monotonic() - start > spin_s:
                time.sleep(min(poll_interval, max(left, 0.0)))

    def wait_layers(self, request_id: str, layers: range, timeout: float, poll=None) -> None:
        def done() -> bool:
            have = self._ready.get(request_id, ())
            return request_id in self.buffers and all(layer in have for layer in layers)

        what = f"layer {layers[0]} of {request_id!r}" if len(layers) == 1 else f"request {request_id!r}"
        self.wait_until(request_id, done, timeout, what, poll)

    def wait_peer(self, request_id: str, timeout: float, poll=None) -> object:
        """Wait until the peer registered ``request_id``; return what it told."""
        self.wait_until(request_id, lambda: request_id in self.peer, timeout,
                        f"the peer to register {request_id!r}", poll)
        with self._cond:
            return self.peer[request_id]


def layer_range(num_layers: int, layer: int | None) -> range:
    """All layers (``layer is None``) or the single ``layer``, range-checked."""
    if layer is None:
        return range(num_layers)
    if not 0 <= layer < num_layers:
        raise IndexError(f"layer {layer} out of range for {num_layers} layers")
    return range(layer, layer + 1)
