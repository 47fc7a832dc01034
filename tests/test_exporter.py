"""``pykvshm exporter``: started as users start it (a child process on a free loopback port), scraped over
HTTP, parsed with prometheus_client's own text parser, and compared with ``pool.stats()`` after real pool
traffic. Also: the pool going away and coming back, a bad pool name, and that the Grafana dashboard only
queries metrics the exporter serves.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import pykvshm

if os.environ.get("PYKVSHM_REQUIRE_OPS"):
    import prometheus_client  # noqa: F401 - CI installs the test extra: a missing package is a failure
else:
    pytest.importorskip("prometheus_client", reason="pip install 'pykvshm[ops]' (or [test]) for the exporter")
from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "deploy" / "grafana" / "pykvshm.json"
STATS_TO_METRIC = {
    "hits": "pykvshm_prefix_hits", "misses": "pykvshm_prefix_misses", "evictions": "pykvshm_evictions",
    "bytes_in": "pykvshm_bytes_in", "bytes_out": "pykvshm_bytes_out", "published": "pykvshm_blocks_published",
    "duplicates": "pykvshm_publish_duplicates", "allocs": "pykvshm_block_allocs", "index_full": "pykvshm_index_full",
    "checksum_errors": "pykvshm_checksum_errors", "recovered_members": "pykvshm_members_recovered",
    "pins_refused": "pykvshm_pins_refused", "lock_waits": "pykvshm_lock_waits",
    "tier_demoted": "pykvshm_tier_demoted_blocks", "tier_promoted": "pykvshm_tier_promoted_blocks",
    "tier_integrity_failures": "pykvshm_tier_integrity_failures",
}


class Exporter:
    def __init__(self, *pools: str) -> None:
        argv = [sys.executable, "-m", "pykvshm", "exporter", "--port", "0", "--host", "127.0.0.1"]
        for p in pools:
            argv += ["--pool", p]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("pykvshm exporter: serving "), (line, self.proc.stderr and self.proc.stderr.read())
        self.url = line.split()[-1]
        assert self.url.startswith("http://127.0.0.1:") and self.url.endswith("/metrics")

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample as {(name, sorted labels): value}."""
        with urllib.request.urlopen(self.url, timeout=30) as r:
            assert r.status == 200
            text = r.read().decode()
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=30)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()
        return rc


@pytest.fixture
def exporter_of(request: pytest.FixtureRequest) -> Iterator[type[Exporter]]:
    started: list[Exporter] = []

    class Tracked(Exporter):
        def __init__(self, *pools: str) -> None:
            super().__init__(*pools)
            started.append(self)

    yield Tracked
    for e in started:
        if e.proc.poll() is None:
            assert e.stop() == 0


def value(samples: dict, name: str, pool: str, **labels: str) -> float:
    return samples[(name, tuple(sorted({"pool": pool, **labels}.items())))]


def expect_matches_stats(samples: dict, pool: pykvshm.Pool) -> None:
    s = pool.stats()
    n = pool.name
    assert value(samples, "pykvshm_up", n) == 1
    for state in ("free", "writing", "sealed", "evicting"):
        assert value(samples, "pykvshm_blocks", n, state=state) == s[state], state
    assert value(samples, "pykvshm_blocks_capacity", n) == s["total"] == pool.num_blocks
    assert value(samples, "pykvshm_blocks_pinned", n) == s["pinned"]
    assert value(samples, "pykvshm_members", n) == s["members"]
    for key, metric in STATS_TO_METRIC.items():
        assert value(samples, metric + "_total", n) == s[key], key
    assert value(samples, "pykvshm_pool_bytes", n) == pool.total_bytes
    assert value(samples, "pykvshm_block_bytes", n) == pool.spec.block_bytes


def test_scrape_matches_pool_stats_as_traffic_moves(pool_name: str, spec: pykvshm.KVSpec, exporter_of) -> None:
    pool = pykvshm.Pool.create(pool_name, spec=spec, capacity="3MiB")  # small: eviction happens
    try:
        e = exporter_of(pool_name)
        first = e.scrape()
        expect_matches_stats(first, pool)
        assert value(first, "pykvshm_members", pool_name) == 1  # the exporter takes no member slot
        info = {k: v for (name, labels), v in first.items() if name == "pykvshm_pool_info" for k, v in labels}
        assert info["uuid"] == pool.uuid and info["coherence"] == "coherent" and info["dtype"] == "float16"

        rng = np.random.default_rng(0)
        data = rng.standard_normal((64, *spec.block_shape)).astype(np.float16)
        for r in range(40):  # 2,560 blocks into 2,048: the pool evicts
            keys = pykvshm.block_keys(np.arange(64 * spec.block_tokens) + 10_000 * r, spec.block_tokens)
            pool.publish(keys, data)
        lease = pool.acquire(keys)
        out = np.empty((len(lease), *spec.block_shape), np.float16)
        lease.copy_to(out)
        pool.acquire(pykvshm.block_keys(np.arange(8) - 99, spec.block_tokens)).release()  # misses
        second = e.scrape()
        expect_matches_stats(second, pool)
        s = pool.stats()
        assert s["evictions"] > 0 and s["pinned"] == 64 and s["bytes_out"] == 64 * spec.block_bytes and s["misses"] == 2
        lease.release()
        expect_matches_stats(e.scrape(), pool)
    finally:
        pool.close()


def _hold_the_lock(name: str, ready) -> None:
    pool = pykvshm.Pool.open(name)
    pool._core.debug_hold_lock()  # every lock of the pool, until this process dies
    ready.send(True)
    time.sleep(60)
    os._exit(0)


def test_lock_waits_of_a_noncoherent_pool_are_scraped(pool_name: str, spec: pykvshm.KVSpec, exporter_of) -> None:
    """A member that found the noncoherent lock held counts a wait in the pool, where a read-only
    attach (the exporter) sees it."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    with pykvshm.Pool.create(pool_name, spec=spec, capacity="4MiB", coherence="noncoherent") as pool:
        pool.alloc(1)
        assert pool.stats()["lock_waits"] == 0  # nobody else: never waited
        a, b = ctx.Pipe()
        holder = ctx.Process(target=_hold_the_lock, args=(pool_name, b))
        holder.start()
        try:
            assert a.poll(60) and a.recv()
            got: list[int] = []
            t = threading.Thread(target=lambda: got.append(len(pool.alloc(2))), daemon=True)
            t.start()
            t.join(0.5)
            assert not got, "alloc went through a lock another process holds"
        finally:
            os.kill(holder.pid, signal.SIGKILL)  # the next process of this host takes the lock over
            holder.join(30)
        t.join(30)
        assert got == [2]
        waits = pool.stats()["lock_waits"]
        assert waits >= 1
        expect_matches_stats(exporter_of(pool_name).scrape(), pool)


def test_members_dead_and_recovered(pool_name: str, spec: pykvshm.KVSpec, exporter_of) -> None:
    pykvshm.Pool.create(pool_name, spec=spec, capacity="3MiB").close()
    e = exporter_of(pool_name)
    subprocess.run([sys.executable, "-c", f"import os, pykvshm; p = pykvshm.Pool.open({pool_name!r}); os._exit(0)"],
                   check=True, timeout=60)
    s = e.scrape()
    assert value(s, "pykvshm_members_dead", pool_name) == 1 and value(s, "pykvshm_members", pool_name) == 1
    with pykvshm.Pool.open(pool_name) as p:  # attaching recovers the dead member
        s = e.scrape()
        assert value(s, "pykvshm_members_dead", pool_name) == 0
        assert value(s, "pykvshm_members_recovered_total", pool_name) == 1
        expect_matches_stats(s, p)


def test_pool_removed_and_created_again(pool_name: str, spec: pykvshm.KVSpec, exporter_of) -> None:
    """A scrape of a removed pool says pykvshm_up 0; a new pool under the name is picked up with its
    own (fresh) counters, not the old pool's."""
    with pykvshm.Pool.create(pool_name, spec=spec, capacity="3MiB") as old:
        keys = pykvshm.block_keys(np.arange(32), spec.block_tokens)
        old.publish(keys, np.zeros((len(keys), *spec.block_shape), np.float16))
        e = exporter_of(pool_name)
        assert value(e.scrape(), "pykvshm_blocks_published_total", pool_name) == 8
    pykvshm.Pool.destroy(pool_name)
    gone = e.scrape()
    assert value(gone, "pykvshm_up", pool_name) == 0
    assert not any(name == "pykvshm_blocks" for name, _ in gone)
    with pykvshm.Pool.create(pool_name, spec=spec, capacity="3MiB") as new:
        back = e.scrape()
        assert value(back, "pykvshm_up", pool_name) == 1
        assert value(back, "pykvshm_blocks_published_total", pool_name) == 0
        expect_matches_stats(back, new)


def test_several_pools_one_exporter(spec: pykvshm.KVSpec, exporter_of) -> None:
    from pykvshm.testing import unique_name

    names = [unique_name("exp"), unique_name("exp")]
    pools = [pykvshm.Pool.create(n, spec=spec, capacity="3MiB") for n in names]
    try:
        pools[1].publish(pykvshm.block_keys(np.arange(8), spec.block_tokens),
                         np.zeros((2, *spec.block_shape), np.float16))
        s = exporter_of(*names).scrape()
        for p in pools:
            expect_matches_stats(s, p)
    finally:
        for p, n in zip(pools, names):
            p.close()
            pykvshm.Pool.destroy(n)


@pytest.mark.parametrize(("argv", "needle"), [
    (["--pool", "pykvshm-test-no-such-pool"], "PoolNotFoundError"),
    (["--pool", "bad/name"], "InvalidNameError"),
    (["--pool", "x", "--port", "70000"], "--port"),
])
def test_bad_arguments_are_one_line_and_exit_1(argv: list[str], needle: str) -> None:
    r = subprocess.run([sys.executable, "-m", "pykvshm", "exporter", *argv], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pykvshm exporter: error: ") and needle in lines[0], r.stderr


def test_grafana_dashboard_queries_only_exported_metrics(pool_name: str, spec: pykvshm.KVSpec, exporter_of) -> None:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dash["panels"] for t in panel.get("targets", [])]
    exprs += [v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
              for v in dash["templating"]["list"] if v["type"] == "query"]
    used = {m for e in exprs for m in re.findall(r"\bpykvshm_[a-z_]+", e)}
    assert len(used) >= 10, used
    with pykvshm.Pool.create(pool_name, spec=spec, capacity="3MiB"):
        served = {name for name, _ in exporter_of(pool_name).scrape()}
    assert used <= served, f"the dashboard queries metrics the exporter does not serve: {sorted(used - served)}"
