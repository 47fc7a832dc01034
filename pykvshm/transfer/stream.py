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
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

from .._arrays import check_blocks, host_address, is_cuda, is_torch
from ..errors import ShapeMismatchError
from ..keys import keys_buffer
from ..pool import Pool

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

    def put_layer(self, layer: int, kv: Any) -> None:
        """Write layer ``layer`` of every block and wake the consumers.

        ``kv`` has shape ``(num_blocks, 2, block_tokens, num_kv_heads, head_dim)`` (numpy or torch).
        Layers go in order 0, 1, ...; blocks already cached in the pool are skipped.
        """
        spec = self._pool.spec
        check_blocks(kv, spec, self.num_blocks, "put_layer data", per_block=spec.layer_shape)
        _, addr, stride, keep = _host_layer(kv)
        try:
            self._pool._live().transfer_put_layer(*self._ref, int(layer), addr, stride)
        except Exception:
            self.abort()
            raise
        del keep
        self.layers_put = int(layer) + 1

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
            self._pool._live().transfer_put_layers(*self._ref, int(first), int(layers.shape[0]), int(layers.ctypes.data),
                                                   self.num_blocks * layer_bytes, layer_bytes, bool(finish))
        except Exception:
            self.abort()
            raise
        self.layers_put = int(first) + int(layers.shape[0])
        if finish:
            self._done = True

    def finish(self) -> None:
        """Seal the blocks into the prefix index and tell consumers the transfer is complete."""
        if self._done:
            return
        try:
            self._pool._live().transfer_finish(*self._ref)
        except Exception:
            self.abort()
            raise
        self._done = True

    def abort(self) -> None:
        """Free the blocks and wake every consumer with TransferAbortedError.  Idempotent."""
        if self._done:
            return
        self._done = True
        if not self._pool.closed:
            self._pool._core.transfer_abort(*self._ref)

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
        core = pool._live()
        if request_id is not None:
            self._ref = core.transfer_attach(request_key(request_id), None, 0, float(timeout))
        else:
            kb = keys_buffer(keys)
            self._ref = core.transfer_attach(None, kb[:16], len(kb) // 16, float(timeout))
        info = core.transfer_info(*self._ref)
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

    def __enter__(self) -> "TransferConsumer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
