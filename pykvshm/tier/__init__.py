"""The cluster tier: a pool continued into Mooncake Store, shared by several racks.

Sealed blocks about to be evicted are demoted (copied) into the store; a prefix that misses in the
pool is promoted back from it, verified before any reader sees it.  Optional: ``pip install
'pykvshm[tier]'``.  ``Pool.tier(url)`` makes the tier client of a pool handle.
"""

from .config import TierConfig, parse_url
from .format import HEADER_BYTES, namespace, store_key
from .tier import Tier

__all__ = ["HEADER_BYTES", "Tier", "TierConfig", "namespace", "parse_url", "store_key"]
