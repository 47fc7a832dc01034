"""Checking and addressing the arrays users hand us: numpy arrays and torch tensors (CPU or CUDA)."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from .errors import DTypeMismatchError, ShapeMismatchError
from .spec import KVSpec


def is_torch(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def is_cuda(x: Any) -> bool:
    return is_torch(x) and x.device.type == "cuda"


def check_blocks(x: Any, spec: KVSpec, n: int, what: str, *, per_block: tuple[int, ...] | None = None) -> None:
    """Raise unless ``x`` has shape (n, *per_block) and the spec's dtype."""
    want = (n, *(per_block if per_block is not None else spec.block_shape))
    if not (isinstance(x, np.ndarray) or is_torch(x)):
        raise TypeError(f"{what} must be a numpy array or a torch tensor of shape {want} and dtype {spec.dtype}, "
                        f"got {type(x).__name__}")
    shape = tuple(x.shape)
    if shape != want:
        raise ShapeMismatchError(f"{what} has shape {shape}, expected {want} for {spec}")
    if is_torch(x):
        if str(x.dtype).removeprefix("torch.") != spec.dtype:
            raise DTypeMismatchError(f"{what} has dtype {x.dtype}, the pool holds {spec.dtype}")
    else:
        if np.dtype(x.dtype) != spec.np_dtype:
            raise DTypeMismatchError(f"{what} has dtype {x.dtype}, the pool holds {spec.dtype} (numpy {spec.np_dtype})")


def host_address(x: Any, writable: bool) -> tuple[int, int, Any]:
    """(address, stride of dim 0 in bytes, object to keep alive) of a C-contiguous host array.

    Non-contiguous sources are copied to a contiguous buffer first; destinations must be contiguous.
    """
    if is_torch(x):
        if not x.is_contiguous():
            if writable:
                raise ShapeMismatchError("the destination tensor must be contiguous")
            x = x.contiguous()
        rows = max(int(x.shape[0]), 1) if x.dim() else 1
        return int(x.data_ptr()), int(x.numel() * x.element_size()) // rows, x
    a = x
    if not isinstance(a, np.ndarray):
        raise TypeError(f"expected a numpy array or a torch tensor, got {type(x).__name__}")
    if not a.flags.c_contiguous:
        if writable:
            raise ShapeMismatchError("the destination array must be C-contiguous")
        a = np.ascontiguousarray(a)
    if writable and not a.flags.writeable:
        raise ValueError("the destination array is read-only")
    rows = max(a.shape[0], 1) if a.ndim else 1
    return int(a.ctypes.data), int(a.nbytes) // rows, a
