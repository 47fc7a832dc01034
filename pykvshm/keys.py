"""Block keys: 16-byte chained hashes naming a prefix of tokens."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any, Union

import numpy as np

__all__ = ["BlockKeys", "block_keys", "fold_key", "keys_buffer", "KeyLike"]

KEY_BYTES = 16
KeyLike = Union[bytes, bytearray, memoryview, int, np.ndarray]
_ROOT_PERSON = b"pykvshm.root"
_FOLD_PERSON = b"pykvshm.fold"


class BlockKeys(list):  # type: ignore[type-arg]
    """A list of 16-byte keys that also keeps them joined, so the pool gets them without a copy loop.

    Behaves as a plain ``list[bytes]``; slicing gives another BlockKeys.
    """

    __slots__ = ("_buffer",)

    def __init__(self, keys: Iterable[bytes] = (), buffer: bytes | None = None) -> None:
        super().__init__(keys)
        self._buffer = buffer

    @property
    def buffer(self) -> bytes:
        if self._buffer is None or len(self._buffer) != KEY_BYTES * len(self):
            self._buffer = b"".join(self)
        return self._buffer

    def __getitem__(self, i):  # type: ignore[no-untyped-def]
        if isinstance(i, slice):
            items = list.__getitem__(self, i)
            start, stop, step = i.indices(len(self))
            buf = self.buffer[KEY_BYTES * start : KEY_BYTES * stop] if step == 1 else None
            return BlockKeys(items, buf)
        return list.__getitem__(self, i)

    def __add__(self, other):  # type: ignore[no-untyped-def]
        if isinstance(other, BlockKeys):
            return BlockKeys(list.__add__(self, other), self.buffer + other.buffer)
        return list.__add__(self, other)

    # Mutations invalidate the joined buffer.
    def _touch(self) -> None:
        self._buffer = None

    def append(self, k: bytes) -> None:  # type: ignore[override]
        super().append(k)
        self._touch()

    def extend(self, ks: Iterable[bytes]) -> None:  # type: ignore[override]
        super().extend(ks)
        self._touch()

    def __setitem__(self, i, v):  # type: ignore[no-untyped-def]
        super().__setitem__(i, v)
        self._touch()

    def __delitem__(self, i):  # type: ignore[no-untyped-def]
        super().__delitem__(i)
        self._touch()

    def insert(self, i, v):  # type: ignore[no-untyped-def]
        super().insert(i, v)
        self._touch()

    def pop(self, i=-1):  # type: ignore[no-untyped-def]
        v = super().pop(i)
        self._touch()
        return v

    def remove(self, v):  # type: ignore[no-untyped-def]
        super().remove(v)
        self._touch()

    def __iadd__(self, other):  # type: ignore[no-untyped-def]
        r = super().__iadd__(other)
        self._touch()
        return r


def block_keys(tokens: Sequence[int] | np.ndarray, block_tokens: int, salt: bytes = b"") -> BlockKeys:
    """One 16-byte key per *full* block of ``tokens``, chained.

    ``key[i] = BLAKE2b-128(key[i-1] || tokens of block i as little-endian int64)``
    with ``key[-1] = BLAKE2b-128(salt)``, so a key names the whole prefix up to
    the end of its block, and the salt (model name, LoRA id, tenant) separates
    caches that must not share KV.  A trailing partial block gets no key.
    """
    if isinstance(block_tokens, bool) or int(block_tokens) <= 0:
        raise ValueError(f"block_tokens must be positive, got {block_tokens!r}")
    block_tokens = int(block_tokens)
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"tokens must be one-dimensional, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"tokens must be integers, got dtype {arr.dtype}")
    n = arr.size // block_tokens
    data = np.ascontiguousarray(arr[: n * block_tokens], dtype="<i8").tobytes()
    step = block_tokens * 8
    prev = hashlib.blake2b(bytes(salt), digest_size=KEY_BYTES, person=_ROOT_PERSON).digest()
    out = []
    mv = memoryview(data)
    for i in range(n):
        h = hashlib.blake2b(prev, digest_size=KEY_BYTES)
        h.update(mv[i * step : (i + 1) * step])
        prev = h.digest()
        out.append(prev)
    return BlockKeys(out)


def fold_key(key: KeyLike) -> bytes:
    """A 16-byte key from any engine block hash.

    16 bytes are used as they are; other bytes-like keys (vLLM's 32-byte block
    hashes, say) are folded with BLAKE2b-128; an integer becomes its 16-byte
    little-endian two's-complement form (so it must fit in 128 bits).
    Deterministic across processes and hosts.
    """
    if isinstance(key, (bytes, bytearray, memoryview)):
        b = bytes(key)
    elif isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        b = int(key).to_bytes(16, "little", signed=True)
    elif isinstance(key, np.ndarray):
        b = key.tobytes()
    else:
        raise TypeError(f"a block key must be bytes-like or an int, got {type(key).__name__}")
    if len(b) == KEY_BYTES:
        return b
    if not b:
        raise ValueError("a block key must not be empty")
    return hashlib.blake2b(b, digest_size=KEY_BYTES, person=_FOLD_PERSON).digest()


def keys_buffer(keys: Iterable[Any] | np.ndarray) -> bytes:
    """The keys as one contiguous buffer of 16 bytes each, for the core."""
    if type(keys) is BlockKeys:
        return keys.buffer
    if isinstance(keys, np.ndarray) and keys.dtype == np.uint8 and keys.ndim == 2 and keys.shape[1] == KEY_BYTES:
        return np.ascontiguousarray(keys).tobytes()
    if isinstance(keys, (bytes, bytearray, memoryview)):
        raise TypeError("keys must be a sequence of keys, not one bytes object")
    parts = [k if (type(k) is bytes and len(k) == KEY_BYTES) else fold_key(k) for k in keys]
    return b"".join(parts)
