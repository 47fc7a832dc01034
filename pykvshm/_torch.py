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
        # cudaHostRegisterPortable (1): pinned for every CUDA context in the process.
        err = cudart.cudaHostRegister(address, size, 1)
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
