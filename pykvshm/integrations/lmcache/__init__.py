"""pykvshm as an LMCache storage plugin (``storage_plugins``); see backend.py and
docs/design/engines.md.  Importing this package needs LMCache."""

from .backend import PykvshmStorageBackend

__all__ = ["PykvshmStorageBackend"]
