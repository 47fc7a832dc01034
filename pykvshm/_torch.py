"""The GPU path: registering the pool mapping with CUDA once, then DMA straight from/to pool blocks.

Only imported when a CUDA tensor is involved.  With the mapping registered
(cudaHostRegister), a copy between a pool block and device memory is a single
asynchronous DMA from/to the pool, with no staging buffer.
"""

from __future__ import annotations

import threading
from typing import Any

_lock = threading.Lock()
_registered: dict[int, int] = {}  # mapping address -> size


def ensure_registered(address: int, size: int) -> None:
    """cudaHostRegister the mapping once per process; raises with the CUDA error code if it fails."""
    import torch

    with _lock:
        if _registered.get(address) == size:
            return
        cudart = torch.cuda.cudart()
        # cudaHostRegisterPortable (1) | cudaHostRegisterMapped (2): pinned for every CUDA context in
        # the process and mapped into the device address space (PagedGather reads it from kernels).
        err = cudart.cudaHostRegister(address, size, 3)
        code = int(err.value) if hasattr(err, "value") else int(err)
        if code != 0:
            raise RuntimeError(f"cudaHostRegister of the pool mapping ({size} bytes at {address:#x}) failed: CUDA error {code}")
        _registered[address] = size


def unregister(address: int) -> None:
    import torch

    with _lock:
        if _registered.pop(address, None) is not None:
            torch.cuda.cudart().cudaHostUnregister(address)


def host_block_tensor(buffer: Any) -> Any:
    """A uint8 CPU tensor over a pool block (no copy)."""
    import warnings

    import numpy as np
    import torch

    with warnings.catch_warnings():
        # A lease's blocks are read-only views; torch warns that it cannot mark
        # the tensor read-only.  We only ever read from those tensors.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.frombuffer(buffer, dtype=np.uint8))


def copy_blocks_to_device(buffers: list[Any], out: Any) -> None:
    """out[j] <- block j for CUDA tensor ``out``: one async DMA per block, then wait for the stream."""
    import torch

    flat = out.view(out.shape[0], -1).view(torch.uint8)
    for j, buf in enumerate(buffers):
        flat[j].copy_(host_block_tensor(buf), non_blocking=True)
    torch.cuda.current_stream(out.device).synchronize()


def copy_device_to_blocks(src: Any, buffers: list[Any], rows: list[int]) -> None:
    """block j <- src[rows[j]] for CUDA tensor ``src``."""
    import torch

    flat = src.reshape(src.shape[0], -1).view(torch.uint8)
    for buf, r in zip(buffers, rows):
        host_block_tensor(buf).copy_(flat[r], non_blocking=True)
    torch.cuda.current_stream(src.device).synchronize()


def _device_pointer(address: int) -> int:
    """The device address of registered host memory at ``address``: cudaHostGetDevicePointer
    where the CUDA runtime library can be reached, else ``address`` itself (unified virtual
    addressing, which every 64-bit Linux CUDA device that can use host-registered memory at the
    host's address has)."""
    import ctypes

    for name in ("libcudart.so", "libcudart.so.13", "libcudart.so.12"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        ptr = ctypes.c_void_p()
        if lib.cudaHostGetDevicePointer(ctypes.byref(ptr), ctypes.c_void_p(address), 0) == 0 and ptr.value:
            return int(ptr.value)
        break
    return address


def pool_tensor(address: int, size: int, device: Any) -> Any:
    """A flat uint8 tensor over the whole pool mapping on ``device``, no copy.

    CUDA: the mapping must be registered (`ensure_registered`); the tensor is a device view of it
    (``__cuda_array_interface__``), so kernels read and write the pool over the bus, in place.
    CPU: a plain view of the mapping.
    """
    import ctypes

    import numpy as np
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        class _Alias:
            pass

        alias = _Alias()
        alias.__cuda_array_interface__ = {"shape": (size,), "typestr": "|u1",  # type: ignore[attr-defined]
                                          "data": (_device_pointer(address), False), "version": 2}
        return torch.as_tensor(alias, device=device)
    return torch.from_numpy(np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(address)))


class PagedGather:
    """Batched copies between pool blocks and a paged KV cache by row gathers on the cache's device.

    A layer's engine block is ``outer`` chunks of ``inner`` bytes (``chunk i`` of engine block
    ``b`` sits at byte ``(i * num_blocks + b) * inner`` of the layer tensor); its pool layer slot
    holds the chunks back to back.  Both sides are cut into rows of ``unit`` bytes (the greatest
    common divisor of the chunk size, the slot size and the blocks' offsets in the mapping), and
    one layer's transfer is one ``index_select`` + ``index_copy_`` over those rows: on CUDA, one
    pair of kernels per layer reading (or writing) the registered pool straight over the bus,
    instead of one DMA per block; on the CPU the same operations, which is how they are tested
    where there is no GPU.
    """

    def __init__(self, pool_t: Any, base: int, layer_bytes: int, chunks: tuple[int, int, int]) -> None:
        self.pool_t, self.base, self.layer_bytes = pool_t, base, layer_bytes
        self.outer, self.num_blocks, self.inner = chunks

    def plan(self, block_addresses: list[int], block_ids: list[int]) -> tuple[Any, Any, int]:
        """(pool row indices of layer 0, KV row indices, row size) for these blocks, in order."""
        import math

        import torch

        offs = [a - self.base for a in block_addresses]
        unit = math.gcd(self.inner, self.layer_bytes, *offs)
        per = self.inner // unit
        dev = self.pool_t.device
        off = torch.tensor(offs, dtype=torch.int64) // unit                  # [n]
        bid = torch.tensor(block_ids, dtype=torch.int64)
        i = torch.arange(self.outer, dtype=torch.int64)
        r = torch.arange(per, dtype=torch.int64)
        src = (off[:, None, None] + i[None, :, None] * per + r[None, None, :]).reshape(-1)
        dst = ((i[None, :, None] * self.num_blocks + bid[:, None, None]) * per + r[None, None, :]).reshape(-1)
        return src.to(dev), dst.to(dev), unit

    def _rows(self, unit: int) -> Any:
        n = self.pool_t.numel() // unit
        return self.pool_t[: n * unit].view(n, unit)

    def load(self, kv_layer: Any, layer: int, plan: tuple[Any, Any, int]) -> None:
        """Engine blocks <- pool layer slots of layer ``layer`` (queued on the current stream on CUDA)."""
        import torch

        src, dst, unit = plan
        kv_rows = kv_layer.view(torch.uint8).view(-1, unit)
        kv_rows.index_copy_(0, dst, self._rows(unit).index_select(0, src + layer * (self.layer_bytes // unit)))

    def save(self, kv_layer: Any, layer: int, plan: tuple[Any, Any, int]) -> None:
        """Pool layer slots of layer ``layer`` <- engine blocks."""
        import torch

        src, dst, unit = plan
        kv_rows = kv_layer.view(torch.uint8).view(-1, unit)
        self._rows(unit).index_copy_(0, src + layer * (self.layer_bytes // unit), kv_rows.index_select(0, dst))
