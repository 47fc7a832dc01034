"""SGLang's HiCache cache controller and LMCache's engine, each in its own environment
(scripts/setup_engines_env.sh), storing to and loading from one pykvshm pool; skipped
when an environment is missing (PYKVSHM_REQUIRE_ENGINES=1 turns the skip into a failure).

The drivers (tests/integrations/engines/) run the frameworks' own objects; see their
docstrings for the one piece each framework lacks on a CPU-only machine. The last test adds
a real vLLM engine (scripts/setup_vllm_env.sh; tests/integrations/vllm_support.py) on the
same pool as both.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor

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
    name = f"issue17-vllm-engines-{uuid.uuid4().hex[:8]}"
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


# The vLLM test model (vllm_support.TINY_LLAMA): 4 layers, 2 KV heads of 64, float32, and
# vLLM's CPU block of 32 tokens; SGLang and LMCache run the same geometry so all three open
# one pool (docs/design/engines.md, "One pool, three engines").
TINY_GEOMETRY = {"LAYERS": "4", "KV_HEADS": "2", "HEAD_DIM": "64"}


@pytest.fixture(scope="session")
def sglang_lmcache() -> tuple[str, str]:
    """Both engine environments' interpreters; asked before the vLLM fixtures, so a missing
    one skips before a model is written."""
    return _python("sglang"), _python("lmcache")


def _meet_all(rdv: str, phase: str, who: list[str], procs: list[subprocess.Popen[str]], vllm: Future) -> None:
    """Wait until every engine of `phase` is attached and waiting, then let them all go."""
    deadline = time.monotonic() + TIMEOUT
    while not all(os.path.exists(os.path.join(rdv, f"{w}-{phase}.ready")) for w in who):
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            _result(dead[0])                      # raises with the driver's output
            raise AssertionError(f"a {phase} driver exited before the rendezvous")
        if vllm.done():
            vllm.result()                         # raises with the engine's log
            raise AssertionError(f"the vLLM engine finished before the {phase} rendezvous")
        assert time.monotonic() < deadline, f"no {phase} rendezvous after {TIMEOUT} s"
        time.sleep(0.05)
    open(os.path.join(rdv, f"{phase}.go"), "w").close()


@pytest.mark.vllm
def test_vllm_sglang_and_lmcache_share_one_pool_at_once(sglang_lmcache, vllm_python, tiny_llama, pool_name, tmp_path):
    """A vLLM engine (PykvshmConnector, kv_both), an SGLang HiCache controller and an LMCache
    engine, each in its own environment and process, on one pool with one geometry (the
    tiny vLLM model's). All three attach, then store at the same moment, then load at the
    same moment (file rendezvous, tests/integrations/engines/rendezvous.py; the vLLM engine
    stays attached throughout). Each gets its own KV back: SGLang and LMCache bit for bit,
    vLLM token-identical outputs from prefix hits on its own earlier request after dropping
    its prefix cache. No engine finds another's blocks (sealed blocks = the sum of what each
    stored), and the pool's invariants hold afterwards."""
    import vllm_support as V

    sgl, lmc = sglang_lmcache
    bs = V.BLOCK_SIZE
    rdv = str(tmp_path / "rendezvous")
    os.mkdir(rdv)
    env = {**TINY_GEOMETRY, "PYKVSHM_RENDEZVOUS_DIR": rdv}
    s_env, l_env = {**env, "PAGE": str(bs)}, {**env, "CHUNK": str(2 * bs), "BLOCK": str(bs)}

    rng = random.Random(1717)
    prompts = [[rng.randrange(1, 1000) for _ in range(n)] for n in (100, 130)]
    max_tokens = 8                                 # no block fills during decode: 3 and 4 full blocks
    v_blocks = sum(len(p) // bs for p in prompts)
    stats_file = tmp_path / "vllm.jsonl"
    kvt = {"kv_connector": "PykvshmConnector", "kv_connector_module_path": "pykvshm.integrations.vllm",
           "kv_role": "kv_both",
           "kv_connector_extra_config": {"pool": pool_name, "capacity": "64MiB", "stats_file": str(stats_file)}}
    batches = [
        {"prompts": prompts, "max_tokens": max_tokens, "call": "engines.rendezvous:vllm_store"},
        # Its own prefix cache dropped first, so the hits can only come from the pool.
        {"prompts": prompts, "max_tokens": max_tokens, "reset_prefix_cache": True,
         "call": "engines.rendezvous:vllm_load"},
    ]
    procs: list[subprocess.Popen[str]] = []
    with ThreadPoolExecutor(1) as ex:
        vllm = ex.submit(V.run_engine, tiny_llama, batches, kvt, env={"PYKVSHM_RENDEZVOUS_DIR": rdv}, timeout=TIMEOUT)
        try:
            procs = [_start(sgl, "sglang_hicache.py", "store", pool_name, "layer_first", 31, 4, env=s_env),
                     _start(lmc, "lmcache_engine.py", "store", pool_name, 32, 2, env=l_env)]
            _meet_all(rdv, "store", ["vllm", "sglang", "lmcache"], procs, vllm)
            s_stored, _ = (_result(p) for p in procs)
            procs = [_start(sgl, "sglang_hicache.py", "load", pool_name, "page_head", 31, 4, 1, env=s_env),
                     _start(lmc, "lmcache_engine.py", "load", pool_name, 32, 2, 1, env=l_env)]
            _meet_all(rdv, "load", ["vllm", "sglang", "lmcache"], procs, vllm)
            s_loaded, l_loaded = (_result(p) for p in procs)
            v = vllm.result()
        finally:                                   # on a failure, release whoever still waits
            for phase in ("store", "load"):
                open(os.path.join(rdv, f"{phase}.go"), "w").close()
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()

    _check_sglang(s_stored, s_loaded, pages=4, shared=1, page=bs)
    _check_lmcache(l_loaded, chunks=2, shared=1, chunk=2 * bs)
    first, again = v["batches"]
    assert first["num_cached_tokens"] == [0, 0]
    assert again["num_cached_tokens"] == [(len(p) - 1) // bs * bs for p in prompts]
    assert again["tokens"] == first["tokens"]
    stats = [json.loads(line) for line in stats_file.read_text().splitlines()]
    v_saved = sum(s["save_blocks"] for s in stats)
    assert v_saved == v_blocks
    assert sum(s["load_blocks"] for s in stats) == sum((len(p) - 1) // bs for p in prompts)
    assert sum(s["load_failed"] for s in stats) == 0
    with pykvshm.Pool.open(pool_name) as pool:
        pool.check()
        st = pool.stats()
        assert st["sealed"] == v_saved + 4 + 2 * 2   # vLLM's + SGLang's pages + LMCache's chunk blocks
        assert st["pinned"] == 0
