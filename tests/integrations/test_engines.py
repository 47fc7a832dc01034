"""SGLang's HiCache cache controller and LMCache's engine, each in its own environment
(scripts/setup_engines_env.sh), storing to and loading from one pykvshm pool; skipped
when an environment is missing (PYKVSHM_REQUIRE_ENGINES=1 turns the skip into a failure).

The drivers (tests/integrations/engines/) run the frameworks' own objects; see their
docstrings for the one piece each framework lacks on a CPU-only machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid

import pytest

import pykvshm
from pykvshm.integrations.engines_env import engine_python, missing_hint

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "engines")
TIMEOUT = 600


def _python(name: str) -> str:
    exe = engine_python(name)
    if exe is None:
        if os.environ.get("PYKVSHM_REQUIRE_ENGINES") == "1":
            pytest.fail(f"PYKVSHM_REQUIRE_ENGINES=1 but {missing_hint(name)}", pytrace=False)
        pytest.skip(missing_hint(name))
    return exe


@pytest.fixture
def pool_name():
    name = f"issue17-engines-{uuid.uuid4().hex[:8]}"
    yield name
    try:
        pykvshm.Pool.destroy(name)
    except pykvshm.errors.PoolNotFoundError:
        pass


def _start(exe: str, script: str, *args: object, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([exe, os.path.join(HERE, script), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=os.path.expanduser("~"),
                            env={**os.environ, **(env or {})})


def _result(p: subprocess.Popen[str]) -> dict:
    try:
        out, _ = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
        raise AssertionError(f"driver timed out:\n{out[-4000:]}") from None
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, f"driver failed (rc {p.returncode}):\n{out[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def _check_sglang(stored: dict, loaded: dict, pages: int, shared: int, page: int) -> None:
    assert stored["stored_tokens"] == pages * page and stored["exists"] == pages
    assert loaded["loaded_tokens"] == pages * page
    assert loaded["bit_exact"]
    assert loaded["partial_hit_tokens"] == shared * page


def _check_lmcache(loaded: dict, chunks: int, shared: int, chunk: int) -> None:
    assert loaded["lookup_tokens"] == chunks * chunk          # the partial last chunk is not stored
    assert loaded["retrieved_tokens"] == chunks * chunk
    assert loaded["bit_exact"] and loaded["untouched_after"]
    assert loaded["partial_lookup_tokens"] == shared * chunk


@pytest.mark.parametrize("store_layout,load_layout", [("layer_first", "page_first"), ("page_first_direct", "page_head")])
def test_sglang_hicache_controller_stores_and_loads_bit_exact(pool_name, store_layout, load_layout):
    """Store through one SGLang controller, load through a fresh one in another process whose
    host pool has another layout: pages come back bit for bit; a diverging prompt hits its
    shared prefix only."""
    exe = _python("sglang")
    env = {"PAGE": "16"}
    stored = _result(_start(exe, "sglang_hicache.py", "store", pool_name, store_layout, 11, 5, env=env))
    loaded = _result(_start(exe, "sglang_hicache.py", "load", pool_name, load_layout, 11, 5, 2, env=env))
    _check_sglang(stored, loaded, pages=5, shared=2, page=16)


def test_lmcache_engine_stores_and_retrieves_bit_exact(pool_name):
    """LMCacheEngine stores 3 full chunks and a partial one; a second process's engine
    (local CPU cache off) retrieves the full chunks from the pool bit for bit."""
    exe = _python("lmcache")
    env = {"CHUNK": "64", "BLOCK": "32"}
    stored = _result(_start(exe, "lmcache_engine.py", "store", pool_name, 5, 3, env=env))
    assert stored["stored_blocks"] == 3 * 2
    loaded = _result(_start(exe, "lmcache_engine.py", "load", pool_name, 5, 3, 1, env=env))
    _check_lmcache(loaded, chunks=3, shared=1, chunk=64)


def test_sglang_and_lmcache_share_one_pool_at_once(pool_name):
    """SGLang and LMCache processes attach to the same pool (same geometry: 32-token blocks)
    at the same time, store, then load concurrently: each gets its own KV back bit for bit,
    neither sees the other's blocks, and the pool's invariants hold afterwards."""
    sgl, lmc = _python("sglang"), _python("lmcache")
    s_env, l_env = {"PAGE": "32"}, {"CHUNK": "64", "BLOCK": "32"}
    procs = [_start(sgl, "sglang_hicache.py", "store", pool_name, "layer_first", 21, 4, env=s_env),
             _start(lmc, "lmcache_engine.py", "store", pool_name, 22, 2, env=l_env)]
    s_stored, _ = (_result(p) for p in procs)
    procs = [_start(sgl, "sglang_hicache.py", "load", pool_name, "page_first", 21, 4, 1, env=s_env),
             _start(lmc, "lmcache_engine.py", "load", pool_name, 22, 2, 1, env=l_env)]
    s_loaded, l_loaded = (_result(p) for p in procs)
    _check_sglang(s_stored, s_loaded, pages=4, shared=1, page=32)
    _check_lmcache(l_loaded, chunks=2, shared=1, chunk=64)
    with pykvshm.Pool.open(pool_name) as pool:
        pool.check()
        assert pool.stats()["sealed"] == 4 + 2 * 2
