"""The non-coherent code path really issues cache-line flushes (and the coherent one none).

This is groundwork for multi-host CXL 2.0 pools (issue: rack-scale CXL): on one host the flushes
are functionally no-ops, so what is checked here is that they are issued where the design says.
"""

from __future__ import annotations

import numpy as np

import pykvshm
from pykvshm import _core
from pykvshm.testing import blocks_for_keys


def _publish_and_read(pool: pykvshm.Pool) -> None:
    spec = pool.spec
    keys = pykvshm.block_keys(np.arange(8 * spec.block_tokens), spec.block_tokens, salt=pool.coherence.encode())
    pool.publish(keys, blocks_for_keys(keys, spec))
    with pool.acquire(keys) as lease:
        out = np.empty((len(lease), *spec.block_shape), dtype=spec.np_dtype)
        lease.copy_to(out)
    assert np.array_equal(out.view(np.uint8), blocks_for_keys(keys, spec).view(np.uint8))


def test_coherent_pool_issues_no_flushes(pool_name: str, spec: pykvshm.KVSpec) -> None:
    with pykvshm.Pool.create(pool_name, spec=spec, capacity="4MiB") as pool:
        f0, i0 = _core.lines_flushed(), _core.lines_invalidated()
        _publish_and_read(pool)
        assert _core.lines_flushed() == f0 and _core.lines_invalidated() == i0


def test_noncoherent_pool_flushes_data_before_publishing(pool_name: str, spec: pykvshm.KVSpec) -> None:
    assert _core.flush_instruction() in ("clwb", "clflushopt", "clflush")
    with pykvshm.Pool.create(pool_name, spec=spec, capacity="4MiB", coherence="noncoherent") as pool:
        assert pool.coherence == "noncoherent"
        f0, i0 = _core.lines_flushed(), _core.lines_invalidated()
        _publish_and_read(pool)
        # At least every line of the 8 published blocks was written back, and the reader
        # invalidated at least every line it read.
        lines_per_block = -(-spec.block_bytes // 64)
        assert _core.lines_flushed() - f0 >= 8 * lines_per_block
        assert _core.lines_invalidated() - i0 >= 8 * lines_per_block
        pool.check()
    with pykvshm.Pool.open(pool_name) as again:
        assert again.coherence == "noncoherent"  # fixed at creation, stored in the superblock
