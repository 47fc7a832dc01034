"""A Mooncake Store on loopback for the tier's tests; they skip (saying why) only where the
Mooncake client cannot be imported.  CI installs it (the ``tier`` extra) and requires them to run
(PYKVSHM_REQUIRE_TIER=1)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pykvshm.testing.mooncake import MooncakeCluster
from pykvshm.testing.mooncake import require_mooncake as need_mooncake


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MooncakeCluster]:
    """One master (with its HTTP metadata service) and one storage process, shared by a module."""
    need_mooncake()
    with MooncakeCluster(tmp_path_factory.mktemp("mooncake")) as mc:
        yield mc


@pytest.fixture
def own_store(tmp_path: Path) -> Iterator[MooncakeCluster]:
    """A store of the test's own (for tests that kill its master)."""
    need_mooncake()
    with MooncakeCluster(tmp_path / "mooncake") as mc:
        yield mc
