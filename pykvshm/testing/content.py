"""Deterministic block content implied by a key, so any reader can verify any block it reads."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..keys import block_keys
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


def prompt_keys(spec: KVSpec, prompt: int, blocks: int, salt: bytes) -> list[bytes]:
    """Keys of synthetic prompt number ``prompt``: ``blocks`` full blocks of distinct token ids."""
    tokens = np.arange(blocks * spec.block_tokens, dtype=np.int64) + prompt * 1_000_003
    return block_keys(tokens, spec.block_tokens, salt=salt)


def write_layer_by_layer(writer: Any, keys: list[bytes], spec: KVSpec) -> None:
    """Fill a :class:`~pykvshm.Writer` for ``keys`` one layer at a time with the keys' content."""
    data = blocks_for_keys([keys[int(p)] for p in writer.positions], spec)
    for layer in range(spec.num_layers):
        writer.write_layer(layer, np.ascontiguousarray(data[:, layer]))


def count_wrong_blocks(lease: Any, keys: list[bytes], out: np.ndarray | None = None) -> int:
    """How many leased blocks do not hold their key's content: read through zero-copy views, or,
    with ``out`` (at least ``len(lease)`` blocks), through ``copy_to``."""
    n = len(lease)
    if out is None:
        views = lease.views()
        bad = sum(not verify_block(v, k) for v, k in zip(views, keys))
        del views  # views must not outlive the lease
        return bad
    lease.copy_to(out[:n])
    return sum(not verify_block(out[j], keys[j]) for j in range(n))
