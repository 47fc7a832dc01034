"""Deterministic block content implied by a key, so any reader can verify any block it reads."""

from __future__ import annotations

import numpy as np

from ..spec import KVSpec


def block_content(key: bytes, spec: KVSpec) -> np.ndarray:
    """The key's 16 bytes repeated over the block, as the spec's dtype and block shape.

    A torn block (bytes of two keys) or a block of another key never matches.
    """
    reps = spec.block_bytes // 16
    tail = spec.block_bytes - 16 * reps
    raw = key * reps + key[:tail]
    return np.frombuffer(raw, dtype=spec.np_dtype).reshape(spec.block_shape)


def blocks_for_keys(keys: list[bytes], spec: KVSpec) -> np.ndarray:
    out = np.empty((len(keys), *spec.block_shape), dtype=spec.np_dtype)
    for i, k in enumerate(keys):
        out[i] = block_content(k, spec)
    return out


def verify_block(view: np.ndarray, key: bytes) -> bool:
    """True when ``view`` holds exactly the content :func:`block_content` gives ``key``."""
    raw = np.ascontiguousarray(view).view(np.uint8).reshape(-1)
    n = raw.size // 16
    if n and not (raw[: 16 * n].reshape(n, 16) == np.frombuffer(key, dtype=np.uint8)).all():
        return False
    return bytes(raw[16 * n :]) == key[: raw.size - 16 * n]
