"""KV geometry: what one block of the pool holds."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import GeometryMismatchError

__all__ = ["KVSpec", "parse_size"]

# Stable codes stored in the superblock.  Never renumber.
_DTYPES: dict[str, tuple[int, int]] = {
    "float16": (1, 2),
    "bfloat16": (2, 2),
    "float32": (3, 4),
    "float8_e4m3fn": (4, 1),
    "float8_e5m2": (5, 1),
    "int8": (6, 1),
    "uint8": (7, 1),
    "float64": (8, 8),
}
_CODES = {code: name for name, (code, _) in _DTYPES.items()}
# numpy has no bfloat16 / float8: those blocks are exposed as raw integers of the same width.
_NUMPY = {
    "float16": np.float16,
    "bfloat16": np.uint16,
    "float32": np.float32,
    "float8_e4m3fn": np.uint8,
    "float8_e5m2": np.uint8,
    "int8": np.int8,
    "uint8": np.uint8,
    "float64": np.float64,
}
_ALIASES = {"half": "float16", "fp16": "float16", "bf16": "bfloat16", "float": "float32", "fp32": "float32",
            "fp8": "float8_e4m3fn", "double": "float64"}


def _dtype_name(dtype: Any) -> str:
    s = str(dtype)
    s = s.removeprefix("torch.")
    s = _ALIASES.get(s, s)
    if s not in _DTYPES:
        try:
            s = np.dtype(dtype).name
        except TypeError:
            pass
    if s not in _DTYPES:
        raise GeometryMismatchError(f"unsupported KV dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return s


@dataclass(frozen=True)
class KVSpec:
    """Geometry of the KV cache held by a pool.

    One block holds ``block_tokens`` tokens of K and V for every layer, laid out
    as ``block_shape == (num_layers, 2, block_tokens, num_kv_heads, head_dim)``.
    ``dtype`` is a name (``"float16"``, ``"bfloat16"``, ...), a numpy dtype or a
    torch dtype.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_tokens: int
    dtype: str = "float16"
    _code: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0 or v >= 2**31:
                raise GeometryMismatchError(f"KVSpec.{name} must be a positive integer, got {v!r}")
            object.__setattr__(self, name, int(v))
        name = _dtype_name(self.dtype)
        object.__setattr__(self, "dtype", name)
        object.__setattr__(self, "_code", _DTYPES[name][0])

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.block_tokens, self.num_kv_heads, self.head_dim)

    @property
    def layer_shape(self) -> tuple[int, int, int, int]:
        """Shape of one layer of one block: (2, block_tokens, num_kv_heads, head_dim)."""
        return (2, self.block_tokens, self.num_kv_heads, self.head_dim)

    @property
    def itemsize(self) -> int:
        return _DTYPES[self.dtype][1]

    @property
    def block_bytes(self) -> int:
        return math.prod(self.block_shape) * self.itemsize

    @property
    def np_dtype(self) -> np.dtype:
        """The numpy dtype of views (raw integers of the same width for bfloat16 / float8)."""
        return np.dtype(_NUMPY[self.dtype])

    @property
    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype)

    @property
    def dtype_code(self) -> int:
        return self._code

    @classmethod
    def _from_geometry(cls, g: dict[str, int]) -> "KVSpec":
        code = g["dtype_code"]
        if code not in _CODES:
            raise GeometryMismatchError(f"the pool stores an unknown dtype code {code}")
        return cls(g["num_layers"], g["num_kv_heads"], g["head_dim"], g["block_tokens"], _CODES[code])


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"512MiB"``, ``"2 GiB"``, ``"1.5GB"``."""
    if isinstance(size, bool):
        raise ValueError(f"invalid size {size!r}")
    if isinstance(size, (int, np.integer)):
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        return int(size)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(size))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"invalid size {size!r}; write e.g. 512MiB or 2GiB")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value
