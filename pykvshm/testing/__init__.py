"""Helpers for testing pykvshm and code built on it: deterministic content, torture harness."""

from .content import block_content, blocks_for_keys, verify_block

__all__ = ["block_content", "blocks_for_keys", "verify_block"]
