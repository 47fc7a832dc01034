"""Helpers for testing pykvshm and code built on it: deterministic content, torture harness."""

import os
import uuid

from .content import (
    block_content,
    blocks_for_keys,
    count_wrong_blocks,
    prompt_keys,
    verify_block,
    write_layer_by_layer,
)

__all__ = ["block_content", "blocks_for_keys", "count_wrong_blocks", "prompt_keys", "unique_name", "verify_block",
           "write_layer_by_layer"]


def unique_name(tag: str = "t") -> str:
    """A POSIX shm pool name that no other process or test uses."""
    return f"pykvshm-test-{tag}-{os.getpid()}-{uuid.uuid4().hex[:10]}"
