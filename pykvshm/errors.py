"""Exceptions raised by pykvshm.  Every one derives from :class:`PoolError`."""

from __future__ import annotations

__all__ = [
    "PoolError",
    "PoolExistsError",
    "PoolNotFoundError",
    "PoolFullError",
    "LayoutMismatchError",
    "GeometryMismatchError",
    "CorruptPoolError",
    "PoolInitializingError",
    "InvalidNameError",
    "InvalidHandleError",
    "StaleHandleError",
    "DoubleFreeError",
    "MembersFullError",
    "PlacementError",
    "ChecksumError",
    "PoolClosedError",
    "ForkedHandleError",
    "MemberLostError",
    "TransferError",
    "TransferTimeoutError",
    "TransferAbortedError",
    "TransferGoneError",
    "ShapeMismatchError",
    "DTypeMismatchError",
    "ViewsAliveError",
    "ReadOnlyPoolError",
    "UntrustedPoolError",
    "TierError",
    "TierConfigError",
    "TierUnavailableError",
]


class PoolError(Exception):
    """Base class of every pykvshm error."""


class PoolExistsError(PoolError, FileExistsError):
    """A pool of that name already exists."""


class PoolNotFoundError(PoolError, FileNotFoundError):
    """No pool of that name exists."""


class PoolFullError(PoolError):
    """No free block, and nothing evictable (everything pinned or being written)."""


class LayoutMismatchError(PoolError):
    """The pool was created by a pykvshm with another on-media layout version."""


class GeometryMismatchError(PoolError, ValueError):
    """The pool's KV geometry differs from the one the caller expects."""


class CorruptPoolError(PoolError):
    """The pool file is foreign, truncated or damaged."""


class PoolInitializingError(PoolError):
    """The pool's creator has not finished initialising it; retry shortly."""


class InvalidNameError(PoolError, ValueError):
    """The pool name is not a valid POSIX shm name or absolute path."""


class InvalidHandleError(PoolError, ValueError):
    """A block handle is out of range, not held by this pool handle, or in the wrong state."""


class StaleHandleError(InvalidHandleError):
    """A block handle's generation has moved on: the block was freed or reused."""


class DoubleFreeError(InvalidHandleError):
    """A block was freed twice."""


class MembersFullError(PoolError):
    """Every member slot of the pool is held by a live process."""


class PlacementError(PoolError):
    """The requested NUMA node or huge pages are not available."""


class ChecksumError(PoolError):
    """A block's bytes do not match the checksum stored when it was published."""


class PoolClosedError(PoolError):
    """The pool handle is closed."""


class ForkedHandleError(PoolError):
    """A pool handle was used in a child after fork(); open the pool again there."""


class MemberLostError(PoolError):
    """This handle was declared dead (its heartbeat lease expired) and recovered; open the pool again."""


class TransferError(PoolError):
    """Base class of the layer-wise transfer errors."""


class TransferTimeoutError(TransferError, TimeoutError):
    """A wait for a transfer (or one of its layers) ran out of time."""


class TransferAbortedError(TransferError):
    """The transfer was aborted by its producer or a consumer, or its producer died."""


class TransferGoneError(TransferError, LookupError):
    """No such transfer, or its channel has finished and been reused."""


class ShapeMismatchError(PoolError, ValueError):
    """An array's shape does not match the pool's block geometry."""


class DTypeMismatchError(PoolError, TypeError):
    """An array's dtype does not match the pool's KV dtype."""


class ViewsAliveError(PoolError):
    """Zero-copy views still refer to blocks that are being released, freed or sealed."""


class ReadOnlyPoolError(PoolError, PermissionError):
    """A change was asked of a read-only pool handle (``Pool.open(name, read_only=True)``)."""
class UntrustedPoolError(PoolError, PermissionError):
    """The pool file is owned by another user, or writable by its group or by others: whoever made it
    can read or alter every KV block.  ``Pool.open(..., allow_foreign=True)`` attaches anyway."""


class TierError(PoolError):
    """The cluster tier (pykvshm.tier) failed: bad configuration or an unusable store."""


class TierConfigError(TierError, ValueError):
    """A tier URL or option is malformed."""


class TierUnavailableError(TierError):
    """The store's client is not installed, or could not connect to the store."""
