"""The pool as a :class:`~pykvshm.transfer.transport.Transport`, so benchmarks and engines can swap it
with the baselines.

Both sides open the same pool by name (``pool=...``; the producer creates it when ``create=True``).
The request buffer is layer-major: ``num_layers`` slices, each ``n`` blocks of one layer, i.e. a
numpy array viewable as ``(num_layers, n, 2, block_tokens, num_kv_heads, head_dim)`` of the pool's
dtype.  ``send_layer`` writes that layer into the pool's blocks and wakes the consumer (futex in
the pool); the consumer's ``wait_layer`` sleeps on it and copies the layer into its own buffer.

Two options model engines that work on the pool's memory directly (docs/design/transfer.md):
``producer_in_place=True``: the request's KV is already in the pool's blocks when it is sent (the
producer computed into ``TransferProducer.layer_views``; here ``prepare`` writes it there, outside
the timed span), so ``send`` only marks layers ready.  ``consumer_in_place=True``: ``wait`` returns
once every layer is ready, and the consumer reads the blocks where they are (``layer_views``);
the request buffer is filled from those views only by ``check_in_place`` (for verification).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from ..errors import PoolError, PoolNotFoundError, TransferAbortedError, TransferError, TransferTimeoutError
from ..pool import Pool
from ..spec import KVSpec
from .stream import TransferConsumer, TransferProducer
from .transport import (
    DEFAULT_TIMEOUT,
    Consumer,
    Producer,
    TransferAborted,
    TransferTimeout,
    Transport,
    TransportError,
    check_buffer,
)

__all__ = ["PoolTransport"]


def request_block_keys(request_id: str, n: int) -> list[bytes]:
    """Keys for a request handed over without token ids (distinct per request and block)."""
    return [hashlib.blake2b(f"{request_id}/{i}".encode(), digest_size=16, person=b"pykvshm.tx").digest()
            for i in range(n)]


def _translate(request_id: str, e: Exception) -> Exception:
    if isinstance(e, TransferTimeoutError):
        return TransferTimeout(str(e))
    if isinstance(e, TransferAbortedError):
        return TransferAborted(request_id, str(e), by_peer=True)
    return TransportError(str(e))


class _PoolSide:
    def __init__(self, pool: str, spec: KVSpec | None = None, create: bool = False, capacity: str | int = "1GiB",
                 prefault: bool = False, producer_in_place: bool = False, consumer_in_place: bool = False,
                 **pool_options: Any) -> None:
        self._name = pool
        self.producer_in_place = bool(producer_in_place)
        self.consumer_in_place = bool(consumer_in_place)
        if create:
            if spec is None:
                raise ValueError("creating the pool needs spec=")
            try:
                self._pool = Pool.open(pool, spec=spec, prefault=prefault)
            except PoolNotFoundError:
                self._pool = Pool.create(pool, spec=spec, capacity=capacity, prefault=prefault, **pool_options)
        else:
            self._pool = Pool.open(pool, spec=spec, prefault=prefault)
        self.spec = self._pool.spec
        self._reqs: dict[str, dict[str, Any]] = {}
        self._aborted: set[str] = set()

    @property
    def pool(self) -> Pool:
        return self._pool

    def metadata(self) -> bytes:
        return self._name.encode()

    def connect(self, peer_metadata: bytes, timeout: float = DEFAULT_TIMEOUT) -> None:
        if peer_metadata.decode() != self._name:
            raise TransportError(f"the peer uses pool {peer_metadata.decode()!r}, this side {self._name!r}")

    def register(self, request_id: str, buf: np.ndarray, num_layers: int, keys: list[bytes] | None = None) -> None:
        if request_id in self._reqs:
            raise ValueError(f"request {request_id!r} is already registered")
        check_buffer(buf, num_layers)
        if num_layers != self.spec.num_layers:
            raise ValueError(f"the pool holds {self.spec.num_layers} layers, the request {num_layers}")
        if buf.nbytes % self.spec.block_bytes:
            raise ValueError(f"a request buffer of {buf.nbytes} bytes is not whole blocks of {self.spec.block_bytes}")
        n = buf.nbytes // self.spec.block_bytes
        layers = buf.reshape(-1).view(self.spec.np_dtype).reshape(num_layers, n, *self.spec.layer_shape)
        self._reqs[request_id] = {"layers": layers, "n": n, "keys": keys, "side": None, "done": set()}

    def _req(self, request_id: str) -> dict[str, Any]:
        if request_id in self._aborted:
            raise TransferAborted(request_id, "aborted")
        try:
            return self._reqs[request_id]
        except KeyError:
            raise TransportError(f"request {request_id!r} is not registered") from None

    def release(self, request_id: str) -> None:
        self._reqs.pop(request_id, None)

    def close(self) -> None:
        for rid in list(self._reqs):
            side = self._reqs[rid]["side"]
            if isinstance(side, TransferProducer):
                side.abort()
        self._reqs.clear()
        try:
            self._pool.close()
        except Exception:
            pass


class PoolProducer(_PoolSide, Producer):
    def prepare(self, request_id: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        r = self._req(request_id)
        if r["side"] is None:
            keys = r["keys"] or request_block_keys(request_id, r["n"])
            try:
                opened = TransferProducer(self._pool, request_id, keys)
                r["side"] = opened
                if self.producer_in_place:
                    # What an engine computing into the pool would have done: the KV is in the slots.
                    for layer in range(self.spec.num_layers):
                        views = opened.layer_views(layer)
                        for j, view in enumerate(views):
                            if view is not None:
                                view[...] = r["layers"][layer, j]
                        del views, view
            except PoolError as e:
                raise _translate(request_id, e) from e

    def send_layer(self, request_id: str, layer: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.prepare(request_id, timeout)
        r = self._req(request_id)
        tx: TransferProducer = r["side"]
        try:
            if self.producer_in_place:
                tx.mark_layers(layer, 1, finish=layer == self.spec.num_layers - 1)
                return
            # Queued on the copy engine: this thread goes back to computing the next layer.
            tx.put_layer(layer, r["layers"][layer])
            if layer == self.spec.num_layers - 1:
                tx.finish()
        except PoolError as e:
            raise _translate(request_id, e) from e

    def send(self, request_id: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        # The whole request in one core call: every layer written and flagged, then finished.
        self.prepare(request_id, timeout)
        r = self._req(request_id)
        tx: TransferProducer = r["side"]
        first = tx.layers_put
        try:
            if self.producer_in_place:
                tx.mark_layers(first, self.spec.num_layers - first, finish=True)
                return
            tx.put_layers(r["layers"][first:], first=first, finish=True)
        except PoolError as e:
            raise _translate(request_id, e) from e

    def abort(self, request_id: str, reason: str = "") -> None:
        self._aborted.add(request_id)
        r = self._reqs.get(request_id)
        if r and r["side"] is not None:
            r["side"].abort()


class PoolConsumer(_PoolSide, Consumer):
    def _attach(self, request_id: str, timeout: float) -> TransferConsumer:
        r = self._req(request_id)
        if r["side"] is None:
            try:
                rx = TransferConsumer(self._pool, request_id, timeout=timeout)
            except PoolError as e:
                if isinstance(e, TransferError) and "appeared in time" in str(e):
                    raise TransferTimeout(f"request {request_id!r} did not start within {timeout} s") from e
                raise _translate(request_id, e) from e
            r["side"] = rx
            if rx.num_blocks != r["n"]:
                raise TransportError(f"request {request_id!r} has {rx.num_blocks} blocks, the buffer {r['n']}")
        side: TransferConsumer = r["side"]
        return side

    def wait_layer(self, request_id: str, layer: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        r = self._req(request_id)
        if layer in r["done"]:
            return
        rx = self._attach(request_id, timeout)
        try:
            if self.consumer_in_place:
                rx.wait_layer(layer, timeout)
                r["done"].add(layer)
                return
            rx.read_layers_into(r["layers"][layer : layer + 1], first=layer, timeout=timeout)
        except PoolError as e:
            raise _translate(request_id, e) from e
        r["done"].add(layer)

    def wait(self, request_id: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        r = self._req(request_id)
        first = 0
        while first in r["done"]:
            first += 1
        if first == self.spec.num_layers:
            return
        rx = self._attach(request_id, timeout)
        try:
            if self.consumer_in_place:
                rx.wait_layer(self.spec.num_layers - 1, timeout)  # layers become ready in order
                r["done"].update(range(first, self.spec.num_layers))
                return
            rx.read_layers_into(r["layers"][first:], first=first, timeout=timeout)  # one call, layers as they come
        except PoolError as e:
            raise _translate(request_id, e) from e
        r["done"].update(range(first, self.spec.num_layers))

    def check_in_place(self, request_id: str) -> None:
        """Consumer in place: copy the request's layers from the pool views into its buffer and
        validate them (for checking the data; not part of a handoff)."""
        r = self._req(request_id)
        rx: TransferConsumer = r["side"]
        for layer in range(self.spec.num_layers):
            views = rx.layer_views(layer)
            for j, v in enumerate(views):
                r["layers"][layer, j] = v
            del views
            rx.validate(layer)

    def abort(self, request_id: str, reason: str = "") -> None:
        self._aborted.add(request_id)
        r = self._reqs.get(request_id)
        if r and r["side"] is not None:
            r["side"].abort()


class PoolTransport(Transport):
    """The shared-memory pool.  Options: ``pool`` (name), ``spec``, ``create``, ``capacity``."""

    name = "pool"
    producer_class = PoolProducer
    consumer_class = PoolConsumer
