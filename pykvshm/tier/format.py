"""What the tier writes into the store: keys namespaced by pool geometry, and values that carry
a self-describing header checked before any byte of them reaches a pool.

Store key: ``pykvshm/v1/<namespace>/<32 hex digits of the pool key>``; the namespace is a short
hash of the geometry (layers, KV heads, head dim, block tokens, dtype), so pools of different
geometry never read each other's blocks while every rack with the same model shares them (the
pool key already folds in the model and the connector's salt).

Value: a 64-byte header, then the block's bytes::

    0  magic   b"PYKVTIER"          8  version u16 (1)   10 header bytes u16 (64)
    12 crc32c  u32 (CRC32C of the header with this field zero, continued over the payload)
    16 geometry: num_layers, num_kv_heads, head_dim, block_tokens, dtype code, itemsize (6 x u32)
    40 key     16 bytes (the pool key)
    56 payload bytes u64

All integers little-endian.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

from .._core import crc32c
from ..spec import KVSpec

MAGIC = b"PYKVTIER"
VERSION = 1
HEADER_BYTES = 64
_HEAD = struct.Struct("<8sHHI6I16sQ")
assert _HEAD.size == HEADER_BYTES

# Why a value was refused (the tier counts each).
OK, MISSING, BAD_HEADER, BAD_GEOMETRY, BAD_KEY, BAD_LENGTH, BAD_CRC = range(7)
REASONS = {MISSING: "missing", BAD_HEADER: "bad header", BAD_GEOMETRY: "geometry differs", BAD_KEY: "key differs",
           BAD_LENGTH: "length differs", BAD_CRC: "CRC32C mismatch"}


def geometry(spec: KVSpec) -> tuple[int, int, int, int, int, int]:
    return (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.block_tokens, spec.dtype_code, spec.itemsize)


def namespace(spec: KVSpec) -> str:
    """16 hex digits naming the geometry: equal for pools whose blocks are interchangeable."""
    g = struct.pack("<6I", *geometry(spec))
    return hashlib.blake2b(b"pykvshm-tier-v1" + g, digest_size=8).hexdigest()


def store_key(ns: str, key: bytes) -> str:
    return f"pykvshm/v{VERSION}/{ns}/{key.hex()}"


def header(spec: KVSpec, key: bytes, payload: Any) -> bytes:
    """The header for ``payload`` (a buffer of exactly one block) stored under pool key ``key``."""
    n = memoryview(payload).nbytes
    h = _HEAD.pack(MAGIC, VERSION, HEADER_BYTES, 0, *geometry(spec), key, n)
    crc = crc32c(payload, crc32c(h))
    return h[:12] + struct.pack("<I", crc) + h[16:]


def verify(spec: KVSpec, key: bytes, value: Any) -> int:
    """OK when ``value`` is a well-formed block of this geometry for ``key``; else why not."""
    mv = memoryview(value)
    if mv.nbytes == 0:
        return MISSING
    if mv.nbytes < HEADER_BYTES:
        return BAD_HEADER
    head = bytes(mv[:HEADER_BYTES])
    magic, version, hbytes, crc, *rest = _HEAD.unpack(head)
    if magic != MAGIC or version != VERSION or hbytes != HEADER_BYTES:
        return BAD_HEADER
    if tuple(rest[:6]) != geometry(spec):
        return BAD_GEOMETRY
    if rest[6] != key:
        return BAD_KEY
    if rest[7] != spec.block_bytes or mv.nbytes != HEADER_BYTES + spec.block_bytes:
        return BAD_LENGTH
    zeroed = head[:12] + b"\0\0\0\0" + head[16:]
    if crc32c(mv[HEADER_BYTES:], crc32c(zeroed)) != crc:
        return BAD_CRC
    return OK
