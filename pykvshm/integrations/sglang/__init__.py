"""pykvshm as SGLang's HiCache storage backend (L3), loaded out of tree with
``--hicache-storage-backend dynamic``; see storage.py and docs/design/engines.md.

Importing this package needs SGLang (``sglang.srt.mem_cache.hicache_storage``).
"""

from .storage import PykvshmHiCacheStorage

__all__ = ["PykvshmHiCacheStorage"]
