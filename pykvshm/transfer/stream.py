"""Layer-wise KV transfers through the pool: prefill streams, decode starts before prefill ends.

Producer (prefill worker)::

    with pykvshm.transfer.TransferProducer(pool, "req-42", keys) as tx:
        for layer in range(spec.num_layers):
            kv = run_layer(layer)                  # (len(keys), 2, block_tokens, kv_heads, head_dim)
            tx.put_layer(layer, kv)                # consumers waiting on this layer wake up now
    # leaving the block finishes: the blocks are sealed into the prefix index
    # (an exception aborts: blocks freed, consumers get TransferAbortedError)

Consumer (decode worker, another process; may open before the producer)::

    with pykvshm.transfer.TransferConsumer(pool, "req-42", timeout=10) as rx:
        for layer in range(spec.num_layers):
            rx.read_layer(layer, my_kv[layer])     # waits (futex, no busy polling), then copies

Every wait is bounded by a timeout and ends with the data, TransferTimeoutError,
TransferAbortedError (either side aborted, or the producer died) or TransferGoneError.

The data path (docs/design/transfer.md, "Copies"):

- ``put_layer`` does not copy on the caller's thread: the copy and the layer-ready mark are queued
  on the pool handle's copy engine and run in order; ``finish()`` (or ``wait()``) waits for them.
  The source must stay unchanged until then (``put_layer(..., wait=True)`` copies before returning).
- **Producer in place**: ``tx.layer_views(layer)`` gives writable views of the layer's slots in the
  pool blocks; compute into them, then ``tx.put_layer(layer)`` marks the layer ready without a copy.
- **Consumer in place**: ``rx.layer_views(layer)`` gives read-only views of a ready layer (no copy);
  after using them, ``rx.validate(layer)`` raises if a block was reused meanwhile (the producer
  aborted or died and its blocks were recycled).  After ``finish``, ``rx.acquire()`` pins the blocks.
"""

from __future__ import annotations

import hashlib
import os
import weakref
from typing import Any

import numpy as np

from .._arrays import check_blocks, host_address, is_cuda, is_torch
from .._copy import new_group
from ..errors import ShapeMismatchError
from ..keys import keys_buffer
from ..pool import Lease, Pool, _ViewTracker

__all__ = ["TransferConsumer", "TransferProducer", "request_key"]


def request_key(request_id: str | bytes) -> bytes:
    """The 16-byte key a request id is known by in the pool."""
    raw = request_id.encode() if isinstance(request_id, str) else bytes(request_id)
    return hashlib.blake2b(raw, digest_size=16, person=b"pykvshm.req").digest()


def _host_layer(kv: Any) -> tuple[Any, int, int, Any]:
    """(array, address, per-block stride, keepalive) of a host copy of one layer of every block."""
    if is_cuda(kv):
        kv = kv.cpu()  # the GPU path for streaming goes through a host copy for now
    addr, stride, keep = host_address(kv, writable=False)
    return kv, addr, stride, keep


def _slot_views(pool: Pool, addrs: list[int], writable: bool, anchor: Any) -> list[np.ndarray | None]:
    spec = pool.spec
    layer_bytes = spec.block_bytes // spec.num_layers
    core = pool._live()
    out: list[np.ndarray | None] = []
    for a in addrs:
        if not a:
            out.append(None)
            continue
        buf = core.slot_buffer(int(a), layer_bytes, writable, anchor)
        out.append(np.frombuffer(buf, dtype=spec.np_dtype).reshape(spec.layer_shape))
    return out


class TransferProducer:
    """The producer side of one request's layer-wise transfer."""

    def __init__(self, pool: Pool, request_id: str | bytes, keys: Any) -> None:
        self._pool = pool
        self._kb = keys_buffer(keys)
        self.num_blocks = len(self._kb) // 16
        self._ref = pool._live().transfer_open(request_key(request_id), self._kb)
        self._done = False
        self._pid = os.getpid()
        info = pool._core.transfer_info(*self._ref)
        self.cached_blocks = int(info["cached"])
        self.layers_put = 0
        self._group = new_group()
        self._keep: list[Any] = []       # sources of queued copies, alive until they have run
        self._views = _ViewTracker()
        self._handed: list[weakref.ref[np.ndarray]] = []
        pool._children.add(self)

    def layer_views(self, layer: int) -> list[np.ndarray | None]:
        """Writable zero-copy views of layer ``layer``'s slot in each block, shape ``spec.layer_shape``
        (``None`` for a block already cached in the pool).  Write the layer's KV into them (or let an
        engine compute into them), then call ``put_layer(layer)`` with no data: nothing is copied.
        ``finish()`` and ``abort()`` make these views read-only (the blocks are sealed or freed
        then; reading them afterwards needs a pin: ``pool.acquire(keys)``)."""
        self._check()
        if not 0 <= int(layer) < self._pool.spec.num_layers:
            raise ShapeMismatchError(f"layer {layer} is out of range for a {self._pool.spec.num_layers}-layer pool")
        addrs = self._pool._core.transfer_slots(*self._ref, int(layer), True)
        views = _slot_views(self._pool, addrs, True, self._views.anchor(self))
        self._handed.extend(weakref.ref(v) for v in views if v is not None)
        return views

    def _seal_views(self) -> None:
        # Views handed out by layer_views() become read-only: the blocks are sealed (or freed) now,
        # so a late write raises "assignment destination is read-only" instead of changing
        # published KV.
        for r in self._handed:
            v = r()
            if v is not None:
                v.flags.writeable = False
        self._handed.clear()

    def _check(self) -> None:
        self._pool._live()
        if self._done:
            from ..errors import InvalidHandleError

            raise InvalidHandleError("the transfer has already been finished or aborted")

    def put_layer(self, layer: int, kv: Any = None, *, wait: bool = False) -> None:
        """Write layer ``layer`` of every block and wake the consumers.

        ``kv`` has shape ``(num_blocks, 2, block_tokens, num_kv_heads, head_dim)`` (numpy or torch);
        ``None`` when the layer was written in place through :meth:`layer_views`.  Layers go in order
        0, 1, ...; blocks already cached in the pool are skipped.  The copy runs on the pool handle's
        copy engine, not on this thread: ``kv`` must stay unchanged until :meth:`wait` or
        :meth:`finish` (``wait=True`` copies before returning).  An error of a queued layer (a
        consumer aborted, the pool was closed) is raised by the next call or by :meth:`finish`.
        """
        self._check()
        spec = self._pool.spec
        layer = int(layer)
        self._expect_next(layer)
        if self._group.failed():
            self._raise_failed()
        if kv is None:
            addr, stride, keep = 0, 0, None
        else:
            check_blocks(kv, spec, self.num_blocks, "put_layer data", per_block=spec.layer_shape)
            _, addr, stride, keep = _host_layer(kv)
        try:
            if kv is None and self._group.idle():
                # Nothing to copy and nothing queued: mark it here (no thread hop).
                self._pool._live().transfer_put_layer(*self._ref, layer, 0, 0)
                self.layers_put = layer + 1
                return
            self._pool._live().transfer_put_layer_async(*self._ref, layer, addr, stride, self._group)
            if keep is not None:
                self._keep.append(keep)
            if wait:
                self.wait()
        except Exception:
            self.abort()
            raise
        self.layers_put = layer + 1

    def _expect_next(self, layer: int) -> None:
        """Layers go in order: anything else aborts the transfer and raises."""
        if layer != self.layers_put:
            from ..errors import InvalidHandleError

            self.abort()
            raise InvalidHandleError(f"layers must be put in order: layer {self.layers_put} is next, not layer {layer}")

    def _raise_failed(self) -> None:
        try:
            self._group.wait()
        except Exception:
            self.abort()
            raise

    def wait(self) -> None:
        """Wait until every queued layer is copied and marked ready (raises the first error)."""
        try:
            self._group.wait()
        finally:
            if self._group.idle():
                self._keep.clear()

    def put_layers(self, layers: Any, first: int = 0, finish: bool = False) -> None:
        """Put layers ``first, first+1, ...`` from a layer-major buffer of shape
        ``(count, num_blocks, 2, block_tokens, num_kv_heads, head_dim)`` (C-contiguous numpy) in one call,
        each layer published as soon as it is written; ``finish=True`` finishes the transfer too."""
        spec = self._pool.spec
        if not isinstance(layers, np.ndarray) or not layers.flags.c_contiguous:
            raise ShapeMismatchError("put_layers takes a C-contiguous numpy array")
        if layers.ndim != 6 or tuple(layers.shape[1:]) != (self.num_blocks, *spec.layer_shape) \
                or layers.dtype != spec.np_dtype:
            raise ShapeMismatchError(f"expected (count, {self.num_blocks}, *{spec.layer_shape}) of {spec.np_dtype}, "
                                     f"got {layers.shape} of {layers.dtype}")
        layer_bytes = spec.block_bytes // spec.num_layers
        try:
            self.wait()
            self._pool._live().transfer_put_layers(*self._ref, int(first), int(layers.shape[0]), int(layers.ctypes.data),
                                                   self.num_blocks * layer_bytes, layer_bytes, bool(finish))
        except Exception:
            self.abort()
            raise
        self.layers_put = int(first) + int(layers.shape[0])
        if finish:
            self._done = True

    def mark_layers(self, first: int, count: int, finish: bool = False) -> None:
        """Mark layers ``first .. first+count-1`` ready without copying (they were written in place
        through :meth:`layer_views`), in one call; ``finish=True`` finishes the transfer too."""
        self._check()
        self._expect_next(int(first))
        layer_bytes = self._pool.spec.block_bytes // self._pool.spec.num_layers
        try:
            self.wait()
            if finish:
                self._seal_views()
            self._pool._live().transfer_put_layers(*self._ref, int(first), int(count), 0, 0, layer_bytes, bool(finish))
        except Exception:
            self.abort()
            raise
        self.layers_put = int(first) + int(count)
        if finish:
            self._done = True

    def finish(self) -> None:
        """Wait for the queued layers, seal the blocks into the prefix index and tell consumers the
        transfer is complete."""
        if self._done:
            return
        try:
            self.wait()
            self._seal_views()
            self._pool._live().transfer_finish(*self._ref)
        except Exception:
            self.abort()
            raise
        self._done = True

    def abort(self) -> None:
        """Free the blocks and wake every consumer with TransferAbortedError.  Idempotent.

        Queued copies are waited for first (they write into the blocks being freed)."""
        if self._done:
            return
        self._done = True
        try:
            self._group.wait()
        except Exception:
            pass
        self._keep.clear()
        self._seal_views()
        if not self._pool.closed:
            self._pool._core.transfer_abort(*self._ref)

    def _closed_by_pool(self) -> None:
        self._done = True

    def __enter__(self) -> "TransferProducer":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()

    def __del__(self) -> None:
        try:
            if not self._done and os.getpid() == self._pid:
                self.abort()
        except Exception:
            pass


class TransferConsumer:
    """The consumer side: attach by request id or by the request's block keys, then read layers."""

    def __init__(self, pool: Pool, request_id: str | bytes | None = None, *, keys: Any = None,
                 timeout: float = 30.0) -> None:
        if request_id is None and keys is None:
            raise ValueError("give a request id or the request's block keys")
        self._pool = pool
        self._keys = keys
        self._views = _ViewTracker()
        core = pool._live()
        if request_id is not None:
            self._ref = core.transfer_attach(request_key(request_id), None, 0, float(timeout))
        else:
            kb = keys_buffer(keys)
            self._ref = core.transfer_attach(None, kb[:16], len(kb) // 16, float(timeout))
        info = core.transfer_info(*self._ref)
        pool._children.add(self)
        self.num_blocks = int(info["num_blocks"])
        self.num_layers = int(info["num_layers"])
        self.cached_blocks = int(info["cached"])

    def info(self) -> dict[str, Any]:
        return dict(self._pool._live().transfer_info(*self._ref))

    def wait_layer(self, layer: int, timeout: float = 30.0) -> None:
        """Block (sleeping on a futex in the pool) until layer ``layer`` is ready."""
        self._pool._live().transfer_wait(*self._ref, int(layer), float(timeout))

    def copy_layer(self, layer: int, out: Any) -> Any:
        """Copy ready layer ``layer`` of every block into ``out`` of shape
        ``(num_blocks, 2, block_tokens, num_kv_heads, head_dim)`` (numpy or CPU torch)."""
        spec = self._pool.spec
        check_blocks(out, spec, self.num_blocks, "copy_layer destination", per_block=spec.layer_shape)
        if is_cuda(out):
            host = np.empty((self.num_blocks, *spec.layer_shape), dtype=spec.np_dtype)
            self.copy_layer(layer, host)
            import torch

            out.copy_(torch.from_numpy(host).view(out.dtype) if is_torch(out) else host)
            return out
        addr, stride, keep = host_address(out, writable=True)
        self._pool._live().transfer_copy_layer(*self._ref, int(layer), addr, stride)
        del keep
        return out

    def layer_views(self, layer: int, timeout: float | None = None) -> list[np.ndarray]:
        """Read-only zero-copy views of layer ``layer`` in each block (shape ``spec.layer_shape``),
        after waiting for it when ``timeout`` is given.  The blocks are not pinned while the transfer
        runs: after reading the views, call :meth:`validate` (it raises TransferGoneError or
        TransferAbortedError if a block was reused meanwhile, and the data read must be discarded).
        Once the transfer is finished, :meth:`acquire` pins the blocks instead."""
        if timeout is not None:
            self.wait_layer(layer, timeout)
        info = self._pool._live().transfer_info(*self._ref)
        if info["aborted"]:
            from ..errors import TransferAbortedError

            raise TransferAbortedError("the transfer was aborted")
        if int(info["layers_ready"]) <= int(layer) and not info["done"]:
            raise ShapeMismatchError(f"layer {layer} is not ready yet; wait for it first")
        addrs = self._pool._core.transfer_slots(*self._ref, int(layer), False)
        return [v for v in _slot_views(self._pool, addrs, False, self._views.anchor(self)) if v is not None]

    def validate(self, layer: int) -> None:
        """Check that no block of the transfer was reused since its layer ``layer`` was read in place."""
        self._pool._live().transfer_validate(*self._ref, int(layer))

    def acquire(self) -> Lease:
        """Pin the transfer's blocks (once it is finished) through the prefix index: a Lease whose
        ``views()`` stay valid until it is released."""
        info = self._pool._live().transfer_info(*self._ref)
        if not info["done"]:
            raise ShapeMismatchError("the transfer is not finished yet; acquire() pins sealed blocks")
        if self._keys is None:
            raise ShapeMismatchError("acquire() needs the request's block keys: attach with keys=")
        return self._pool.acquire(self._keys)

    def read_layer(self, layer: int, out: Any, timeout: float = 30.0) -> Any:
        """wait_layer, then copy_layer."""
        self.wait_layer(layer, timeout)
        return self.copy_layer(layer, out)

    def read_all(self, out: Any, timeout: float = 30.0) -> Any:
        """Every layer into ``out`` of shape ``(num_blocks, *block_shape)`` (numpy or CPU torch), each
        layer copied as soon as it is ready, in one call that does not hold the GIL.

        ``timeout`` bounds the wait for each layer."""
        spec = self._pool.spec
        check_blocks(out, spec, self.num_blocks, "read_all destination")
        if is_cuda(out):
            raise ShapeMismatchError("read_all takes a host array; use read_layer for CUDA tensors")
        addr, stride, keep = host_address(out, writable=True)
        layer_bytes = spec.block_bytes // spec.num_layers
        self._pool._live().transfer_read_layers(*self._ref, 0, spec.num_layers, addr, layer_bytes, stride,
                                                float(timeout))
        del keep
        return out

    def read_layers_into(self, layers: Any, first: int = 0, timeout: float = 30.0) -> Any:
        """Layers ``first, first+1, ...`` into a layer-major buffer ``layers`` of shape
        ``(count, num_blocks, 2, block_tokens, num_kv_heads, head_dim)`` (C-contiguous numpy),
        each layer copied as soon as it is ready, in one call that does not hold the GIL."""
        spec = self._pool.spec
        if not isinstance(layers, np.ndarray) or not layers.flags.c_contiguous or not layers.flags.writeable:
            raise ShapeMismatchError("read_layers_into takes a writable C-contiguous numpy array")
        if layers.ndim != 6 or tuple(layers.shape[1:]) != (self.num_blocks, *spec.layer_shape) \
                or layers.dtype != spec.np_dtype or not 0 <= first and first + layers.shape[0] <= spec.num_layers:
            raise ShapeMismatchError(f"expected (count, {self.num_blocks}, *{spec.layer_shape}) of {spec.np_dtype}, "
                                     f"got {layers.shape} of {layers.dtype}")
        layer_bytes = spec.block_bytes // spec.num_layers
        self._pool._live().transfer_read_layers(*self._ref, int(first), int(layers.shape[0]), int(layers.ctypes.data),
                                                self.num_blocks * layer_bytes, layer_bytes, float(timeout))
        return layers

    def abort(self) -> None:
        """Ask the producer to stop: its next put_layer / finish raises and frees the blocks."""
        if not self._pool.closed:
            self._pool._core.transfer_abort(*self._ref)

    def close(self) -> None:
        pass

    def _closed_by_pool(self) -> None:
        pass

    def __enter__(self) -> "TransferConsumer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
