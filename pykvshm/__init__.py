"""pykvshm: a KV-cache transport for disaggregated LLM serving through a shared memory pool.

A prefill worker publishes the KV cache of a prompt's full blocks into a pool that
many processes (and, on CXL memory, many hosts) map at once; a decode worker finds
the longest cached prefix and reads it in place.

    >>> import pykvshm
    >>> spec = pykvshm.KVSpec(num_layers=4, num_kv_heads=2, head_dim=64, block_tokens=16)
    >>> pool = pykvshm.Pool.create("my-pool", spec=spec, capacity="256MiB")  # doctest: +SKIP
"""

from . import errors
from .errors import PoolError, PoolFullError
from .keys import block_keys, fold_key
from .pool import Lease, Pool, Writer, dax_devices
from .spec import KVSpec, parse_size

__version__ = "0.1.0"

__all__ = [
    "KVSpec",
    "Lease",
    "Pool",
    "PoolError",
    "PoolFullError",
    "Writer",
    "block_keys",
    "dax_devices",
    "errors",
    "fold_key",
    "parse_size",
    "__version__",
]
