"""Batched copies through the core's copy engine: span lists against engine buffers, and futures.

A *span* copies ``size`` bytes between a pool block (at a byte offset inside it) and a host buffer
the caller names (at a byte offset inside it).  Every offset and size is checked against both the
block and the buffer before anything is copied, so a wrong span is a ``ShapeMismatchError``, never a
write outside the buffer.  One call copies every span without the GIL; ``wait=False`` queues them on
the pool handle's copy engine and returns a :class:`CopyFuture`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _core
from ._arrays import is_cuda, is_torch
from .errors import ShapeMismatchError


class CopyFuture:
    """Asynchronous copies queued on a pool handle's copy engine.

    :meth:`wait` blocks (without the GIL) until they have run and raises the first error one of them
    hit; the buffers and blocks they touch must stay alive and untouched until then (the future keeps
    the Python objects alive).
    """

    __slots__ = ("_group", "_keep", "_on_done")

    def __init__(self, group: Any, keep: Any, on_done: Any = None) -> None:
        self._group = group
        self._keep = keep
        self._on_done = on_done

    def done(self) -> bool:
        """True once every copy has run (does not raise)."""
        return bool(self._group.idle())

    def wait(self) -> None:
        try:
            self._group.wait()
        finally:
            if self._group.idle():
                self._keep = None
                cb, self._on_done = self._on_done, None
                if cb is not None:
                    cb(self)

    def __repr__(self) -> str:
        return f"<pykvshm.CopyFuture {'done' if self.done() else 'pending'}>"


def new_group() -> Any:
    return _core.CopyGroup()


def buffer_extent(buf: Any, writable: bool) -> tuple[int, int, Any]:
    """(address, size in bytes, keepalive) of a contiguous host numpy array or CPU torch tensor."""
    if is_torch(buf):
        if is_cuda(buf):
            raise ShapeMismatchError("span copies take a host (CPU) buffer; CUDA buffers go through copy_to / "
                                     "put_layer, which DMA from the registered pool")
        if not buf.is_contiguous():
            raise ShapeMismatchError("the span buffer must be a contiguous tensor")
        return int(buf.data_ptr()), int(buf.numel() * buf.element_size()), buf
    if not isinstance(buf, np.ndarray):
        raise TypeError(f"expected a numpy array or a torch tensor, got {type(buf).__name__}")
    if not buf.flags.c_contiguous:
        raise ShapeMismatchError("the span buffer must be a C-contiguous array")
    if writable and not buf.flags.writeable:
        raise ValueError("the destination array is read-only")
    return int(buf.ctypes.data), int(buf.nbytes), buf


def span_columns(count: int, handles: np.ndarray, blocks: Any, block_offsets: Any, buf_offsets: Any, sizes: Any,
                 buf_size: int, block_bytes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validated (handles, block offsets, buffer offsets, sizes) columns for ``count`` blocks of a lease or writer."""
    try:
        b = np.asarray(blocks, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise ShapeMismatchError(f"blocks must be integers: {e}") from None
    n = b.shape[0]
    cols = []
    for name, c in (("block_offsets", block_offsets), ("buffer_offsets", buf_offsets), ("sizes", sizes)):
        try:
            a = np.broadcast_to(np.asarray(c, dtype=np.int64), (n,))
        except (TypeError, ValueError) as e:
            raise ShapeMismatchError(f"{name} must be an integer or {n} integers: {e}") from None
        if n and a.min() < 0:
            raise ShapeMismatchError(f"{name} must not be negative")
        cols.append(np.ascontiguousarray(a))
        del a
    boff, foff, size = cols
    if n:
        if b.min() < 0 or b.max() >= count:
            raise ShapeMismatchError(f"block numbers must be in [0, {count}), got {int(b.min())}..{int(b.max())}")
        if (boff + size).max() > block_bytes:
            j = int(np.argmax(boff + size))
            raise ShapeMismatchError(f"span {j}: {int(size[j])} bytes at offset {int(boff[j])} run past the end of a "
                                     f"{block_bytes}-byte block")
        if (foff + size).max() > buf_size:
            j = int(np.argmax(foff + size))
            raise ShapeMismatchError(f"span {j}: {int(size[j])} bytes at buffer offset {int(foff[j])} run past the "
                                     f"end of the {buf_size}-byte buffer")
    return (np.ascontiguousarray(handles[b]).astype(np.uint64), boff.astype(np.uint64), foff.astype(np.uint64),
            size.astype(np.uint64))


def span_copy(method: Any, handles: np.ndarray, buf: Any, writable: bool, blocks: Any, block_offsets: Any,
              buf_offsets: Any, sizes: Any, block_bytes: int, wait: bool,
              on_done: Any = None) -> CopyFuture | None:
    """Check the spans against the blocks and ``buf``, then run the core's ``read_spans`` or
    ``write_spans`` (``method``): now, or queued when ``wait`` is false (a :class:`CopyFuture` that
    keeps ``buf`` alive until the copy has run)."""
    addr, size, keep = buffer_extent(buf, writable=writable)
    h, boff, foff, sz = span_columns(len(handles), handles, blocks, block_offsets, buf_offsets, sizes, size,
                                     block_bytes)
    addrs = foff + np.uint64(addr)
    if wait:
        method(h, boff, addrs, sz)
        return None
    group = new_group()
    method(h, boff, addrs, sz, group)
    return CopyFuture(group, keep, on_done)
