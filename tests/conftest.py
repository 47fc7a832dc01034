"""Shared fixtures: unique pool names that are always cleaned up, a small KV geometry."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import pykvshm
from pykvshm.testing import unique_name
from pykvshm.testing.mooncake import MooncakeCluster, require_mooncake


@pytest.fixture(scope="session", autouse=True)
def _outside_the_source_tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Run every test (and the subprocesses it starts) from a scratch folder, so that
    ``python -c "import pykvshm"`` imports the installed package, not the unbuilt sources
    in the repository root."""
    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(old)


def _destroyed_after(name: str) -> Iterator[str]:
    yield name
    try:
        pykvshm.Pool.destroy(name)
    except pykvshm.errors.PoolNotFoundError:
        pass


@pytest.fixture
def pool_name() -> Iterator[str]:
    """A POSIX shm pool name no other test uses; the pool is destroyed afterwards."""
    yield from _destroyed_after(unique_name())


@pytest.fixture
def pool_name_b() -> Iterator[str]:
    """A second unique pool name (another rack's pool), destroyed afterwards."""
    yield from _destroyed_after(unique_name("b"))


@pytest.fixture
def mooncake_store(tmp_path) -> Iterator[MooncakeCluster]:
    """A Mooncake Store of the test's own on loopback (master with its HTTP metadata service, one
    storage process); skips without Mooncake, fails instead under PYKVSHM_REQUIRE_TIER=1."""
    require_mooncake()
    with MooncakeCluster(tmp_path / "mooncake") as mc:
        yield mc


@pytest.fixture
def pool_path(tmp_path) -> Iterator[str]:
    """An absolute file path for a pool (tmp_path lives on a regular filesystem)."""
    yield str(tmp_path / "pool.kv")


@pytest.fixture
def spec() -> pykvshm.KVSpec:
    """A small geometry: 2 layers, 2 kv heads, head_dim 8, 4-token blocks, float16 (512-byte blocks)."""
    return pykvshm.KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, block_tokens=4, dtype="float16")


@pytest.fixture
def pool(pool_name: str, spec: pykvshm.KVSpec) -> Iterator[pykvshm.Pool]:
    p = pykvshm.Pool.create(pool_name, spec=spec, capacity="8MiB")
    yield p
    try:
        p.close()
    except pykvshm.errors.ViewsAliveError:
        pass
