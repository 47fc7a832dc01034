"""Keys and salts shared by every engine integration (vLLM, SGLang, LMCache).

One rule for all three: a pool key is ``BLAKE2b-128(salt || engine_hash)`` where
``engine_hash`` is the engine's own chained prefix hash of a block/page/chunk and
``salt`` is a 16-byte digest of everything two processes must agree on for the
bytes to be valid in both (engine tag, model, dtype, layout, parallel rank, pool
geometry, a user salt).  The vLLM connector's ``config.request_keys`` is this rule
with vLLM's block hashes; the SGLang and LMCache backends use their page and chunk
hashes.  Each engine's salt starts with its own tag, so engines never read each
other's blocks: their hashes and byte layouts differ (docs/design/engines.md).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

KEY_BYTES = 16


def salt_digest(parts: Iterable[Any]) -> bytes:
    """The 16-byte salt of ``parts`` (each turned into text, joined with U+001F)."""
    return hashlib.blake2b("\x1f".join(str(p) for p in parts).encode(), digest_size=KEY_BYTES).digest()


def engine_key(salt: bytes, engine_hash: bytes | str | int) -> bytes:
    """The pool key of one engine hash under ``salt``.

    ``engine_hash`` is bytes (vLLM), a hex or other string (SGLang page hashes) or an
    integer (LMCache chunk hashes, as signed 64-bit or wider).
    """
    if isinstance(engine_hash, str):
        raw = engine_hash.encode()
    elif isinstance(engine_hash, (bytes, bytearray, memoryview)):
        raw = bytes(engine_hash)
    elif isinstance(engine_hash, int) and not isinstance(engine_hash, bool):
        raw = engine_hash.to_bytes(32, "little", signed=True)
    else:
        raise TypeError(f"an engine hash must be bytes, str or int, got {type(engine_hash).__name__}")
    return hashlib.blake2b(salt + raw, digest_size=KEY_BYTES).digest()
